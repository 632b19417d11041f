"""Every legacy and PCI device's state round trip: after any history, a device loaded with
another's saved state (through the snapshot file's encoding) answers every later access as
that device does.

Hypothesis writes the histories: `before` runs on the original, its state is saved, encoded,
decoded and loaded into a fresh device, then `after` runs on both and every answer, output
and interrupt change must agree.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.bus import mmio_space, port_io_space
from kvmlet.bus.pci import BarAllocator, BarKind, PciHostBridge, PciWindow
from kvmlet.bus.pci.msi import RecordingMsiController
from kvmlet.devices.context import DeviceContext, RegisterDevice
from kvmlet.devices.i8042 import I8042Controller
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.devices.pci_function import PciFunction
from kvmlet.devices.post import PostCodeSink
from kvmlet.devices.registers import Register, RegisterBlock
from kvmlet.devices.rtc import CmosRtc
from kvmlet.devices.serial import Uart16550
from kvmlet.snapshot import codec


def through_file(state):
    """A saved state as a snapshot file carries it."""
    return codec.decode(codec.encode(state))


BYTE = st.integers(0, 255)


def replay(device, operations, answer) -> list:
    return [answer(device, operation) for operation in operations]


# -- 16550A UART ----------------------------------------------------------------------------

UART_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 7), BYTE),
        st.tuples(st.just("read"), st.integers(0, 7)),
        st.tuples(st.just("receive"), st.binary(max_size=40)),
    ),
    max_size=40,
)


def make_uart():
    line, output = RecordingIrqLine(), []
    return Uart16550(line, output.append, rx_capacity=16), line, output


def uart_step(rig, operation):
    uart, line, output = rig
    marks = len(line.history), len(output)
    if operation[0] == "write":
        result = uart.write(operation[1], 1, operation[2])
    elif operation[0] == "read":
        result = uart.read(operation[1], 1)
    else:
        result = uart.receive(operation[1])
    return result, line.history[marks[0] :], output[marks[1] :], uart.irq_level


@given(UART_OPERATIONS, UART_OPERATIONS)
def test_uart(before, after):
    original = make_uart()
    replay(original, before, uart_step)
    copy = make_uart()
    copy[0].load_state(through_file(original[0].save_state()))
    assert replay(copy, after, uart_step) == replay(original, after, uart_step)
    assert copy[0].save_state() == original[0].save_state()


@given(UART_OPERATIONS)
def test_a_restored_uart_tells_whether_thr_writes_may_be_coalesced(before):
    original = make_uart()
    replay(original, before, uart_step)
    copy, heard = make_uart()[0], []
    copy.on_deferrable_change = heard.append
    copy.load_state(through_file(original[0].save_state()))
    assert heard == [original[0].thr_writes_deferrable]


# -- i8042 ----------------------------------------------------------------------------------

I8042_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from([0, 4]), BYTE),
        st.tuples(st.just("write"), st.sampled_from([0, 4]), st.sampled_from([0x20, 0x60, 0xD1])),
        st.tuples(st.just("read"), st.sampled_from([0, 4])),
        st.tuples(st.just("ctrl-alt-del")),
    ),
    max_size=40,
)


def make_i8042():
    keyboard, aux, resets = RecordingIrqLine(), RecordingIrqLine(), []
    controller = I8042Controller(lambda: resets.append(1), kbd_irq=keyboard, aux_irq=aux)
    return controller, keyboard, aux, resets


def i8042_step(rig, operation):
    controller, keyboard, aux, resets = rig
    marks = len(keyboard.history), len(aux.history), len(resets)
    if operation[0] == "write":
        result = controller.write(operation[1], 1, operation[2])
    elif operation[0] == "read":
        result = controller.read(operation[1], 1)
    else:
        result = controller.press_ctrl_alt_del()
    return result, keyboard.history[marks[0] :], aux.history[marks[1] :], len(resets) - marks[2]


@given(I8042_OPERATIONS, I8042_OPERATIONS)
def test_i8042(before, after):
    original = make_i8042()
    replay(original, before, i8042_step)
    copy = make_i8042()
    copy[0].load_state(through_file(original[0].save_state()))
    assert replay(copy, after, i8042_step) == replay(original, after, i8042_step)


# -- CMOS RTC -------------------------------------------------------------------------------

RTC_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("index"), st.integers(0, 0x7F) | st.sampled_from([0, 2, 4, 0xB])),
        st.tuples(st.just("data"), BYTE),
        st.tuples(st.just("read")),
        st.tuples(st.just("tick"), st.floats(0, 100_000)),
    ),
    max_size=40,
)


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.25

    def __call__(self):
        return self.now


def rtc_step(rig, operation):
    rtc, clock = rig
    if operation[0] == "index":
        return rtc.write(0, 1, operation[1])
    if operation[0] == "data":
        return rtc.write(1, 1, operation[1])
    if operation[0] == "tick":
        clock.now += operation[1]
        return None
    return rtc.read(1, 1)


@given(RTC_OPERATIONS, RTC_OPERATIONS)
def test_rtc(before, after):
    clock = Clock()
    original = (CmosRtc(clock), clock)
    replay(original, before, rtc_step)
    saved = through_file(original[0].save_state())
    copy_clock = Clock()
    copy_clock.now = clock.now  # the host's clock, shared by both (it went on meanwhile)
    copy = (CmosRtc(copy_clock), copy_clock)
    copy[0].load_state(saved)
    assert replay(copy, after, rtc_step) == replay(original, after, rtc_step)


@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 2**32 - 1)), max_size=10))
def test_post_code_sink(writes):
    original = PostCodeSink()
    for size, value in writes:
        original.write(0, size, value)
    copy = PostCodeSink()
    copy.load_state(through_file(original.save_state()))
    assert copy.last_code == original.last_code


# -- PCI: the host bridge, a function's header, BARs, MSI-X, MSI -----------------------------


class ScratchFunction(PciFunction):
    """A user's PCI function: two register BARs, an I/O BAR, MSI, INTx."""

    def __init__(self, context):
        super().__init__(context, vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000, msi=True)
        self.block = RegisterBlock(16, [Register("a", 0), Register("b", 4, w1c=0xF)])
        self.add_register_bar(0, self.block)
        self.add_register_bar(2, RegisterBlock(8, [Register("c", 0, width=8)]), BarKind.MEM64)
        self.add_register_bar(4, RegisterBlock(4, [Register("d", 0)]), BarKind.IO)


