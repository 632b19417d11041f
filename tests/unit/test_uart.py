"""The 16550A model against what Linux's 8250 driver does to it, plus fuzzed register access."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.devices.serial import (
    IER_DLM,
    IIR_FCR,
    LCR,
    LEGACY_SERIAL_PORTS,
    LSR,
    MCR,
    MSR,
    RBR_THR_DLL,
    SCR,
    Uart16550,
)


def make_uart(**kwargs):
    irq = RecordingIrqLine()
    output: list[bytes] = []
    uart = Uart16550(irq, output.append, **kwargs)
    return uart, irq, output


def linux_startup(uart: Uart16550) -> None:
    """What serial8250_do_startup leaves behind: FIFOs on, 8N1, OUT2|DTR|RTS, RX interrupts."""
    uart.write(IIR_FCR, 1, 0x01)
    uart.write(IIR_FCR, 1, 0x07)
    uart.write(IIR_FCR, 1, 0x00)
    uart.write(IIR_FCR, 1, 0x81)  # FIFO on, RX trigger 8
    uart.write(LCR, 1, 0x03)
    uart.write(MCR, 1, 0x0B)
    uart.write(IER_DLM, 1, 0x05)


def test_legacy_port_table_matches_pc_layout():
    assert [(p.base, p.irq) for p in LEGACY_SERIAL_PORTS] == [
        (0x3F8, 4),
        (0x2F8, 3),
        (0x3E8, 4),
        (0x2E8, 3),
    ]


def test_linux_8250_autoconfig_detects_16550a():
    uart, _, _ = make_uart()
    # IER scratch test.
    saved_ier = uart.read(IER_DLM, 1)
    uart.write(IER_DLM, 1, 0x00)
    assert uart.read(IER_DLM, 1) & 0x0F == 0
    uart.write(IER_DLM, 1, 0x0F)
    assert uart.read(IER_DLM, 1) & 0x0F == 0x0F
    uart.write(IER_DLM, 1, saved_ier)
    # Loopback test: MCR = LOOP | OUT2 | RTS -> MSR shows DCD and CTS only.
    saved_mcr = uart.read(MCR, 1)
    saved_lcr = uart.read(LCR, 1)
    uart.write(MCR, 1, 0x1A)
    assert uart.read(MSR, 1) & 0xF0 == 0x90
    uart.write(MCR, 1, saved_mcr)
    # EFR probe (LCR 0xBF makes offset 2 the EFR on later chips; a 16550A sees an FCR write).
    uart.write(LCR, 1, 0xBF)
    uart.write(IIR_FCR, 1, 0x00)
    uart.write(LCR, 1, 0x00)
    # FIFO detection: IIR bits 7:6 == 0b11 means 16550A.
    uart.write(IIR_FCR, 1, 0x01)
    assert uart.read(IIR_FCR, 1) >> 6 == 0b11
    # Not an ST16C650 (EFR under DLAB reads nonzero) and not a 16750 (no 64-byte FIFO bit 5).
    uart.write(LCR, 1, 0x80)
    assert uart.read(IIR_FCR, 1) != 0
    uart.write(LCR, 1, 0x00)
    status1 = uart.read(IIR_FCR, 1) >> 5
    uart.write(IIR_FCR, 1, 0x21)
    uart.write(LCR, 1, 0x80)
    uart.write(IIR_FCR, 1, 0x21)
    status2 = uart.read(IIR_FCR, 1) >> 5
    assert (status1, status2) != (6, 7)
    # Not an XScale UART: IER bit 6 does not stick.
    uart.write(LCR, 1, 0x00)
    uart.write(IER_DLM, 1, 0x40)
    assert uart.read(IER_DLM, 1) & 0x40 == 0
    uart.write(LCR, 1, saved_lcr)
    # Scratch register holds a pattern (autoconfig_8250 path, also used by some probes).
    uart.write(SCR, 1, 0xA5)
    assert uart.read(SCR, 1) == 0xA5
    assert uart.read(LSR, 1) != 0xFF


def test_divisor_latch_is_behind_dlab():
    uart, _, output = make_uart()
    uart.write(LCR, 1, 0x83)
    uart.write(RBR_THR_DLL, 1, 0x01)
    uart.write(IER_DLM, 1, 0x00)
    assert (uart.read(RBR_THR_DLL, 1), uart.read(IER_DLM, 1)) == (0x01, 0x00)
    uart.write(LCR, 1, 0x03)
    assert uart.read(IER_DLM, 1) == 0
    assert output == []
    uart.write(RBR_THR_DLL, 1, ord("A"))
    assert output == [b"A"]
    assert uart.transmitted_bytes == 1


def test_thre_interrupt_on_enable_cleared_by_iir_read_and_rearmed():
    uart, irq, _ = make_uart()
    uart.write(MCR, 1, 0x08)  # OUT2 gates the interrupt onto the line
    assert not irq.level
    uart.write(IER_DLM, 1, 0x02)
    assert irq.level
    assert uart.read(IIR_FCR, 1) == 0x02
    assert not irq.level
    assert uart.read(IIR_FCR, 1) == 0x01
    # Linux's TXEN test: disabling then re-enabling ETBEI raises it again.
    uart.write(IER_DLM, 1, 0x00)
    uart.write(IER_DLM, 1, 0x02)
    assert uart.read(LSR, 1) & 0x60 == 0x60
    assert uart.read(IIR_FCR, 1) == 0x02


def test_thr_write_acknowledges_and_the_empty_thr_interrupts_again():
    uart, irq, output = make_uart()
    uart.write(MCR, 1, 0x08)
    uart.write(IER_DLM, 1, 0x02)
    uart.read(IIR_FCR, 1)
    assert not irq.level
    uart.write(RBR_THR_DLL, 1, ord("x"))
    assert output == [b"x"]
    assert irq.level
    uart.write(IER_DLM, 1, 0x00)
    assert not irq.level


def test_out2_gates_the_interrupt_line():
    uart, irq, _ = make_uart()
    uart.write(IER_DLM, 1, 0x02)
    assert uart.read(IIR_FCR, 1) & 0x0F == 0x02
    assert irq.history == []
    uart.write(IER_DLM, 1, 0x00)
    uart.write(IER_DLM, 1, 0x02)
    uart.write(MCR, 1, 0x08)
    assert irq.level


def test_received_data_interrupt_and_priorities():
    uart, irq, _ = make_uart()
    linux_startup(uart)
    uart.write(IER_DLM, 1, 0x07)
    assert uart.read(IIR_FCR, 1) == 0xC2  # THR empty while nothing else is pending
    assert uart.receive(b"hi") == 2
    assert irq.level
    assert uart.read(IIR_FCR, 1) == 0xCC  # below the trigger level of 8: character timeout
    assert uart.read(LSR, 1) & 0x01
    assert uart.read(RBR_THR_DLL, 1) == ord("h")
    assert uart.read(RBR_THR_DLL, 1) == ord("i")
    assert uart.read(LSR, 1) & 0x01 == 0
    assert not irq.level
    assert uart.receive(b"12345678") == 8
    assert uart.read(IIR_FCR, 1) == 0xC4


def test_receive_fifo_is_capped_and_reports_room():
    space_events = []
    irq = RecordingIrqLine()
    uart = Uart16550(irq, lambda b: None, rx_capacity=4, on_rx_space=lambda: space_events.append(1))
    assert uart.receive(b"ab") == 1  # FIFOs disabled: one holding register
    linux_startup(uart)  # clearing the FIFOs discards the byte and reports room
    assert space_events == [1]
    assert uart.receive(b"abcdef") == 4
    assert uart.rx_pending == 4
    assert not uart.wants_input
    assert uart.receive(b"z") == 0
    assert uart.read(RBR_THR_DLL, 1) == ord("a")
    assert space_events == [1, 1]
    assert uart.wants_input
    assert uart.read(RBR_THR_DLL, 1) == ord("b")
    assert space_events == [1, 1]  # reported once per refusal
    assert uart.receive(b"ef") == 2
    assert uart.received_bytes == 1 + 4 + 2
    assert [uart.read(RBR_THR_DLL, 1) for _ in range(4)] == list(b"cdef")


def test_loopback_overrun_sets_oe_and_line_status_interrupt():
    uart, irq, output = make_uart(rx_capacity=2)
    uart.write(IIR_FCR, 1, 0x01)
    uart.write(IER_DLM, 1, 0x05)
    uart.write(MCR, 1, 0x18)  # loopback with OUT2: the pin is forced off, the line stays low
    for value in b"abc":
        uart.write(RBR_THR_DLL, 1, value)
    assert output == []
    assert (uart.overruns, uart.transmitted_bytes) == (1, 0)
    assert uart.read(IIR_FCR, 1) == 0xC6
    assert not irq.level
    assert uart.read(LSR, 1) & 0x03 == 0x03
    assert uart.read(LSR, 1) & 0x02 == 0  # reading LSR clears OE
    assert uart.read(IIR_FCR, 1) == 0xC4  # trigger level 1: received data, no timeout
    assert bytes(uart.read(RBR_THR_DLL, 1) for _ in range(2)) == b"ab"
    uart.write(MCR, 1, 0x08)
    assert uart.read(IIR_FCR, 1) == 0xC1


def test_modem_status_interrupt_from_loopback_changes():
    uart, irq, _ = make_uart()
    uart.write(IER_DLM, 1, 0x08)
    assert uart.read(MSR, 1) == 0xB0
    uart.write(MCR, 1, 0x08)
    assert not irq.level
    uart.write(MCR, 1, 0x1D)  # loopback: CTS and DSR drop with RTS=0 DTR=1 -> DSR stays
    assert uart.read(IIR_FCR, 1) == 0x00
    assert uart.read(MSR, 1) == 0xE0 | 0x01
    assert uart.read(MSR, 1) == 0xE0
    uart.write(MCR, 1, 0x19)  # RI (OUT1) falls: trailing edge
    assert uart.read(MSR, 1) & 0x04


def test_invalid_offsets_and_wide_values_are_harmless():
    uart, _, output = make_uart()
    assert uart.read(8, 1) == 0xFF
    uart.write(100, 1, 0x1234)
    uart.write(RBR_THR_DLL, 1, 0x141)
    assert output == [b"A"]


def test_receive_from_another_thread_while_guest_reads():
    uart, _, _ = make_uart()
    uart.write(IIR_FCR, 1, 0x01)
    payload = bytes(range(256)) * 8
    received = bytearray()

    def host() -> None:
        sent = 0
        while sent < len(payload):
            sent += uart.receive(payload[sent : sent + 50])

    thread = threading.Thread(target=host)
    thread.start()
    while len(received) < len(payload):
        if uart.read(LSR, 1) & 0x01:
            received.append(uart.read(RBR_THR_DLL, 1))
    thread.join()
    assert bytes(received) == payload


interesting_values = st.one_of(
    st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x05, 0x07, 0x08, 0x0B, 0x0F, 0x18, 0x1A, 0x80, 0xC1]),
    st.integers(0, 0x1FF),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(0, 8), st.just(0)),
        st.tuples(st.just("write"), st.integers(0, 8), interesting_values),
        st.tuples(st.just("receive"), st.just(0), st.integers(0, 40)),
    ),
    min_size=10,
    max_size=60,
)


def pending_interrupt(uart: Uart16550) -> int:
    """The IIR identification the UART would report, without the side effects of a read."""
    with uart._lock:
        return uart._pending_interrupt()


@settings(max_examples=250, deadline=None)
@given(operations, st.integers(1, 16), st.booleans())
def test_fuzzed_register_access_keeps_invariants(ops, capacity, started):
    uart, irq, _ = make_uart(rx_capacity=capacity)
    mcr = 0
    if started:  # half the runs start where Linux leaves the port, interrupts reaching the line
        linux_startup(uart)
        uart.write(IER_DLM, 1, 0x0F)
        mcr = 0x0B
    for kind, offset, value in ops:
        if kind == "read":
            assert 0 <= uart.read(offset, 1) <= 0xFF
        elif kind == "write":
            uart.write(offset, 1, value)
            if offset == MCR:
                mcr = value & 0x1F
        else:
            accepted = uart.receive(b"q" * value)
            assert 0 <= accepted <= value
        assert uart.rx_pending <= capacity
        gated_on = mcr & 0x18 == 0x08
        assert irq.level == (gated_on and pending_interrupt(uart) != 0x01)
        assert irq.history == [i % 2 == 0 for i in range(len(irq.history))]
        iir = uart.read(IIR_FCR, 1) if kind == "read" and offset == IIR_FCR else None
        if iir is not None:
            assert iir & 0x30 == 0  # no 64-byte FIFO or reserved bits on a 16550A


def test_line_status_interrupt_reaches_the_line_after_loopback_and_lsr_read_clears_it():
    uart, irq, _ = make_uart(rx_capacity=1)
    uart.write(IIR_FCR, 1, 0x01)
    uart.write(MCR, 1, 0x18)
    uart.write(RBR_THR_DLL, 1, 1)
    uart.write(RBR_THR_DLL, 1, 2)  # overrun
    uart.write(IER_DLM, 1, 0x04)
    assert not irq.level
    uart.write(MCR, 1, 0x08)  # out of loopback: OUT2 now reaches the PIC
    assert irq.level
    assert uart.read(LSR, 1) & 0x02
    assert not irq.level


def test_thr_writes_are_deferrable_exactly_while_no_interrupt_or_loopback_needs_them():
    uart, _, _ = make_uart()
    changes: list[bool] = []
    uart.on_deferrable_change = changes.append
    assert uart.thr_writes_deferrable
    linux_startup(uart)  # RX interrupts only: THR writes still need no exit
    assert uart.thr_writes_deferrable and changes == []
    uart.write(IER_DLM, 1, 0x07)  # the driver starts transmitting: THR-empty interrupt on
    uart.write(IER_DLM, 1, 0x07)  # unchanged: no second call
    uart.write(IER_DLM, 1, 0x05)
    uart.write(MCR, 1, 0x1B)  # loopback feeds THR back into the receiver
    uart.write(MCR, 1, 0x0B)
    uart.write(LCR, 1, 0x83)  # DLAB: the divisor latch sits where IER was, IER is kept
    uart.write(IER_DLM, 1, 0x02)
    assert uart.thr_writes_deferrable
    assert changes == [False, True, False, True]
