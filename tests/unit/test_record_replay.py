"""Record and replay without KVM: a board wired as a recording machine is (legacy devices, the
host bridge, user devices journaling through their context), driven as a guest would, then
replayed; and each kind of divergence a changed model can show."""

from __future__ import annotations

import json
import threading
import time
import zlib
from pathlib import Path

import pytest

from kvmlet.boot.memory_map import MemoryMap
from kvmlet.bus import IoRegion, mmio_space, port_io_space
from kvmlet.bus.pci import BarAllocator, PciDevice, PciWindow
from kvmlet.bus.pci.msi import RecordingMsiController
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.devices.journal import MAGIC
from kvmlet.errors import KvmletError
from kvmlet.machine.config import DeviceConfig
from kvmlet.machine.legacy import (
    attach_debug_exit,
    attach_legacy_devices,
    attach_pci_host_bridge,
    reserve_in_kernel_devices,
)
from kvmlet.machine.record import Recorder
from kvmlet.machine.replay import replay
from kvmlet.machine.user_devices import UserDevices
from kvmlet.memory import GuestMemory

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAILBOX = f"{EXAMPLES}/mailbox_device.py:Mailbox"
DIGEST = f"{EXAMPLES}/pci_digest.py:PciDigest"
MAILBOX_AT = 0xF100_0000
RAM_SIZE = 64 << 20


class Scratch:
    def read(self, offset, size):
        return 0x5A

    def write(self, offset, size, value):
        pass


class RecordedBoard:
    """What Machine wires when it records, without KVM (workers on their threads)."""

    def __init__(self, path: Path, devices: tuple[DeviceConfig, ...] = ()):
        self.recorder = Recorder(path)
        self.io, self.mmio = port_io_space(), mmio_space()
        self.recorder.attach(self.io, self.mmio)
        self.legacy = attach_legacy_devices(
            self.io,
            lambda irq: RecordingIrqLine(),
            lambda data: None,
            lambda: None,
            self.recorder.clock("cmos-rtc", lambda: 1_700_000_000.25),
        )
        reserve_in_kernel_devices(self.io, self.mmio)
        attach_debug_exit(self.io, 0x501, lambda value, status: None)
        self.pci = attach_pci_host_bridge(self.io, self.mmio, MemoryMap(RAM_SIZE))
        self.pci.attach(PciDevice("virtio-net", 0x1AF4, 0x1041, 0x020000), slot=1)
        self.mmio.root.add_subregion(0xF000_0000, IoRegion("virtio-mmio0", 0x100, Scratch()))
        self.memory = GuestMemory.anonymous([(0, 1 << 20)])
        bars = BarAllocator(PciWindow("io", 0x1000, 0x1000), PciWindow("m", 0xC000_0000, 1 << 24))
        self.devices = UserDevices(
            self.io,
            self.mmio,
            self.pci,
            self.memory,
            lambda irq: RecordingIrqLine(),
            RecordingMsiController,
            bars.assign,
            journal=self.recorder.journal,
        )
        for config in devices:
            self.add(config)
        self.recorder.begin(
            {
                "memory": RAM_SIZE,
                "debug_exit_port": 0x501,
                "devices": [placed.spec() for placed in self.devices],
                "pci_functions": {str(n): f.name for n, f in self.pci.bus.functions.items()},
            }
        )
        self.devices.start()

    def settle(self) -> None:
        """Wait for every job the guest started (a guest would poll)."""
        for placed in self.devices:
            for worker in placed.context.workers:
                assert worker.drain()

    def add(self, config: DeviceConfig):
        model = self.devices.add(config)
        placed = self.devices.placed[-1]
        regions = {placed.name} | {f"{placed.name}-bar{i}" for i in range(6)}
        self.recorder.device_added(placed, regions)
        return model

    def config(self, slot: int, offset: int, value: int | None = None) -> int | None:
        self.io.write(0xCF8, 4, 0x8000_0000 | slot << 11 | offset)
        if value is None:
            return self.io.read(0xCFC, 4)
        self.io.write(0xCFC, 4, value)
        return None

    def close(self):
        self.devices.close()
        self.recorder.close()
        self.memory.close()


