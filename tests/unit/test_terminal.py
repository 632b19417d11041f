"""Host side of the console: escape filter, raw mode, input pump and batched output."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.devices.serial import Uart16550
from kvmlet.host.terminal import (
    BatchedWriter,
    ConsoleInput,
    EscapeAction,
    EscapeFilter,
    RawTerminal,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def feed_all(escape_filter: EscapeFilter, chunks: list[bytes]) -> tuple[bytes, list]:
    data, actions = b"", []
    for chunk in chunks:
        result = escape_filter.feed(chunk)
        data += result.to_guest
        actions += result.actions
    return data, actions


@pytest.mark.parametrize(
    ("chunks", "to_guest", "actions"),
    [
        ([b"ls\r"], b"ls\r", []),
        ([b"a\x01", b"x", b"ignored"], b"a", [EscapeAction.QUIT]),
        ([b"\x01\x01"], b"\x01", []),
        ([b"\x01", b"\x01", b"b"], b"\x01b", []),
        ([b"1\x01s2", b"\x01h3"], b"123", [EscapeAction.STATS, EscapeAction.HELP]),
        ([b"\x01b"], b"\x01b", []),
        ([b"\x01", b"\x03"], b"\x01\x03", []),
    ],
)
def test_escape_sequences_including_split_reads(chunks, to_guest, actions):
    assert feed_all(EscapeFilter(), chunks) == (to_guest, actions)


def test_nothing_passes_after_quit_and_help_names_the_keys():
    escape_filter = EscapeFilter()
    escape_filter.feed(b"\x01x")
    assert escape_filter.quit_requested
    assert escape_filter.feed(b"more").to_guest == b""
    assert "Ctrl-A x" in escape_filter.help_text


@given(st.lists(st.binary(max_size=20), max_size=10))
def test_splitting_never_changes_the_result(chunks):
    joined = b"".join(chunks)
    assert feed_all(EscapeFilter(), chunks) == feed_all(EscapeFilter(), [joined])
    if b"\x01" not in joined:
        assert feed_all(EscapeFilter(), chunks) == (joined, [])


def test_raw_terminal_on_a_pty_is_raw_inside_and_restored_after_exception():
    controller, terminal = os.openpty()
    try:
        before = termios.tcgetattr(terminal)
        with pytest.raises(RuntimeError), RawTerminal(terminal) as raw:
            assert raw.active
            inside = termios.tcgetattr(terminal)
            assert not inside[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
            assert not inside[0] & termios.ICRNL
            assert inside[1] & termios.OPOST
            raise RuntimeError("boom")
        assert not raw.active
        assert termios.tcgetattr(terminal) == before
    finally:
        os.close(controller)
        os.close(terminal)


def test_raw_terminal_restores_on_sigterm_then_runs_the_previous_handler():
    controller, terminal = os.openpty()
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        before = termios.tcgetattr(terminal)
        with RawTerminal(terminal):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert seen == [signal.SIGTERM]
            assert termios.tcgetattr(terminal) == before
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(controller)
        os.close(terminal)


def test_raw_terminal_goes_raw_again_after_a_job_control_stop():
    controller, terminal = os.openpty()
    try:
        before = termios.tcgetattr(terminal)
        with RawTerminal(terminal):
            termios.tcsetattr(terminal, termios.TCSANOW, before)  # what the shell does on ^Z
            os.kill(os.getpid(), signal.SIGCONT)
            time.sleep(0.01)
            assert not termios.tcgetattr(terminal)[3] & termios.ICANON
        assert termios.tcgetattr(terminal) == before
        assert signal.getsignal(signal.SIGCONT) == signal.SIG_DFL
    finally:
        os.close(controller)
        os.close(terminal)


def test_raw_terminal_leaves_a_pipe_alone():
    read_end, write_end = os.pipe()
    try:
        with RawTerminal(read_end) as raw:
            assert not raw.is_tty
            assert not raw.active
    finally:
        os.close(read_end)
        os.close(write_end)


class SmallFifo:
    """A receive FIFO with the UART's contract: capped, drained by a 'guest' thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queued = bytearray()
        self.lock = threading.Lock()
        self.on_space = lambda: None

    def receive(self, data: bytes) -> int:
        with self.lock:
            accepted = min(len(data), self.capacity - len(self.queued))
            self.queued += data[:accepted]
            return accepted

    def drain(self) -> bytes:
        with self.lock:
            data = bytes(self.queued)
            self.queued.clear()
        self.on_space()
        return data


def test_console_input_respects_backpressure_and_stops_at_eof():
    fifo = SmallFifo(capacity=3)
    read_end, write_end = os.pipe()
    pump = ConsoleInput(read_end, fifo.receive, retry_interval=5.0)
    fifo.on_space = pump.notify_space
    pump.start()
    payload = bytes(range(256)) * 4
    os.write(write_end, payload)
    os.close(write_end)
    received = bytearray()
    deadline = time.monotonic() + 5
    while len(received) < len(payload) and time.monotonic() < deadline:
        received += fifo.drain()
        assert len(fifo.queued) <= 3
        time.sleep(0)  # let the pump thread have the GIL
    pump.join(5)
    assert bytes(received) == payload
    assert pump.reached_eof
    pump.stop()
    os.close(read_end)


