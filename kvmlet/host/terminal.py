"""The host side of the serial console: keyboard escapes, raw mode, input pump, batched output.

- `EscapeFilter` (sans-I/O) splits host keyboard bytes into bytes for the guest and monitor
  actions: Ctrl-A x quits, Ctrl-A s asks for statistics, Ctrl-A h for help, Ctrl-A Ctrl-A sends
  one Ctrl-A; any other byte after Ctrl-A reaches the guest together with the Ctrl-A.
- `RawTerminal` puts stdin into raw mode only when it is a terminal and always restores it, on
  exceptions and on SIGTERM/SIGHUP too.
- `ConsoleInput` reads host input on its own thread and hands it to the UART, waiting for the
  guest to drain the receive FIFO instead of queueing without bound; EOF (a pipe that ends)
  just stops input.
- `BatchedWriter` writes guest output to a host fd from its own thread in chunks: the vCPU thread
  only appends to a buffer, so a slow terminal never costs an exit per byte, and a burst of
  console output becomes one write(2).
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import signal
import termios
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

CTRL_A = 0x01


class EscapeAction(enum.Enum):
    """What the user asked the monitor for with an escape sequence."""

    QUIT = "quit"
    HELP = "help"
    STATS = "stats"


_ACTION_KEYS = {
    ord("x"): EscapeAction.QUIT,
    ord("X"): EscapeAction.QUIT,
    ord("h"): EscapeAction.HELP,
    ord("H"): EscapeAction.HELP,
    ord("?"): EscapeAction.HELP,
    ord("s"): EscapeAction.STATS,
    ord("S"): EscapeAction.STATS,
}


class FilteredInput(NamedTuple):
    """The result of filtering one chunk of keyboard input."""

    to_guest: bytes
    actions: tuple[EscapeAction, ...]


class EscapeFilter:
    """Recognises Ctrl-A escapes in a byte stream; sequences may be split across reads."""

    def __init__(self, escape: int = CTRL_A) -> None:
        if not 0 <= escape <= 0xFF:
            raise ValueError("escape must be a byte value")
        self._escape = escape
        self._after_escape = False
        self.quit_requested = False

    @property
    def help_text(self) -> str:
        key = _key_name(self._escape)
        return (
            f"\r\nkvmlet console escapes:\r\n"
            f"  {key} x     quit (stops the guest)\r\n"
            f"  {key} s     print statistics\r\n"
            f"  {key} h     this help\r\n"
            f"  {key} {key}  send {key} to the guest\r\n"
        )

    def feed(self, data: bytes) -> FilteredInput:
        """Filter `data`; after a quit request everything else is dropped."""
        if self.quit_requested:
            return FilteredInput(b"", ())
        to_guest = bytearray()
        actions: list[EscapeAction] = []
        for value in data:
            if not self._after_escape:
                if value == self._escape:
                    self._after_escape = True
                else:
                    to_guest.append(value)
                continue
            self._after_escape = False
            action = _ACTION_KEYS.get(value)
            if value == self._escape:
                to_guest.append(value)
            elif action is None:
                to_guest += bytes((self._escape, value))
            else:
                actions.append(action)
                if action is EscapeAction.QUIT:
                    self.quit_requested = True
                    break
        return FilteredInput(bytes(to_guest), tuple(actions))


def _key_name(value: int) -> str:
    if 1 <= value <= 26:
        return "Ctrl-" + chr(ord("A") + value - 1)
    return f"byte {value:#04x}"


class RawTerminal:
    """Context manager: raw mode on `fd` if it is a terminal, restored however the block ends.

    SIGTERM and SIGHUP restore the terminal before their previous handler (or default action)
    runs; SIGCONT puts raw mode back after a job-control stop, when the shell has reset it.
    Handlers are only installed from the main thread, as Python requires.
    """

    _RESTORING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self, fd: int = 0) -> None:
        self._fd = fd
        self._saved: list | None = None
        self._saved_handlers: dict[int, object] = {}

    @property
    def is_tty(self) -> bool:
        return os.isatty(self._fd)

    @property
    def active(self) -> bool:
        """Whether the terminal is in raw mode now."""
        return self._saved is not None

    def __enter__(self) -> RawTerminal:
        if not self.is_tty:
            return self
        self._saved = termios.tcgetattr(self._fd)
        termios.tcsetattr(self._fd, termios.TCSANOW, raw_mode(self._saved))
        self._install_signal_handlers()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the saved mode and signal handlers; safe to call more than once."""
        saved, self._saved = self._saved, None
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._saved_handlers.items():
                signal.signal(signum, handler)
            self._saved_handlers.clear()
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self._fd, termios.TCSANOW, saved)  # never wait on stuck output

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; exceptions still restore
        for signum in self._RESTORING_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            self._saved_handlers[signum] = previous
            signal.signal(signum, self._restore_and_resignal)
        self._saved_handlers[signal.SIGCONT] = signal.getsignal(signal.SIGCONT)
        signal.signal(signal.SIGCONT, self._reapply_raw)

    def _reapply_raw(self, signum: int, frame: object) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self._fd, termios.TCSANOW, raw_mode(self._saved))
        previous = self._saved_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)

    def _restore_and_resignal(self, signum: int, frame: object) -> None:
        previous = self._saved_handlers.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)  # the default action, now with the terminal sane


