"""A 16550A UART (8250 family) as Linux's 8250 driver probes and drives it.

The model is sans-I/O: the guest side is the bus contract (`read`/`write` of the eight byte-wide
registers), the host side is `receive()` for input and an `on_output` callback for output.
Transmission is instantaneous: a byte written to THR is handed to `on_output` at once, so THR and
the transmitter are always empty (LSR.THRE and LSR.TEMT read 1) and, as on real hardware after
the shift register drains, a THR-empty interrupt is pending again right after each write.

`on_output` is called once per transmitted byte with a preallocated one-byte `bytes` object. Each
THR write is already a VM exit costing microseconds, so a call that allocates nothing adds a few
percent at most, and batching lives in one place (the host writer) instead of forcing the machine
to poll a device buffer.

Host input goes into a receive FIFO capped at `rx_capacity` bytes (1 byte while the guest keeps
the FIFOs disabled, like a 16450 holding register). `receive()` never grows it past the cap: it
returns how many bytes it accepted and, once the guest has drained room, calls `on_rx_space` so
the host side can offer the rest. An unbounded queue here is how rust-vmm's vm-superio let a
guest that never reads exhaust host memory.

`receive()` runs on a host input thread while vCPU threads access the registers, so one lock per
UART guards the state; the IRQ line is driven under that lock so its level always matches the
state that produced it.

A THR write whose only effect is the byte going out (no THR-empty interrupt enabled, no
loopback) needs no answer, so the machine may let KVM queue it without an exit (coalesced
I/O), replaying it before the guest's next access can tell; `thr_writes_deferrable` says when,
and `on_deferrable_change` hears when that changes (an IER or MCR write).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from kvmlet.devices.irq import IrqLine

REGION_SIZE = 8
"""Bytes of I/O space a UART decodes; every register is one byte wide."""

DEFAULT_RX_CAPACITY = 64

# Register offsets (DLAB selects DLL/DLM at 0 and 1).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RX_DATA = 0x01
IER_THR_EMPTY = 0x02
IER_LINE_STATUS = 0x04
IER_MODEM_STATUS = 0x08
IER_WRITABLE = 0x0F

IIR_NO_INTERRUPT = 0x01
IIR_MODEM_STATUS = 0x00
IIR_THR_EMPTY = 0x02
IIR_RX_DATA = 0x04
IIR_LINE_STATUS = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RX = 0x02
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOPBACK = 0x10
MCR_WRITABLE = 0x1F

LSR_DATA_READY = 0x01
LSR_OVERRUN = 0x02
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40

MSR_DELTA_CTS = 0x01
MSR_DELTA_DSR = 0x02
MSR_TRAILING_EDGE_RI = 0x04
MSR_DELTA_DCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

# Modem inputs when not in loopback: a null-modem host that is always ready.
_CONNECTED_MODEM_LINES = MSR_CTS | MSR_DSR | MSR_DCD

_ONE_BYTE = tuple(bytes((value,)) for value in range(256))
_LSR_IDLE = LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY  # transmission is instantaneous
_LSR_DATA_READY = _LSR_IDLE | LSR_DATA_READY


class LegacySerialPort(NamedTuple):
    """Where a PC's COM port lives: its I/O base and ISA interrupt."""

    name: str
    base: int
    irq: int


LEGACY_SERIAL_PORTS = (
    LegacySerialPort("COM1", 0x3F8, 4),
    LegacySerialPort("COM2", 0x2F8, 3),
    LegacySerialPort("COM3", 0x3E8, 4),
    LegacySerialPort("COM4", 0x2E8, 3),
)
"""The four standard PC serial ports Linux's 8250 driver probes (ttyS0..ttyS3)."""


