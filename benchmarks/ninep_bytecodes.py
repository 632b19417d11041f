"""Bytecodes the interpreter runs per 9p request, traced (no KVM): the server and the device path.

On the test box every bytecode is emulated, so the count per request is what the box's 9p
worker pays for in Python; on the host it is a steadier measure than time. Traced with
`sys.settrace` and `f_trace_opcodes` (every frame below the call counted, C code not).

- `server/<type>`: `Server.handle` for each of the 9 requests v9fs sends per file for `touch`,
  `stat` and `rm` (as in `ninep_model.py`), and for a 124-page Tread and Twrite.
- `device/<case>`: one `Virtio9p.serve` round with one request posted by the mock driver
  (pop, views of the buffers, the server, completion, interrupt decision): a Tgetattr in a
  two-entry indirect table, and a 332 KiB Tread (header, then 83 pages) in an indirect table.

With `--cpu`, the device cases are timed instead (process CPU per request, the best of three
means of 1,000 requests, only `serve` on the clock): for comparing two trees on the host.

Prints JSON lines: {"case", "value", "unit"}.
Usage: python3 benchmarks/ninep_bytecodes.py [--cpu]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.memory import GuestMemory
from kvmlet.ninep import Server
from kvmlet.ninep import messages as m
from kvmlet.ninep.wire import HEADER
from kvmlet.virtio.p9 import Virtio9p
from tests.helpers.virtio_driver import MockDriver

PAGE = 4096
MSIZE = 512_000
ROOT, FILE_FID, CLONE, LOOKUP = 0, 1, 2, 3
TIMED_REQUESTS = 1000


def bytecodes(call, *arguments) -> int:
    """Bytecodes run by `call(*arguments)` and everything it calls in Python."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        call(*arguments)
    finally:
        sys.settrace(None)
    return count


def cpu_time(call, *arguments) -> float:
    """Process CPU seconds of `call(*arguments)`."""
    start = time.process_time()
    call(*arguments)
    return time.process_time() - start


def emit(case: str, value: float, unit: str = "bytecodes") -> None:
    print(json.dumps({"case": case, "value": value, "unit": unit}), flush=True)


def server_cases(share: Path) -> None:
    server = Server(str(share), max_msize=MSIZE)
    room = [memoryview(bytearray(8192))]

    def send(message) -> None:
        server.handle([memoryview(m.encode(message))], room)

    send(m.Tversion(0xFFFF, MSIZE, b"9P2000.L"))
    send(m.Tattach(1, ROOT, m.NOFID, b"", b"", 0))
    name = b"traced"
    for label, message in (
        ("walk_missing", m.Twalk(10, ROOT, LOOKUP, (name,))),
        ("walk_clone", m.Twalk(11, ROOT, CLONE, ())),
        ("lcreate", m.Tlcreate(12, CLONE, name, m.L_RDWR, 0o644, 0)),
        ("getattr", m.Tgetattr(13, CLONE, m.GETATTR_BASIC)),
        ("clunk", m.Tclunk(14, CLONE)),
        ("walk", m.Twalk(15, ROOT, LOOKUP, (name,))),
        ("getattr", m.Tgetattr(16, LOOKUP, m.GETATTR_BASIC)),
        ("lopen", m.Tlopen(17, LOOKUP, m.L_RDWR)),
        ("write", None),
        ("read", m.Tread(19, LOOKUP, 0, 124 * PAGE)),
        ("clunk", m.Tclunk(20, LOOKUP)),
        ("unlinkat", m.Tunlinkat(21, ROOT, name, 0)),
    ):
        ram = mmap.mmap(-1, 125 * PAGE)
        window = memoryview(ram)
        pages = [window[start : start + PAGE] for start in range(PAGE, 125 * PAGE, PAGE)]
        if label == "write":
            fixed = m.TWRITE_HEADER.pack(LOOKUP, 0, 124 * PAGE)
            request = HEADER.pack(m.TWRITE_DATA_OFFSET + 124 * PAGE, m.Twrite.TYPE, 18) + fixed
            readable, writable = [memoryview(request), *pages], room
        elif label == "read":
            readable = [memoryview(m.encode(message))]
            writable = [window[: m.DATA_REPLY_HEADER_SIZE], *pages]
        else:
            readable, writable = [memoryview(m.encode(message))], room
        emit(f"server/{label}", bytecodes(server.handle, readable, writable))
        assert (writable[0][4] == m.Rlerror.TYPE) == (label == "walk_missing"), label
    server.close()


def device_cases(share: Path, timed: bool) -> None:
    memory = GuestMemory.anonymous([(0, 16 << 20)])
    device = Virtio9p(memory, "share", Server(str(share), max_msize=MSIZE))
    driver = MockDriver(device, memory, 0x1000, 15 << 20, record_interrupts=False)
    driver.initialize()
    table = driver.allocate(16 * 128)  # one indirect table, reused by every request

    def serve_once(readable, writable, measure=bytecodes) -> float:
        driver.post(0, readable, writable, indirect=True, table=table)
        result = measure(device.serve, 0)
        (completion,) = driver.collect(0)
        assert completion.length, "no reply"
        return result

    def serve(readable, writable) -> float:
        """Bytecodes of one request; or, `timed`, its CPU time in µs (best of 3 means)."""
        if not timed:
            return serve_once(readable, writable)
        means = []
        for _ in range(3):
            total = sum(serve_once(readable, writable, cpu_time) for _ in range(TIMED_REQUESTS))
            means.append(round(total / TIMED_REQUESTS * 1e6, 1))
        return min(means)

    def request(message, in_sizes):
        out = m.encode(message)
        address = driver.allocate(len(out))
        memory.write(address, out)
        return [(address, len(out))], [(driver.allocate(size), size) for size in in_sizes]

    for message in (
        m.Tversion(0xFFFF, MSIZE, b"9P2000.L"),
        m.Tattach(1, ROOT, m.NOFID, b"", b"", 0),
        m.Twalk(2, ROOT, FILE_FID, (b"big",)),
        m.Tlopen(3, FILE_FID, m.L_RDONLY),
    ):
        serve(*request(message, [4096]))
    unit = "us CPU" if timed else "bytecodes"
    getattr_request = request(m.Tgetattr(4, FILE_FID, m.GETATTR_BASIC), [4096])
    emit("device/getattr", serve(*getattr_request), unit)
    pages = 83
    readable, header = request(m.Tread(5, FILE_FID, 0, pages * PAGE), [m.DATA_REPLY_HEADER_SIZE])
    data = [(driver.allocate(PAGE, PAGE), PAGE) for _ in range(pages)]
    emit("device/read_332KiB", serve(readable, header + data), unit)
    device.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu", action="store_true", help="time the device cases (CPU µs) instead of tracing"
    )
    timed = parser.parse_args().cpu
    with tempfile.TemporaryDirectory() as directory:
        share = Path(directory)
        with open(share / "big", "wb") as file:
            file.write(os.urandom(1 << 20))
        if not timed:
            server_cases(share)
        device_cases(share, timed)


if __name__ == "__main__":
    main()
