"""The guest console seen from the host: a transcript to read and wait on, and input to send.

Guest output (COM1 or hvc0) arrives one byte or chain at a time on a vCPU or worker thread;
`Console.output` appends it to a transcript under a plain lock (cheap: it runs inside every
serial exit) and, when the console is attached to a host fd, to a `BatchedWriter`. Readers poll
the transcript: waiting is for people and tests, never on the guest's path. The transcript is a
bounded ring (`TRANSCRIPT_LIMIT`): it grows with the output up to the limit, then the newest
bytes overwrite the oldest, so a chatty guest costs the monitor a fixed amount of memory.

Input goes through a pipe into a `ConsoleInput` pump, so text written by the Python API and keys
typed on a terminal take the same backpressured road into the device's capped FIFO.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable

from kvmlet.errors import GuestStoppedError, KvmletError
from kvmlet.host.terminal import BatchedWriter, ConsoleInput, EscapeAction, EscapeFilter

TRANSCRIPT_LIMIT = 1 << 20
"""Bytes of console output kept for readers; past it the oldest are overwritten (counted)."""

POLL_INTERVAL = 0.01


class Console:
    """Transcript, host echo and input of one guest console."""

    def __init__(
        self,
        echo_fd: int | None = None,
        stop_reason: Callable[[], object | None] = lambda: None,
        limit: int = TRANSCRIPT_LIMIT,
    ):
        """`stop_reason()` is how the machine stopped (a `GuestStop`), None while it runs;
        `limit` bounds the transcript (bytes)."""
        self._stop_reason = stop_reason
        self._lock = threading.Lock()
        self._transcript = bytearray()  # grows to `limit`, then is a ring starting at _start
        self._limit = limit
        self._start = 0
        self._dropped = 0
        self._read_position = 0
        self._writer = BatchedWriter(echo_fd, start=False) if echo_fd is not None else None
        self._input: ConsoleInput | None = None
        self._pipe_write: int | None = None

    # -- guest output ----------------------------------------------------------------------

    def output(self, data: bytes) -> None:
        """Guest output (the device's `on_output`); called on vCPU and worker threads."""
        with self._lock:
            ring = self._transcript
            if len(ring) + len(data) <= self._limit:
                ring += data
            else:
                self._overwrite(data)
        if self._writer is not None:
            self._writer.write(data)

    def _overwrite(self, data: bytes) -> None:
        """The ring is (or becomes) full: `data` replaces the oldest bytes."""
        ring, limit = self._transcript, self._limit
        if len(ring) < limit:  # fill it up first
            room = limit - len(ring)
            ring += data[:room]
            data = data[room:]
        self._dropped += len(data)
        if len(data) >= limit:  # more than the ring holds: only its end is kept
            ring[:] = data[-limit:]
            self._start = 0
            return
        start = self._start
        first = min(len(data), limit - start)
        ring[start : start + first] = data[:first]
        ring[: len(data) - first] = data[first:]
        self._start = (start + len(data)) % limit

    def _kept(self) -> bytes:
        """The kept output, oldest first (call with the lock held)."""
        ring, start = self._transcript, self._start
        return bytes(ring[start:] + ring[:start]) if start else bytes(ring)

    def text(self) -> str:
        """Everything kept of the guest's output so far, decoded leniently."""
        with self._lock:
            return self._kept().decode(errors="replace")

    def transcript(self) -> bytes:
        with self._lock:
            return self._kept()

    def tail(self, size: int) -> tuple[bytes, int]:
        """The last `size` bytes of output (fewer when there is less), and how many bytes the
        guest has written in all."""
        with self._lock:
            total = self._dropped + len(self._transcript)
            return (self._kept()[-size:] if size > 0 else b""), total

    def read(self) -> bytes:
        """Output that arrived since the previous `read()` (what the ring still holds of it)."""
        with self._lock:
            start = max(self._read_position - self._dropped, 0)
            data = self._kept()[start:]
            self._read_position = self._dropped + len(self._transcript)
        return data

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        still_running: Callable[[], bool] | None = None,
    ) -> re.Match[str]:
        """Wait until the transcript matches `pattern` (a regex) and return the match.

        Raises GuestStoppedError, with the stop's reason, as soon as the machine stops without
        having printed it, and KvmletError when `timeout` seconds pass first. `still_running`,
        when given, is one more condition: the wait ends (GuestStoppedError, `stop` None) once
        it returns false."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            stop = self._stop_reason()  # before the text: whatever came before the stop is in it
            match = regex.search(self.text())
            if match is not None:
                return match
            if stop is not None:
                raise GuestStoppedError(
                    f"the guest stopped before printing {regex.pattern!r}: {stop}", stop
                )
            if still_running is not None and not still_running():
                raise GuestStoppedError(f"stopped waiting for {regex.pattern!r}", None)
            if time.monotonic() >= deadline:
                raise KvmletError(f"timed out after {timeout:g} s waiting for {regex.pattern!r}")
            time.sleep(POLL_INTERVAL)

    def flush(self, timeout: float = 2.0) -> None:
        """Wait until the echoed output reached the host fd."""
        if self._writer is not None:
            self._writer.flush(timeout)

    # -- guest input -----------------------------------------------------------------------

    def connect_input(
        self,
        deliver: Callable[[bytes], int],
        source_fd: int | None,
        *,
        escape: bool,
        on_action: Callable[[EscapeAction], None],
    ) -> Callable[[], None]:
        """Feed the device from `source_fd` (a terminal or pipe), or from `write()` when None.

        Returns the callback the device calls when its receive FIFO has room again.
        """
        if source_fd is None:
            source_fd, self._pipe_write = os.pipe()
        self._input = ConsoleInput(
            source_fd,
            deliver,
            escape_filter=EscapeFilter() if escape else None,
            on_action=on_action,
        )
        return self._input.notify_space

    def start(self) -> None:
        """Start the threads that echo guest output and read its input (once the vCPUs
        run: a restored guest's first instruction waits for neither)."""
        if self._writer is not None:
            self._writer.start()
        if self._input is not None:
            self._input.start()

    def write(self, data: bytes | str) -> None:
        """Send input to the guest console (only when the console reads from the API)."""
        if self._pipe_write is None:
            raise KvmletError("this console reads from the host terminal, not from write()")
        payload = data.encode() if isinstance(data, str) else data
        view = memoryview(payload)
        while view:
            view = view[os.write(self._pipe_write, view) :]

    def close(self) -> None:
        """Stop the input pump and flush and stop the echo writer."""
        if self._input is not None:
            self._input.stop()
        if self._pipe_write is not None:
            os.close(self._pipe_write)
            self._pipe_write = None
        if self._writer is not None:
            self._writer.close()