class Uart16550:
    """One 16550A UART; guest side `read`/`write`, host side `receive`/`on_output`.

    It takes its own lock, so its bus region may be created with `lock=None`. The counters
    `transmitted_bytes`, `received_bytes` and `overruns` feed the console's statistics dump.
    """

    def __init__(
        self,
        irq: IrqLine,
        on_output: Callable[[bytes], None],
        *,
        rx_capacity: int = DEFAULT_RX_CAPACITY,
        on_rx_space: Callable[[], None] | None = None,
    ) -> None:
        if rx_capacity < 1:
            raise ValueError("rx_capacity must be at least 1")
        self._irq = irq
        self._on_output = on_output
        self.on_rx_space = on_rx_space
        self.on_deferrable_change: Callable[[bool], None] | None = None
        self._rx_capacity = rx_capacity
        self._lock = threading.Lock()
        self._rx_fifo: deque[int] = deque()
        self._rx_refused = False
        self._irq_level = False
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._scr = 0
        self._divisor = 12  # 9600 baud from the 1.8432 MHz clock, the firmware default
        self._thr_interrupt_pending = False
        self._last_rx_byte = 0
        self.transmitted_bytes = 0
        self.received_bytes = 0
        self.overruns = 0

    # ----- host side -------------------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many leading bytes of `data` fit."""
        with self._lock:
            room = self._rx_limit() - len(self._rx_fifo)
            accepted = max(0, min(room, len(data)))
            self._rx_fifo.extend(data[:accepted])
            self.received_bytes += accepted
            if accepted < len(data):
                self._rx_refused = True
            if accepted:
                self._update_irq()
            return accepted

    @property
    def wants_input(self) -> bool:
        """Whether the receive FIFO has room for at least one more byte."""
        with self._lock:
            return len(self._rx_fifo) < self._rx_limit()

    @property
    def rx_pending(self) -> int:
        """Bytes queued for the guest and not read yet."""
        with self._lock:
            return len(self._rx_fifo)

    @property
    def thr_writes_deferrable(self) -> bool:
        """Whether a THR write may wait (coalesced) until the guest's next access to the UART:
        no THR-empty interrupt depends on it and loopback does not feed it back."""
        return not self._ier & IER_THR_EMPTY and not self._mcr & MCR_LOOPBACK

    @property
    def irq_level(self) -> bool:
        """The level this UART drives on its interrupt line."""
        with self._lock:
            return self._irq_level

    # ----- snapshots --------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """Registers, FIFO, pending interrupt sources and the level driven on the line."""
        with self._lock:
            return {
                "rx_fifo": bytes(self._rx_fifo),
                "rx_refused": self._rx_refused,
                "irq_level": self._irq_level,
                "ier": self._ier,
                "fcr": self._fcr,
                "lcr": self._lcr,
                "mcr": self._mcr,
                "lsr_errors": self._lsr_errors,
                "msr_deltas": self._msr_deltas,
                "scr": self._scr,
                "divisor": self._divisor,
                "thr_interrupt_pending": self._thr_interrupt_pending,
                "last_rx_byte": self._last_rx_byte,
            }

    def load_state(self, state: dict) -> None:
        """Take a saved state. The interrupt line is not driven: the interrupt controller's
        own saved state already has the level this UART left on it. (Counters are the
        process's statistics, as every device's: a restored machine starts them at zero.)
        `on_deferrable_change` hears the restored answer of `thr_writes_deferrable`."""
        with self._lock:
            self._ier = state["ier"] & IER_WRITABLE
            self._fcr = state["fcr"] & 0xFF
            self._lcr = state["lcr"] & 0xFF
            self._mcr = state["mcr"] & MCR_WRITABLE
            self._lsr_errors = state["lsr_errors"] & LSR_OVERRUN
            self._msr_deltas = state["msr_deltas"] & MSR_DELTAS
            self._scr = state["scr"] & 0xFF
            self._divisor = state["divisor"] & 0xFFFF
            self._thr_interrupt_pending = bool(state["thr_interrupt_pending"])
            self._last_rx_byte = state["last_rx_byte"] & 0xFF
            self._rx_fifo = deque(bytes(state["rx_fifo"])[: self._rx_limit()])
            self._rx_refused = bool(state["rx_refused"])
            self._irq_level = bool(state["irq_level"])
        if self.on_deferrable_change is not None:
            self.on_deferrable_change(self.thr_writes_deferrable)

    # ----- guest side (bus contract) ---------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Read one register; never raises for any offset the guest can produce."""
        if offset == LSR and not self._lsr_errors:
            # First, and without the lock: a polling driver reads LSR before every byte it
            # sends. Each field read is atomic; a receive() racing with it comes before or
            # after, as it could on hardware. Clearing latched errors takes the locked path.
            return _LSR_DATA_READY if self._rx_fifo else _LSR_IDLE
        notify_space = False
        with self._lock:
            if offset == RBR_THR_DLL:
                if self._lcr & LCR_DLAB:
                    return self._divisor & 0xFF
                value, notify_space = self._pop_rx()
            elif offset == IER_DLM:
                return (self._divisor >> 8) & 0xFF if self._lcr & LCR_DLAB else self._ier
            elif offset == IIR_FCR:
                value = self._read_iir()
            elif offset == LCR:
                return self._lcr
            elif offset == MCR:
                return self._mcr
            elif offset == LSR:
                value = self._lsr()
                if self._lsr_errors:
                    self._lsr_errors = 0
                    self._update_irq()
            elif offset == MSR:
                value = self._modem_lines() | self._msr_deltas
                if self._msr_deltas:
                    self._msr_deltas = 0
                    self._update_irq()
            elif offset == SCR:
                return self._scr
            else:
                return 0xFF
        if notify_space and self.on_rx_space is not None:
            self.on_rx_space()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write one register; out-of-range offsets and extra value bits are ignored."""
        value &= 0xFF
        notify_space = False
        deferrable = None
        with self._lock:
            if offset == RBR_THR_DLL:
                if self._lcr & LCR_DLAB:
                    self._divisor = (self._divisor & 0xFF00) | value
                else:
                    self._transmit(value)
            elif offset == IER_DLM:
                if self._lcr & LCR_DLAB:
                    self._divisor = (self._divisor & 0x00FF) | (value << 8)
                else:
                    before = self.thr_writes_deferrable
                    self._write_ier(value)
                    if self.thr_writes_deferrable != before:
                        deferrable = not before
            elif offset == IIR_FCR:
                notify_space = self._write_fcr(value)
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                before = self.thr_writes_deferrable
                self._write_mcr(value)
                if self.thr_writes_deferrable != before:
                    deferrable = not before
            elif offset == SCR:
                self._scr = value
            # LSR and MSR writes are factory-test only on a 16550A: ignored.
        if notify_space and self.on_rx_space is not None:
            self.on_rx_space()
        if deferrable is not None and self.on_deferrable_change is not None:
            self.on_deferrable_change(deferrable)

    # ----- internals (called with the lock held) ---------------------------------------------

    def _rx_limit(self) -> int:
        return self._rx_capacity if self._fcr & FCR_ENABLE_FIFO else 1

    def _pop_rx(self) -> tuple[int, bool]:
        """Take the oldest received byte; also say whether the host should offer more input."""
        if self._rx_fifo:
            self._last_rx_byte = self._rx_fifo.popleft()
            self._update_irq()
        notify = self._rx_refused and len(self._rx_fifo) < self._rx_limit()
        if notify:
            self._rx_refused = False
        return self._last_rx_byte, notify

    def _transmit(self, value: int) -> None:
        self._thr_interrupt_pending = False
        if self._mcr & MCR_LOOPBACK:
            if len(self._rx_fifo) < self._rx_limit():
                self._rx_fifo.append(value)
            else:
                self._lsr_errors |= LSR_OVERRUN
                self.overruns += 1
        else:
            self.transmitted_bytes += 1
            self._on_output(_ONE_BYTE[value])
        # The byte left at once: THR is empty again, which is itself an interrupt source.
        self._thr_interrupt_pending = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        value &= IER_WRITABLE
        changed = self._ier ^ value
        self._ier = value
        if changed & IER_THR_EMPTY:
            # Enabling ETBEI while THR is empty raises the interrupt (Linux tests this at
            # startup to detect UARTs that do not); disabling it drops the pending one.
            self._thr_interrupt_pending = bool(value & IER_THR_EMPTY)
        self._update_irq()

    def _write_fcr(self, value: int) -> bool:
        """Apply an FCR write; returns whether received bytes were discarded."""
        discarded = False
        if (value ^ self._fcr) & FCR_ENABLE_FIFO or value & FCR_CLEAR_RX:
            # Toggling the FIFO enable clears both FIFOs, as the clear bits do.
            discarded = bool(self._rx_fifo) or self._rx_refused
            self._rx_fifo.clear()
            self._rx_refused = False
        self._fcr = value & ~0x06 & 0xFF  # the clear bits self-reset
        self._update_irq()
        return discarded

    def _write_mcr(self, value: int) -> None:
        before = self._modem_lines()
        self._mcr = value & MCR_WRITABLE
        after = self._modem_lines()
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DELTA_CTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DELTA_DSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DELTA_DCD
        if before & MSR_RI and not after & MSR_RI:
            self._msr_deltas |= MSR_TRAILING_EDGE_RI
        self._update_irq()

    def _modem_lines(self) -> int:
        """Upper MSR bits: the modem inputs, or the MCR outputs looped back onto them."""
        if not self._mcr & MCR_LOOPBACK:
            return _CONNECTED_MODEM_LINES
        lines = 0
        if self._mcr & MCR_RTS:
            lines |= MSR_CTS
        if self._mcr & MCR_DTR:
            lines |= MSR_DSR
        if self._mcr & MCR_OUT1:
            lines |= MSR_RI
        if self._mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _lsr(self) -> int:
        value = LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY | self._lsr_errors
        if self._rx_fifo:
            value |= LSR_DATA_READY
        return value

    def _pending_interrupt(self) -> int:
        """The highest-priority pending interrupt as an IIR identification code."""
        ier = self._ier
        if ier & IER_LINE_STATUS and self._lsr_errors:
            return IIR_LINE_STATUS
        if ier & IER_RX_DATA and self._rx_fifo:
            if not self._fcr & FCR_ENABLE_FIFO:
                return IIR_RX_DATA
            trigger = RX_TRIGGER_LEVELS[self._fcr >> FCR_TRIGGER_SHIFT]
            # Below the trigger level the character timeout fires; with no clock to wait on,
            # it counts as already elapsed.
            return IIR_RX_DATA if len(self._rx_fifo) >= trigger else IIR_RX_TIMEOUT
        if ier & IER_THR_EMPTY and self._thr_interrupt_pending:
            return IIR_THR_EMPTY
        if ier & IER_MODEM_STATUS and self._msr_deltas:
            return IIR_MODEM_STATUS
        return IIR_NO_INTERRUPT

    def _read_iir(self) -> int:
        source = self._pending_interrupt()
        if source == IIR_THR_EMPTY:
            # Reading IIR acknowledges a THR-empty interrupt when it is the one reported.
            self._thr_interrupt_pending = False
            self._update_irq()
        if self._fcr & FCR_ENABLE_FIFO:
            source |= IIR_FIFO_ENABLED
        return source

    def _update_irq(self) -> None:
        # On a PC the UART's interrupt output reaches the PIC through a buffer enabled by OUT2;
        # in loopback the OUT2 pin is forced inactive, so the line stays low.
        level = (
            self._mcr & (MCR_OUT2 | MCR_LOOPBACK) == MCR_OUT2
            and self._pending_interrupt() != IIR_NO_INTERRUPT
        )
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
