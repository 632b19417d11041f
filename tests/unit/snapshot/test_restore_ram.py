"""Where a restored machine's RAM goes: the snapshot file mapped privately (copy-on-write),
or, when the rebuilt machine has a device whose backend maps guest RAM itself (vhost-user),
fresh memfds filled from the file with its holes left unallocated. The decision follows the
configuration a snapshot keeps, which therefore carries the vhost devices; devices whose
state lives outside kvmlet are refused before anything is built.
"""

from __future__ import annotations

import os

import pytest

from kvmlet.errors import KvmletError
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.restore import open_snapshot, restored_ram
from kvmlet.machine.vhost_config import FilesystemConfig, VhostUserDiskConfig, shareable_memory
from kvmlet.memory import RamBank
from kvmlet.snapshot import codec, ram
from kvmlet.snapshot.format import FORMAT_VERSION, SnapshotWriter

PAGE = ram.PAGE
BANKS = ((0, 4 << 20), (1 << 32, 2 << 20))


def through_a_snapshot(config: MachineConfig) -> MachineConfig:
    """The configuration a restore rebuilds from what a snapshot kept of `config`."""
    return MachineConfig.from_document(codec.decode(codec.encode(config.to_document())))


def test_a_vhost_user_disk_comes_back_and_its_machine_restores_into_memfds(tmp_path):
    disk = VhostUserDiskConfig("blk.sock", read_only=True)
    config = MachineConfig(boot_code=b"\xf4", vhost_user_disks=(disk,), vsock_cid=7)
    restored = through_a_snapshot(config)
    assert restored.vhost_user_disks == (
        VhostUserDiskConfig(os.path.abspath("blk.sock"), read_only=True),
    )
    assert restored.vsock_cid == 7 and restored.mem_backend == "auto"
    assert shareable_memory(restored)


@pytest.mark.parametrize(
    "fields, memfds",
    [({}, False), ({"mem_backend": "memfd"}, True), ({"mem_backend": "anon"}, False)],
)
def test_without_a_vhost_user_device_the_asked_backend_decides(fields, memfds):
    restored = through_a_snapshot(MachineConfig(boot_code=b"\xf4", **fields))
    assert restored.vhost_user_disks == () and restored.filesystems == ()
    assert shareable_memory(restored) is memfds


def test_a_document_from_before_vhost_devices_were_kept_restores_plain_ram():
    document = MachineConfig(boot_code=b"\xf4").to_document()
    for key in ("mem_backend", "vhost_user_disks", "filesystems", "vsock_cid", "virtiofsd"):
        del document[key]
    restored = MachineConfig.from_document(document)
    assert restored.vhost_user_disks == () and restored.vsock_cid is None
    assert not shareable_memory(restored)


@pytest.fixture
def saved_banks(tmp_path):
    """A snapshot file's RAM area with two banks holding a few pages each: (fd, banks, data)."""
    writer = SnapshotWriter(str(tmp_path / "ram.snap"), [size for _, size in BANKS])
    banks, contents = [], []
    for (base, size), offset in zip(BANKS, writer.bank_offsets, strict=True):
        bank = RamBank.anonymous(base, size)
        for page in (0, 7, size // PAGE - 1):
            bank.mapping[page * PAGE : page * PAGE + 9] = f"page {page:4}".encode()
        ram.save_bank(writer.fd, offset, bank)
        banks.append({"base": base, "size": size, "offset": offset})
        contents.append(bank.mapping[:])
        bank.mapping.close()
    yield writer.fd, banks, contents
    writer.abort()


def test_memfd_ram_holds_the_files_data_and_leaves_its_holes_unallocated(saved_banks):
    fd, banks, contents = saved_banks
    memory = restored_ram(fd, banks, in_memfds=True)
    try:
        assert memory.shareable
        for bank, content in zip(memory, contents, strict=True):
            assert os.fstat(bank.fd).st_blocks * 512 <= 3 * PAGE, "holes stay holes"
            assert bank.mapping[:] == content  # (reading a hole allocates it)
        memory.write(0, b"the guest's own")
        assert os.pread(fd, 15, banks[0]["offset"]) != b"the guest's own"
    finally:
        memory.close()


def test_private_ram_maps_the_file_copy_on_write(saved_banks):
    fd, banks, contents = saved_banks
    memory = restored_ram(fd, banks, in_memfds=False)
    try:
        assert not memory.shareable
        assert [bank.mapping[:] for bank in memory] == contents
        memory.write(7 * PAGE, b"the guest's own")
        assert os.pread(fd, 9, banks[0]["offset"] + 7 * PAGE) == b"page    7"
    finally:
        memory.close()


def write_state(path, config: MachineConfig) -> None:
    writer = SnapshotWriter(str(path), [PAGE])
    writer.finish({"format": FORMAT_VERSION, "machine": config.to_document(), "disks": []})
    writer.commit()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"filesystems": (FilesystemConfig("src", "/"),)}, "virtiofs share ('src'): its FUSE"),
        ({"vsock_cid": 3}, "vsock device: its connections live in the host kernel"),
    ],
)
def test_devices_whose_state_lives_outside_kvmlet_are_refused_before_the_build(
    tmp_path, fields, message
):
    path = tmp_path / "made-by-hand.snap"
    write_state(path, MachineConfig(boot_code=b"\xf4", **fields))
    with pytest.raises(KvmletError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        open_snapshot(str(path))
    assert "\n" not in str(e.value)