def conf1_address(register: int, slot: int = 1) -> int:
    return 0x8000_0000 | slot << 11 | register & 0xFC


PCI_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("select"), st.integers(0, 255), st.sampled_from([0, 1, 2])),
        st.tuples(st.just("select"), st.sampled_from([0x04, 0x10, 0x18, 0x20, 0x40, 0x50])),
        st.tuples(st.just("data"), st.integers(0, 3), st.sampled_from([1, 2, 4]), st.integers()),
        st.tuples(st.just("read"), st.integers(0, 3), st.sampled_from([1, 2, 4])),
        st.tuples(st.just("bar"), st.sampled_from(["a", "b", "c", "d"]), st.integers()),
        st.tuples(st.just("irq"), st.booleans()),
        st.tuples(st.just("move"), st.sampled_from([0x10, 0x18, 0x20]), st.integers(1, 0xFFF)),
        st.tuples(st.just("command"), st.integers(0, 7)),
    ),
    max_size=50,
)


def make_pci():
    io, mmio = port_io_space(), mmio_space()
    bridge = PciHostBridge(io, mmio)
    line, msi = RecordingIrqLine(), RecordingMsiController()
    function = ScratchFunction(DeviceContext("scratch", irq=line, msi=msi, worker_mode="inline"))
    bridge.attach(function, slot=1)
    BarAllocator(PciWindow("io", 0x1000, 0x1000), PciWindow("mem", 0xC000_0000, 1 << 24)).assign(
        function
    )
    return bridge, function, io, mmio, line, msi