def test_console_input_applies_escapes_and_stops_on_quit():
    fifo = SmallFifo(capacity=100)
    actions = []
    read_end, write_end = os.pipe()
    pump = ConsoleInput(
        read_end, fifo.receive, escape_filter=EscapeFilter(), on_action=actions.append
    )
    pump.start()
    os.write(write_end, b"hi\x01s\x01xlost")
    pump.join(5)
    assert not pump.reached_eof
    assert actions == [EscapeAction.STATS, EscapeAction.QUIT]
    assert bytes(fifo.queued) == b"hi"
    pump.stop()
    os.close(read_end)
    os.close(write_end)


def test_console_input_stop_interrupts_a_blocked_read():
    read_end, write_end = os.pipe()
    pump = ConsoleInput(read_end, lambda data: len(data))
    pump.start()
    pump.stop(timeout=2)
    assert not pump._thread.is_alive()
    os.close(read_end)
    os.close(write_end)


def test_console_input_ends_quietly_when_reading_fails():
    controller, terminal = os.openpty()
    pump = ConsoleInput(controller, lambda data: len(data))
    pump.start()
    os.close(terminal)  # reading the controller side now fails with EIO
    pump.join(5)
    assert not pump._thread.is_alive()
    assert pump.read_error is not None and pump.read_error.errno == errno.EIO
    assert not pump.reached_eof
    pump.stop()
    os.close(controller)


def test_batched_writer_turns_a_byte_stream_into_few_writes():
    chunks: list[bytes] = []
    writer = BatchedWriter(
        1, linger=0.02, write=lambda fd, data: chunks.append(bytes(data)) or len(data)
    )
    payload = b"".join(bytes((i,)) for i in range(200)) * 5
    for value in payload:
        writer.write(bytes((value,)))
    assert writer.flush(timeout=2)
    writer.close()
    assert b"".join(chunks) == payload
    assert len(chunks) <= 10


@pytest.mark.parametrize("ends_with", ["start", "close"])
def test_a_batched_writer_not_started_keeps_its_output_until_it_is(ends_with):
    """A machine starts its console's writer after its vCPUs: output waits, nothing is lost
    (a machine closed without starting writes what it has on the way out)."""
    chunks: list[bytes] = []
    writer = BatchedWriter(
        1, linger=0, write=lambda fd, data: chunks.append(bytes(data)) or len(data), start=False
    )
    writer.write(b"before ")
    writer.write(b"the start")
    time.sleep(0.05)
    assert chunks == []
    if ends_with == "start":
        writer.start()
        writer.start()  # once
        assert writer.flush(timeout=2)
        assert b"".join(chunks) == b"before the start"
    writer.close()
    assert b"".join(chunks) == b"before the start"


def test_batched_writer_handles_short_writes_and_a_broken_fd():
    calls = []

    def flaky_write(fd, data):
        calls.append(bytes(data))
        if len(calls) == 1:
            return 2
        raise OSError(errno.EPIPE, "broken pipe")

    writer = BatchedWriter(1, linger=0, write=flaky_write)
    writer.write(b"hello")
    writer.flush(timeout=2)
    assert calls[:2] == [b"hello", b"llo"]
    assert writer.broken is not None and writer.broken.errno == errno.EPIPE
    writer.write(b"dropped")  # neither raises nor blocks
    writer.close()
    assert writer.bytes_written == 2


def test_batched_writer_blocks_the_producer_when_the_host_is_stuck():
    release = threading.Event()
    written = bytearray()

    def stuck_write(fd, data):
        release.wait()
        written.extend(data)
        return len(data)

    writer = BatchedWriter(1, linger=0, max_pending=4, write=stuck_write)
    producer = threading.Thread(target=lambda: [writer.write(b"ab") for _ in range(8)])
    producer.start()
    producer.join(0.2)
    assert producer.is_alive()  # held back, not buffering without bound
    release.set()
    producer.join(2)
    assert not producer.is_alive()
    writer.close()
    assert bytes(written) == b"ab" * 8


def test_raw_terminal_restores_before_a_default_sigterm_kills_the_process():
    controller, terminal = os.openpty()
    child_code = (
        "import os, signal, time\n"
        "from kvmlet.host.terminal import RawTerminal\n"
        "with RawTerminal(0):\n"
        "    os.write(1, b'raw\\n')\n"
        "    time.sleep(30)\n"
    )
    try:
        before = termios.tcgetattr(terminal)
        child = subprocess.Popen(
            [sys.executable, "-c", child_code],
            stdin=terminal,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert child.stdout.readline() == b"raw\n"
        assert not termios.tcgetattr(terminal)[3] & termios.ICANON
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        child.stdout.close()
        assert termios.tcgetattr(terminal) == before
    finally:
        os.close(controller)
        os.close(terminal)


def test_console_input_into_a_real_uart_with_its_space_notification():
    read_end, write_end = os.pipe()
    pump = ConsoleInput(read_end, lambda data: uart.receive(data), retry_interval=5.0)
    uart = Uart16550(
        RecordingIrqLine(), lambda b: None, rx_capacity=8, on_rx_space=pump.notify_space
    )
    uart.write(2, 1, 0x01)  # the guest enables the FIFO
    pump.start()
    payload = os.urandom(3000)
    os.write(write_end, payload)
    os.close(write_end)
    received = bytearray()
    deadline = time.monotonic() + 10
    while len(received) < len(payload) and time.monotonic() < deadline:
        if uart.read(5, 1) & 0x01:
            received.append(uart.read(0, 1))
        else:
            time.sleep(0)
        assert uart.rx_pending <= 8
    pump.join(5)
    pump.stop()
    os.close(read_end)
    assert bytes(received) == payload
    assert pump.reached_eof