def mailbox_session(board: RecordedBoard, text: bytes = b"hello") -> None:
    """The guest's side: COM1, the RTC, unassigned ports, virtio, then a mailbox job."""
    io, mmio = board.io, board.mmio
    io.write(0x3F8, 1, ord("h"))
    io.write(0x70, 1, 0x00)
    io.read(0x71, 1)  # the RTC's seconds: a recorded clock reading
    io.read(0x99, 1)
    board.config(1, 0)  # the virtio function's ID: skipped in the replay
    board.config(0, 0)  # the host bridge's: replayed
    mmio.write(0xF000_0000, 4, 1)  # a virtio-mmio access: skipped
    board.memory.write(0x4000, text)
    mmio.write(MAILBOX_AT + 0x04, 4, 0x4000)
    mmio.write(MAILBOX_AT + 0x08, 4, len(text))
    mmio.write(MAILBOX_AT + 0x0C, 4, 2)
    board.settle()
    assert mmio.read(MAILBOX_AT + 0x10, 4) == 2
    mmio.read(MAILBOX_AT + 0x14, 4)
    mmio.write(MAILBOX_AT + 0x10, 4, 2)


def record(tmp_path: Path, session=mailbox_session, devices=None) -> Path:
    path = tmp_path / "run.rec"
    board = RecordedBoard(path, devices or (DeviceConfig.mmio(MAILBOX, MAILBOX_AT, irq=10),))
    try:
        session(board)
    finally:
        board.close()
    return path


def with_model(path: Path, source: str, name: str = "Mailbox") -> None:
    """Point the recording's first device at a model written from `source`."""
    model = path.parent / f"changed_{abs(hash(source))}.py"
    model.write_text(source)
    data = path.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + length])
    header["devices"][0]["model"] = f"{model}:{name}"
    encoded = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(encoded).to_bytes(4, "little") + encoded + data[12 + length :])


def test_a_recording_replays_without_divergence_skipping_what_it_cannot_rebuild(tmp_path):
    result = replay(record(tmp_path))
    assert result.divergence is None, result.summary()
    assert result.skipped == {"pci-conf1": 1, "virtio-mmio0": 1}
    assert result.accesses == 13  # 4 legacy, 3 conf1, 6 to the mailbox
    assert result.summary() == (
        "replayed 13 accesses (2 to devices a replay does not rebuild skipped: pci-conf1 1, "
        "virtio-mmio0 1); no divergence"
    )


SOURCE = (EXAMPLES / "mailbox_device.py").read_text()


@pytest.mark.parametrize(
    ("change", "divergence"),
    [
        (
            ("return zlib.crc32(data)", "return zlib.crc32(data) ^ 1"),
            f"read of 4 bytes at {MAILBOX_AT + 0x14:#x}",
        ),
        (("        self.update_irq()\n", "        pass\n"), "did not set its interrupt line to 1"),
        (("data.upper()", "data.lower()"), "wrote 68656c6c6f (5 bytes)"),
        (("self.context.memory.read(address, length)", "self.context.memory.read(address, 1)"),
         "read 1 bytes of guest memory at 0x4000; in the run it did read 5 bytes"),
        (("    def work(self, command, address, length):",
          "    def work(self, command, address, length):\n        self.context.clock()"),
         "mailbox (job 1) read the clock; in the run it did read 5 bytes"),
        (("MAGIC = 0x584F424D", "MAGIC = 0x584F424E"), None),  # never read: no divergence
    ],
)  # fmt: skip
def test_a_changed_model_diverges_where_it_first_acts_differently(tmp_path, change, divergence):
    path = record(tmp_path)
    with_model(path, SOURCE.replace(*change))
    result = replay(path)
    if divergence is None:
        assert result.divergence is None
    else:
        assert divergence in result.divergence, result.divergence


def test_a_job_that_no_longer_interrupts_diverges_at_its_completion(tmp_path):
    path = record(tmp_path)
    with_model(path, SOURCE.replace("        self.update_irq()\n", "        pass\n"))
    result = replay(path)
    assert "mailbox (job 1) did not set its interrupt line to 1" in result.divergence
    assert result.accesses == 10  # the accesses after the job's completion were not made


def test_an_access_that_no_longer_interrupts_diverges_there(tmp_path):
    path = record(tmp_path)
    with_model(path, SOURCE.replace(", on_write=self.update_irq)", ")"))
    result = replay(path)
    assert result.divergence == "mailbox did not set its interrupt line to 0 as in the run"
    assert result.accesses == 12  # the W1C write, the last access, is where it diverged


