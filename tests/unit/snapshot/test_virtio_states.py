"""Every virtio device's state round trip, and its transports'.

A mock driver plays the guest: Hypothesis chooses requests (some left posted but not kicked,
some completed and not collected), host events (console input, balloon targets, frames from
the network) and where the snapshot falls. The device's state goes through the snapshot
file's encoding into a fresh device over a copy of guest RAM (and of its disk image); then
the same driver steps run against both, and completions, guest RAM, interrupts and host
output must agree at every step.
"""

from __future__ import annotations

import collections
import copy
import os
import shutil
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.bus import mmio_space, port_io_space
from kvmlet.bus.pci import BarAllocator, PciHostBridge, PciWindow
from kvmlet.bus.pci.msi import RecordingMsiController
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from kvmlet.snapshot import codec
from kvmlet.virtio import rng as rng_module
from kvmlet.virtio.balloon import VirtioBalloon
from kvmlet.virtio.blk import VirtioBlock
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.console import VirtioConsole
from kvmlet.virtio.mmio import VirtioMmio
from kvmlet.virtio.net.backend import NetBackend
from kvmlet.virtio.net.device import VirtioNet
from kvmlet.virtio.p9 import Virtio9p
from kvmlet.virtio.pci import VirtioPci
from kvmlet.virtio.rng import VirtioRng
from tests.helpers.net import MAC, FakeWatch, ethernet_frame, header
from tests.helpers.virtio_driver import MockDriver

RAM = 4 << 20
ARENA, ARENA_SIZE = 0x10000, 0x300000
SECTORS = 64
BLK_HEADER = struct.Struct("<IIQ")


def through_file(state):
    return codec.decode(codec.encode(state))


class ListBackend(NetBackend):
    """A network peer in memory: frames to deliver, frames sent."""

    def __init__(self):
        super().__init__("list")
        self.incoming: collections.deque[bytes] = collections.deque()
        self.sent: list[bytes] = []

    def fileno(self) -> int:
        return -1

    def receive(self):
        return memoryview(self.incoming[0]) if self.incoming else None

    def consume(self) -> None:
        self.incoming.popleft()

    def send(self, frames) -> int:
        self.sent.extend(b"".join(bytes(part) for part in frame) for frame in frames)
        return 0

    def close(self) -> None:
        self.closed = True


class Rig:
    """One device of `kind`, its guest RAM, its host side and the driver playing the guest."""

    def __init__(self, kind: str, directory, memory: GuestMemory | None = None):
        self.kind = kind
        self.memory = memory or GuestMemory.anonymous([(0, RAM)])
        self.output: list[bytes] = []
        self.image = directory / f"{kind}-{id(self)}.img"
        if kind == "blk" and not self.image.exists():
            self.image.write_bytes(bytes(SECTORS * 512))
        self.backend = ListBackend()
        self.device = self._device()
        self.driver = MockDriver(self.device, self.memory, ARENA, ARENA_SIZE)

    def _device(self):
        kind, memory = self.kind, self.memory
        if kind == "blk":
            return VirtioBlock(memory, DiskConfig(self.image))
        if kind == "console":
            return VirtioConsole(memory, self.output.append)
        if kind == "rng":
            return VirtioRng(memory)
        if kind == "balloon":
            return VirtioBalloon(memory)
        device = VirtioNet(memory, self.backend, MAC)
        device.connect_backend_watch(FakeWatch())
        return device

    def twin(self, directory) -> Rig:
        """A fresh rig over a copy of this one's RAM (and disk), with this driver's state."""
        memory = GuestMemory.anonymous([(0, RAM)])
        memory.write(0, self.memory.read(0, RAM))
        other = Rig.__new__(Rig)
        other.kind, other.memory, other.output = self.kind, memory, []
        other.image = directory / f"{self.kind}-twin-{id(other)}.img"
        if self.kind == "blk":
            shutil.copyfile(self.image, other.image)
        other.backend = ListBackend()
        other.backend.incoming = collections.deque(self.backend.incoming)
        other.device = other._device()
        other.driver = copy.copy(self.driver)
        other.driver.device, other.driver.memory = other.device, memory
        other.driver.queues = copy.deepcopy(self.driver.queues)
        other.driver.interrupts = []
        other.device.connect_interrupts(
            lambda kind, queue: other.driver.interrupts.append((kind, queue))
        )
        return other

    def close(self) -> None:
        self.device.close()
        self.memory.close()