def raw_mode(attributes: list) -> list:
    """cfmakeraw() for input, keeping output processing so host messages still end lines."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attributes
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class ConsoleInput:
    """Reads host input on a thread and delivers it to the guest console as room appears.

    `deliver(data) -> accepted` is the UART's `receive`; pass this object's `notify_space` as
    the UART's `on_rx_space` so a refused remainder is offered again as soon as the guest reads.
    `retry_interval` bounds the wait when no notification comes (e.g. the guest cleared its FIFO).
    `on_action` runs on the input thread. Input ends at EOF, at a quit escape, or when reading
    fails (`read_error` says why: EIO is a terminal hang-up); the monitor keeps running.
    """

    def __init__(
        self,
        fd: int,
        deliver: Callable[[bytes], int],
        *,
        escape_filter: EscapeFilter | None = None,
        on_action: Callable[[EscapeAction], None] | None = None,
        retry_interval: float = 0.05,
        read_size: int = 4096,
    ) -> None:
        self._fd = fd
        self._deliver = deliver
        self._filter = escape_filter
        self._on_action = on_action
        self._retry_interval = retry_interval
        self._read_size = read_size
        self._space = threading.Event()
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="console-input", daemon=True)
        self.reached_eof = False
        self.read_error: OSError | None = None

    def start(self) -> None:
        self._thread.start()

    def notify_space(self) -> None:
        """The guest drained room in the receive FIFO."""
        self._space.set()

    def stop(self, timeout: float | None = 1.0) -> None:
        """Stop reading and wait for the thread; safe to call from any thread, more than once."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._space.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"\0")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            for fd in (self._wake_read, self._wake_write):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_read = self._wake_write = -1

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        # poll(), not epoll: stdin may be a regular file (`< file`), which epoll refuses.
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while not self._stopping.is_set():
            ready = {fd for fd, _ in poller.poll()}  # any event (a hang-up too) means: read
            if self._wake_read in ready or self._stopping.is_set():
                return
            try:
                data = os.read(self._fd, self._read_size)
            except BlockingIOError:
                continue
            except OSError as error:
                self.read_error = error
                return
            if not data:
                self.reached_eof = True
                return
            if self._filter is not None:
                filtered = self._filter.feed(data)
                data = filtered.to_guest
                self._deliver_all(data)
                for action in filtered.actions:
                    if self._on_action is not None:
                        self._on_action(action)
                if self._filter.quit_requested:
                    return
            else:
                self._deliver_all(data)

    def _deliver_all(self, data: bytes) -> None:
        while data and not self._stopping.is_set():
            self._space.clear()
            data = data[self._deliver(data) :]
            if data:
                self._space.wait(self._retry_interval)


class BatchedWriter:
    """Writes guest output to a host fd from a thread, one write(2) per burst.

    `write()` is the UART's `on_output`: it appends under a lock and wakes the writer thread only
    when the buffer was empty. The thread lingers `linger` seconds so the rest of a burst joins
    the chunk (2 ms: invisible to a person typing, hundreds of bytes of boot log per write).
    Past `max_pending` bytes, `write()` blocks until the host catches up: the guest slows down
    the way it would behind a real, slow serial line, instead of growing memory without bound.
    If the fd breaks (EPIPE, EIO), output is dropped from then on; the guest keeps running.
    With `start=False` the thread starts at `start()` (or `close()`): what is written before
    waits for it.
    """

    def __init__(
        self,
        fd: int,
        *,
        linger: float = 0.002,
        max_pending: int = 1 << 20,
        write: Callable[[int, bytes], int] = os.write,
        start: bool = True,
    ) -> None:
        self._fd = fd
        self._linger = linger
        self._max_pending = max_pending
        self._write = write
        self._buffer = bytearray()
        self._in_flight = False
        self._closed = False
        self.broken: OSError | None = None
        self.bytes_written = 0
        self.writes = 0
        self._condition = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="console-output", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the writer thread (once)."""
        with self._condition:
            if self._thread.ident is None:
                self._thread.start()

    def write(self, data: bytes) -> None:
        with self._condition:
            buffer = self._buffer
            if buffer and len(buffer) < self._max_pending and self.broken is None:
                buffer += data  # the common case: a burst in progress, the thread already woken
                return
            while len(buffer) >= self._max_pending and not self._discarding():
                self._condition.wait()
            if self._discarding():
                return
            if not buffer:
                self._condition.notify_all()
            buffer += data

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything written so far reached the fd; False on timeout."""
        with self._condition:
            return self._condition.wait_for(
                lambda: not (self._buffer or self._in_flight) or self.broken is not None,
                timeout,
            )

    def close(self, timeout: float | None = 2.0) -> None:
        """Write what is pending, then stop the thread."""
        self.start()
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def _discarding(self) -> bool:
        return self.broken is not None or (self._closed and not self._thread.is_alive())

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._buffer or self._closed)
                if not self._buffer:
                    return
                lingering = not self._closed and self._linger > 0
            if lingering:
                time.sleep(self._linger)
            with self._condition:
                chunk = bytes(self._buffer)
                self._buffer.clear()
                self._in_flight = True
                self._condition.notify_all()
            error = self._write_all(chunk)
            with self._condition:
                self._in_flight = False
                if error is not None:
                    self.broken = error
                    self._buffer.clear()
                self._condition.notify_all()
                if error is not None:
                    return

    def _write_all(self, chunk: bytes) -> OSError | None:
        view = memoryview(chunk)
        while view:
            try:
                written = self._write(self._fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                time.sleep(self._linger or 0.001)
                continue
            except OSError as error:
                return error
            self.writes += 1
            self.bytes_written += written
            view = view[written:]
        return None