def pci_step(rig, operation):
    bridge, function, io, mmio, line, msi = rig
    marks = len(line.history), len(msi.vectors[0].updates), len(msi.vectors[0].fired)
    kind = operation[0]
    if kind == "select":
        slot = operation[2] if len(operation) > 2 else 1
        result = bridge.conf1.write(0, 4, conf1_address(operation[1], slot))
    elif kind == "data":
        offset, size = operation[1], operation[2]
        if offset % size:
            offset = 0
        result = bridge.conf1.write(4 + offset, size, operation[3] & ((1 << 8 * size) - 1))
    elif kind == "read":
        offset, size = operation[1] - operation[1] % operation[2], operation[2]
        result = bridge.conf1.read(4 + offset, size)
    elif kind == "move":  # the guest moves a BAR (an I/O BAR takes a port number)
        address = operation[2] << (4 if operation[1] == 0x20 else 16)
        bridge.conf1.write(0, 4, conf1_address(operation[1]))
        result = bridge.conf1.write(4, 4, address & 0xFFFF_FFFF)
    elif kind == "command":
        bridge.conf1.write(0, 4, conf1_address(0x04))
        result = bridge.conf1.write(4, 2, operation[1])
    elif kind == "bar":
        block = function.block if operation[1] in "ab" else None
        if block is not None:
            block.write(0 if operation[1] == "a" else 4, 4, operation[2] & 0xFFFF_FFFF)
        result = function.block.read(0, 8)
    else:
        result = function.raise_interrupt() if operation[1] else function.lower_interrupt()
    mapped = [(r.start, r.end, r.region.name) for r in (*io.view.assigned(), *mmio.view.assigned())]
    return (
        result,
        mapped,
        line.history[marks[0] :],
        msi.vectors[0].updates[marks[1] :],
        len(msi.vectors[0].fired) - marks[2],
    )


@given(PCI_OPERATIONS, PCI_OPERATIONS)
def test_pci_host_bridge_and_function(before, after):
    original = make_pci()
    replay(original, before, pci_step)
    copy = make_pci()
    copy[0].load_state(through_file(original[0].save_state()))
    copy[1].load_state(through_file(original[1].save_state()))
    # The MSI vector is programmed as the capability says (the machine's GSI route).
    address, data = original[1].msi.message()
    assert copy[5].vectors[0].updates[-1] == (address, data, not original[1].msi.enabled)
    assert replay(copy, after, pci_step) == replay(original, after, pci_step)


@pytest.mark.parametrize("first, second", [(0x18, 0x10), (0x10, 0x18)])
def test_overlapping_bars_resolve_after_restore_as_before(first, second):
    """The guest moves two BARs onto one address: the one mapped there first keeps decoding,
    and a restored copy must agree, whatever the BARs' index order."""
    original = make_pci()
    for register in (first, second):
        pci_step(original, ("move", register, 1))
    copy = make_pci()
    copy[0].load_state(through_file(original[0].save_state()))
    copy[1].load_state(through_file(original[1].save_state()))

    def winner(rig):
        return next(r.region.name for r in rig[3].view.assigned() if r.start == 0x10000)

    assert winner(original) == f"scratch-bar{(first - 0x10) // 4}"
    assert winner(copy) == winner(original)


# -- the user's register devices -----------------------------------------------------------


class Counter(RegisterDevice):
    def __init__(self, context):
        super().__init__(
            context,
            8,
            [Register("count", 0, on_write=self.bump), Register("status", 4, w1c=0x3)],
        )

    def bump(self, value):
        self.set_bits("status", 1 << (value & 1))


@given(st.lists(st.tuples(st.sampled_from([0, 4]), st.integers(0, 2**32 - 1)), max_size=20))
def test_register_device(writes):
    original = Counter(DeviceContext("counter"))
    for offset, value in writes:
        original.write(offset, 4, value)
    copy = Counter(DeviceContext("counter"))
    copy.load_state(through_file(original.save_state()))
    for offset, value in writes:
        for device in (original, copy):
            device.write(offset, 4, value)
        assert copy.read(0, 8) == original.read(0, 8)
