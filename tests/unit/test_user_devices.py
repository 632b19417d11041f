"""Placing the user's devices: the configuration and `--device`/`--module` syntax, free ports
and MMIO, interrupt lines, names, PCI slots; and the debug-exit port."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmlet.boot import BootModule
from kvmlet.bus import RamRegion, mmio_space, port_io_space
from kvmlet.bus.pci import BarAllocator, PciHostBridge, PciWindow
from kvmlet.bus.pci.msi import RecordingMsiController
from kvmlet.devices.debug_exit import DebugExit, exit_status
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.errors import KvmletError
from kvmlet.machine.config import (
    DeviceConfig,
    MachineConfig,
    parse_device_option,
    parse_module_option,
)
from kvmlet.machine.legacy import attach_debug_exit, attach_legacy_devices
from kvmlet.machine.user_devices import UserDevices
from kvmlet.memory import GuestMemory
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAILBOX = f"{EXAMPLES}/mailbox_device.py:Mailbox"
WATCHDOG = f"{EXAMPLES}/watchdog.py:Watchdog"
DIGEST = f"{EXAMPLES}/pci_digest.py:PciDigest"


# -- syntax ------------------------------------------------------------------------------------


def test_device_options_parse_into_configurations():
    assert parse_device_option("x.py:Box,port=0x510,irq=5,name=box,speed=3") == DeviceConfig(
        "x.py:Box", "port", 0x510, 5, None, "box", (("speed", "3"),)
    )
    assert parse_device_option("pkg.mod:Box,mmio=0xf1000000") == DeviceConfig.mmio(
        "pkg.mod:Box", 0xF100_0000
    )
    assert parse_device_option("x.py:Fn,pci=4") == DeviceConfig.pci("x.py:Fn", slot=4)
    assert parse_device_option("x.py:Fn,pci") == DeviceConfig.pci("x.py:Fn")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("box", "start with the model"),
        ("x.py:Box", "say where it goes"),
        ("x.py:Box,port=1,mmio=2", "give one of"),
        ("x.py:Box,port=lots", "'lots' is not a number"),
        ("x.py:Box,port=0x10000", "beyond the 64 KiB port space"),
        ("x.py:Box,pci=0", "slot 0 is not 1-31"),
        ("x.py:Box,pci,irq=5", "gets its address and interrupt from the bus"),
        ("x.py:Box,port=1,fast", "'fast' is not key=value"),
    ],
)
def test_bad_device_options_are_one_line(text, message):
    with pytest.raises(KvmletError, match=message):
        parse_device_option(text)


def test_module_options_and_the_multiboot_command_line():
    assert parse_module_option("initrd.img,root=/dev/vda rw") == BootModule(
        "initrd.img", "root=/dev/vda rw"
    )
    assert parse_module_option("data") == BootModule("data", "")
    with pytest.raises(KvmletError, match="name a file"):
        parse_module_option(",x")
    config = MachineConfig(kernel="/k/test.elf", params="exit=3")
    assert config.multiboot_command_line() == "/k/test.elf exit=3"
    assert MachineConfig(kernel="k").multiboot_command_line() == "k"
    with pytest.raises(KvmletError, match="--debug-exit port 0x10000"):
        MachineConfig(kernel="k", debug_exit_port=0x10000)
    with pytest.raises(KvmletError, match="needs an address"):
        MachineConfig(kernel="k", devices=(DeviceConfig("x.py:Box", "port"),))


# -- placement ---------------------------------------------------------------------------------


@pytest.fixture
def board():
    io, mmio = port_io_space(), mmio_space()
    attach_legacy_devices(io, lambda irq: RecordingIrqLine(), print, print)
    pci = PciHostBridge(io, mmio)
    memory = GuestMemory.anonymous([(0, 1 << 20)])
    mmio.root.add_subregion(0, RamRegion("ram", 1 << 20, memory.banks[0]))
    lines = {}
    devices = UserDevices(
        io,
        mmio,
        pci,
        memory,
        lambda irq: lines.setdefault(irq, RecordingIrqLine()),
        RecordingMsiController,
        BarAllocator(PciWindow("io", 0x1000, 0x1000), PciWindow("m", 0xC000_0000, 1 << 24)).assign,
        worker_mode="inline",
        taken_irqs=frozenset({5}),
    )
    devices.lines = lines
    yield devices
    devices.close()
    memory.close()


def test_port_and_mmio_devices_go_where_asked_with_their_lines(board):
    watchdog = board.add(DeviceConfig.port(WATCHDOG, 0x510, irq=11, timeout_ms="50"))
    mailbox = board.add(DeviceConfig.mmio(MAILBOX, 0xF100_0000, irq=10))
    assert board.io.view.lookup(0x51F).region.name == "watchdog"
    assert board.mmio.view.lookup(0xF100_001F).region.name == "mailbox"
    assert watchdog["timeout_ms"] == 50
    assert mailbox.context.irq is board.lines[10] and watchdog.context.irq is board.lines[11]
    assert [placed.name for placed in board] == ["watchdog", "mailbox"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (DeviceConfig.port(MAILBOX, 0x3F0), "overlaps com1"),
        (DeviceConfig.port(MAILBOX, 0xFFF0), "runs past the end of io"),
        (DeviceConfig.mmio(MAILBOX, 0x8000), "overlaps ram"),
        (DeviceConfig.port(MAILBOX, 0x600, irq=4), "interrupt line 4 is not free"),
        (DeviceConfig.port(MAILBOX, 0x600, irq=5), "interrupt line 5 is not free"),
        (DeviceConfig.port(MAILBOX, 0x600, irq=16), "interrupt line 16 is not free"),
        (DeviceConfig.port(MAILBOX, 0x600, name="com1"), "named 'com1' exists"),
        (DeviceConfig.port(DIGEST, 0x600), "failed to start: .*MSI needs"),
        (DeviceConfig.port(f"{EXAMPLES}/pci_digest.py:VENDOR_ID", 0x600), "no callable"),
        (DeviceConfig.pci(MAILBOX), "must be a kvmlet.devices.PciFunction"),
        (DeviceConfig.port(f"{EXAMPLES}/nope.py:X", 0x600), "does not exist"),
        (DeviceConfig.port(f"{EXAMPLES}/mailbox_device.py:Nope", 0x600), "no callable 'Nope'"),
        (DeviceConfig.port("kvmlet.nope:X", 0x600), "cannot import kvmlet.nope"),
        (DeviceConfig.port(MAILBOX, 0x600, colour="red"), "its model failed to start"),
    ],
)
def test_placements_that_cannot_work_are_one_line(board, config, message):
    with pytest.raises(KvmletError, match=message):
        board.add(config)


def test_names_are_unique_and_lines_are_not_shared(board):
    board.add(DeviceConfig.port(MAILBOX, 0x600, irq=10))
    second = board.add(DeviceConfig.port(MAILBOX, 0x700))
    assert second.context.name == "mailbox2"
    with pytest.raises(KvmletError, match="interrupt line 10 is not free"):
        board.add(DeviceConfig.port(MAILBOX, 0x800, irq=10))


def test_pci_functions_take_free_slots_with_bars_and_the_slots_line(board):
    first = board.add(DeviceConfig.pci(DIGEST))
    second = board.add(DeviceConfig.pci(DIGEST, slot=7))
    functions = board.pci.bus.functions
    assert functions[1 << 3] is first and functions[7 << 3] is second
    assert first.bar_address(0) == 0xC000_0000 and first.command & 0x2
    assert first.config.get(0x3C, 1) == 16 and second.config.get(0x3C, 1) == 22
    assert first.context.irq is board.lines[16] and first.context.msi is not None
    spec = board.placed[0].spec()
    assert spec["bars"] == {"0": 0xC000_0000} and spec["slot"] == 1 and spec["command"] == 2
    with pytest.raises(KvmletError, match="slot 7 is taken"):
        board.add(DeviceConfig.pci(DIGEST, slot=7))


# -- debug exit --------------------------------------------------------------------------------


def test_debug_exit_status_and_port():
    assert [exit_status(v) for v in (0, 1, 21, 0x7F, 0x80, 0x1234)] == [1, 3, 43, 0xFF, 1, 0x69]
    exits = []
    io = port_io_space()
    attach_debug_exit(io, 0x501, lambda value, status: exits.append((value, status)))
    io.write(0x501, 1, 3)
    io.write(0x501, 4, 0x0102_0304)
    assert exits == [(3, 7), (0x0102_0304, 9)]
    assert io.read(0x501, 4) == 0
    attach_legacy_devices(io, lambda irq: RecordingIrqLine(), print, print)
    with pytest.raises(KvmletError, match="overlaps debug-exit"):
        attach_debug_exit(io, 0x4FF, print)
    assert DebugExit(print).read(0, 1) == 0


def test_a_guest_chosen_status_is_the_stops_exit_status():
    assert GuestStop(StopReason.DEBUG_EXIT, "0x15", 0, 43).exit_status == 43
    assert GuestStop(StopReason.RESET).exit_status == 0
    assert GuestStop(StopReason.WATCH_FAILED).exit_status == 7


def test_a_model_of_the_wrong_kind_for_its_place_is_one_line(board, tmp_path):
    models = tmp_path / "models.py"
    models.write_text("def plain(context):\n    return object()\n")
    with pytest.raises(KvmletError, match=r"a port device must be a kvmlet\.devices\.Device"):
        board.add(DeviceConfig.port(f"{models}:plain", 0x600))
    with pytest.raises(KvmletError, match=r"must be a kvmlet\.devices\.PciFunction"):
        board.add(DeviceConfig.pci(f"{models}:plain"))


def test_a_recording_names_a_model_file_by_its_absolute_path(board, monkeypatch):
    monkeypatch.chdir(EXAMPLES)
    board.add(DeviceConfig.port("mailbox_device.py:Mailbox", 0x600))
    board.add(DeviceConfig.port(MAILBOX, 0x700))
    specs = [placed.spec()["model"] for placed in board]
    assert specs == [MAILBOX, MAILBOX]