def blk_request(seed: int) -> tuple[list[bytes], list[int]]:
    """A write, read, flush or GET_ID request (header, data, status byte)."""
    sector = seed % SECTORS
    kind = (seed // SECTORS) % 4
    if kind == 0:
        data = bytes((seed + i) & 0xFF for i in range(512))
        return [BLK_HEADER.pack(1, 0, sector), data], [1]
    if kind == 1:
        return [BLK_HEADER.pack(0, 0, sector)], [512, 1]
    return [BLK_HEADER.pack(4 if kind == 2 else 8, 0, 0)], [1] if kind == 2 else [20, 1]


def request(rig: Rig, seed: int) -> tuple[int, list[bytes], list[int]]:
    """A valid request for the device: (queue, readable data, writable sizes)."""
    kind = rig.kind
    if kind == "blk":
        return (0, *blk_request(seed))
    if kind == "rng":
        return 0, [], [1 + seed % 64]
    if kind == "console":
        if seed % 2:
            return 1, [f"out {seed}\n".encode()], []
        return 0, [], [1 + seed % 16]
    if kind == "balloon":
        pfns = [(seed * 7 + i) % (RAM // 4096) for i in range(1 + seed % 5)]
        pfns = [pfn for pfn in pfns if pfn * 4096 >= ARENA + ARENA_SIZE] or [RAM // 4096 - 1]
        return seed % 2, [b"".join(pfn.to_bytes(4, "little") for pfn in pfns)], []
    if seed % 2:
        return 1, [header() + ethernet_frame(60 + seed % 100, seed)], []
    return 0, [], [len(header()) + 16 + seed % 96]  # frames may take several (MRG_RXBUF)


def host_event(rig: Rig, seed: int) -> object:
    kind, device = rig.kind, rig.device
    if kind == "console":
        return device.receive(f"in {seed}\n".encode())
    if kind == "balloon":
        return device.set_target(seed % 64)
    if kind == "net":
        rig.backend.incoming.append(header() + ethernet_frame(60 + seed % 200, seed))
        return device.backend_ready(True, False, False)
    return None


STEPS = st.lists(
    st.tuples(st.sampled_from(["request", "post", "kick", "collect", "host"]), st.integers(0, 999)),
    max_size=24,
)


def step(rig: Rig, action: str, seed: int) -> object:
    driver = rig.driver
    if action in ("request", "post"):
        queue, readable, writable = request(rig, seed)
        if not rig.device.running or queue not in driver.queues:
            return "not running"
        if len(driver.queues[queue].free) < len(readable) + len(writable):
            return "ring full"
        head, _ = driver.post_data(queue, readable, writable, indirect=bool(seed % 3 == 0))
        if action == "request":
            driver.kick(queue)
        return head
    if action == "kick":
        driver.kick(seed % rig.device.queue_count)
        return None
    if action == "collect":
        queue = seed % rig.device.queue_count
        return driver.collect(queue) if queue in driver.queues else None
    return host_event(rig, seed)


def observe(rig: Rig, action: str, seed: int) -> tuple:
    marks = len(rig.driver.interrupts), len(rig.output), len(rig.backend.sent)
    result = step(rig, action, seed)
    return (
        result,
        rig.driver.interrupts[marks[0] :],
        rig.output[marks[1] :],
        rig.backend.sent[marks[2] :],
        rig.device.status,
        zlib.crc32(rig.memory.read(0, RAM)),
    )


@pytest.fixture(autouse=True)
def predictable_entropy(monkeypatch):
    """virtio-rng's bytes depend only on how many are asked for, so two devices agree."""

    class Entropy:
        @staticmethod
        def getrandom(size: int) -> bytes:
            return bytes((size * 31 + i) & 0xFF for i in range(size))

    monkeypatch.setattr(rng_module, "os", Entropy)


@settings(max_examples=150)
@given(
    kind=st.sampled_from(["blk", "console", "rng", "balloon", "net"]),
    before=STEPS,
    after=STEPS,
)
def test_virtio_device(tmp_path_factory, kind, before, after):
    directory = tmp_path_factory.mktemp("virtio")
    original = Rig(kind, directory)
    original.driver.initialize(queue_size=8)
    copy_of = None
    try:
        for action, seed in before:
            step(original, action, seed)
        copy_of = original.twin(directory)
        copy_of.device.load_state(through_file(original.device.save_state()))
        assert copy_of.device.save_state() == original.device.save_state()
        for action, seed in after:
            assert observe(copy_of, action, seed) == observe(original, action, seed)
        if kind == "blk":
            assert copy_of.image.read_bytes() == original.image.read_bytes()
    finally:
        original.close()
        if copy_of is not None:
            copy_of.close()


def test_a_device_refuses_a_driver_that_uses_features_it_no_longer_offers(tmp_path):
    rig = Rig("console", tmp_path)
    rig.driver.initialize()
    state = through_file(rig.device.save_state())
    other = Rig("console", tmp_path)
    other.device.device_features &= ~(1 << 29)  # EVENT_IDX, which the driver took
    with pytest.raises(KvmletError, match="no longer offers"):
        other.device.load_state(state)


class Share:
    """A 9P server standing in for kvmlet.ninep.Server: a session is open or not."""

    def __init__(self, fids: int):
        self.fids = fids

    def stats(self):
        return {"fids": self.fids, "msize": 8192 if self.fids else 0}

    def reset(self) -> None:
        self.fids = 0

    def close(self) -> None:
        pass


def test_9p_is_saved_without_a_session_and_refused_with_one():
    memory = GuestMemory.anonymous([(0, RAM)])
    idle = Virtio9p(memory, "share", Share(0))
    fresh = Virtio9p(memory, "share", Share(0))
    fresh.load_state(through_file(idle.save_state()))
    assert fresh.save_state() == idle.save_state()
    with pytest.raises(KvmletError, match="share 'share' mounted \\(3 fids open\\)"):
        Virtio9p(memory, "share", Share(3)).save_state()
    memory.close()


# -- transports ------------------------------------------------------------------------------

MMIO_REGISTERS = [0x14, 0x24, 0x20, 0x30, 0x38, 0x44, 0x64, 0x70, 0x80, 0x84, 0x90, 0xA0, 0x100]
TRANSPORT_STEPS = st.lists(
    st.tuples(st.sampled_from(MMIO_REGISTERS), st.integers(0, 2**32 - 1), st.booleans()),
    max_size=30,
)


def mmio_rig():
    memory = GuestMemory.anonymous([(0, RAM)])
    line = RecordingIrqLine()
    return VirtioMmio(VirtioRng(memory), line), line, memory


def mmio_step(rig, register, value, write):
    transport, line, _ = rig
    mark = len(line.history)
    if register == 0x70 and write:
        value &= 0x0F  # status bits a driver sets (not FAILED, not NEEDS_RESET)
    if register in (0x80, 0x90, 0xA0):
        value = 0x2000 + (value & 0xF000)
    result = transport.write(register, 4, value) if write else transport.read(register, 4)
    return result, line.history[mark:], transport.device.status


@given(TRANSPORT_STEPS, TRANSPORT_STEPS)
def test_virtio_mmio(before, after):
    original = mmio_rig()
    for operation in before:
        mmio_step(original, *operation)
    copy_of = mmio_rig()
    copy_of[0].load_state(through_file(original[0].save_state()))
    assert copy_of[1].level == original[1].level  # a pending interrupt is raised again
    results = [(mmio_step(copy_of, *op), mmio_step(original, *op)) for op in after]
    assert all(mine == theirs for mine, theirs in results)
    for rig in (original, copy_of):
        rig[0].device.close()
        rig[2].close()


COMMON_FIELDS = [0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x16, 0x18, 0x1A, 0x1C, 0x20, 0x28, 0x30]
PCI_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["common", "msix", "isr", "notify", "signal"]),
        st.sampled_from(COMMON_FIELDS),
        st.integers(0, 2**32 - 1),
    ),
    max_size=30,
)


def pci_rig():
    memory = GuestMemory.anonymous([(0, RAM)])
    io, mmio = port_io_space(), mmio_space()
    bridge = PciHostBridge(io, mmio)
    line, msi = RecordingIrqLine(), RecordingMsiController()
    device = VirtioConsole(memory, lambda data: None)
    transport = VirtioPci(device, msi, line)
    bridge.attach(transport, slot=1)
    BarAllocator(PciWindow("io", 0x1000, 0x1000), PciWindow("m", 0xC000_0000, 1 << 24)).assign(
        transport
    )
    transport.config_write(0x04, 2, 0x6)  # memory decode, bus master
    return transport, line, msi, memory


def pci_step(rig, part, field, value):
    transport, line, msi, _ = rig
    marks = len(line.history), sum(len(v.fired) for v in msi.vectors.values())
    size = 2 if field in (0x10, 0x12, 0x16, 0x18, 0x1A, 0x1C) else 1 if field == 0x14 else 4
    if field == 0x14:
        value &= 0x0F
    elif field in (0x10, 0x16, 0x1A):  # vectors and queues: mostly ones that exist
        value %= 4
    result = None
    if part == "common":
        result = transport._common_write(field, size, value & ((1 << 8 * size) - 1))
    elif part == "msix":
        result = transport.msix.table_write((field % 3) * 16 + 12, 4, value & 1)
        transport.config_write(transport.msix.capability_offset + 2, 2, value & 0xC000)
    elif part == "isr":
        result = transport._isr_read(0, 1)
    elif part == "notify":
        result = transport._notify_write(4 * (field % 2), 2, 0)
    else:
        transport.device.signal_config()
    fired = sum(len(v.fired) for v in msi.vectors.values()) - marks[1]
    common = [transport._common_read(offset, 1) for offset in range(0x38)]
    msix = transport.msix.enabled, transport.intx_asserted
    return result, line.history[marks[0] :], fired, common, bytes(transport.config.data), msix


@given(PCI_STEPS, PCI_STEPS)
def test_virtio_pci(before, after):
    original = pci_rig()
    for operation in before:
        pci_step(original, *operation)
    copy_of = pci_rig()
    copy_of[0].load_state(through_file(original[0].save_state()))
    for operation in after:
        assert pci_step(copy_of, *operation) == pci_step(original, *operation)
    for rig in (original, copy_of):
        rig[0].device.close()
        rig[3].close()


def test_blk_images_keep_their_identity_in_a_snapshot(tmp_path):
    rig = Rig("blk", tmp_path)
    identity = rig.device.image.identity()
    stat = os.stat(rig.image)
    assert identity == {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "device": stat.st_dev,
        "inode": stat.st_ino,
    }
    rig.close()