def test_a_device_placed_elsewhere_diverges_at_its_first_access(tmp_path):
    path = record(tmp_path)
    data = path.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + length])
    header["devices"][0]["address"] = MAILBOX_AT + 0x1000
    encoded = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(encoded).to_bytes(4, "little") + encoded + data[12 + length :])
    result = replay(path)
    assert f"write of 4 bytes at {MAILBOX_AT + 4:#x}" in result.divergence
    assert "reached nothing in the replay, mailbox in the run" in result.divergence


def test_a_job_the_run_never_completed_is_no_divergence(tmp_path):
    def session(board):
        mailbox = board.devices.placed[0].model
        release = threading.Event()
        work = mailbox.work
        mailbox.work = lambda *job: (work(*job), release.wait(10))[0]
        board.memory.write(0x4000, b"abc")
        board.mmio.write(MAILBOX_AT + 0x04, 4, 0x4000)
        board.mmio.write(MAILBOX_AT + 0x08, 4, 3)
        board.mmio.write(MAILBOX_AT + 0x0C, 4, 1)
        for _ in range(100):  # the job read guest memory, then waits: the run ends here
            if board.recorder.writer.events >= 4:  # 3 accesses, the read of the buffer
                break
            time.sleep(0.01)
        board.recorder.file.flush()
        board.recorder.close()
        release.set()

    path = tmp_path / "run.rec"
    board = RecordedBoard(path, (DeviceConfig.mmio(MAILBOX, MAILBOX_AT, irq=10),))
    try:
        session(board)
    finally:
        board.devices.close()
        board.memory.close()
    result = replay(path)
    assert result.divergence is None, result.summary()
    assert result.accesses == 3


def test_a_job_the_replay_never_submits_is_a_divergence(tmp_path):
    path = record(tmp_path)
    with_model(path, SOURCE.replace("self.worker.submit(", "(lambda *_: None)("))
    result = replay(path)
    assert "mailbox completed job 1 in the run, but never submitted it" in result.divergence


def test_a_hot_added_pci_function_replays_at_the_bars_it_had(tmp_path):
    def session(board):
        board.config(2, 0)  # the slot is empty: all-ones, in the run and in the replay
        digest = board.add(DeviceConfig.pci(DIGEST))
        assert board.config(2, 0) == 0x0001_6B76
        bar = digest.bar_address(0)
        board.memory.write(0x100, b"x")
        board.mmio.write(bar + 0x00, 8, 0x100)
        board.mmio.write(bar + 0x08, 4, 1)
        board.mmio.write(bar + 0x10, 8, 0x200)
        board.mmio.write(bar + 0x0C, 4, 1)
        board.settle()
        board.mmio.write(bar + 0x18, 4, 2)

    path = record(tmp_path, session)
    result = replay(path)
    assert result.divergence is None, result.summary()
    assert result.accesses == 9  # 2 conf1 before the hot-add, 2 after, 5 on the BAR


def test_a_device_whose_answer_changes_is_named_with_the_access(tmp_path):
    def session(board):
        board.io.read(0x71, 1)

    path = record(tmp_path, session)
    data = bytearray(path.read_bytes())
    data[-8] ^= 1  # the RTC's recorded answer
    path.write_bytes(bytes(data))
    result = replay(path)
    assert "io read of 1 bytes at 0x71" in result.divergence
    assert "cmos-rtc answered" in result.divergence


def test_a_crc_of_the_text_is_what_the_recording_holds(tmp_path):
    """The recording is of the real job: its result register read gives the CRC."""
    values = []

    def session(board):
        mailbox_session(board)
        values.append(board.mmio.read(MAILBOX_AT + 0x14, 4))

    replay(record(tmp_path, session))
    assert values == [zlib.crc32(b"hello")]


def test_unreadable_or_damaged_recordings_are_one_line(tmp_path):
    with pytest.raises(KvmletError, match="cannot read record file"):
        replay(tmp_path / "missing.rec")
    path = record(tmp_path)
    data = path.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + length])
    del header["devices"][0]["at"]
    encoded = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(encoded).to_bytes(4, "little") + encoded + data[12 + length :])
    with pytest.raises(KvmletError, match="is incomplete"):
        replay(path)
