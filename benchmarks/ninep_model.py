"""Throughput of the 9p server model alone (no guest, no KVM), with host-side references.

The server is handed requests as virtio-9p would hand them: message bytes and page-sized
memoryviews of one mapping standing in for guest RAM, in the layout of Linux's zero-copy reads
and writes (an 11-byte Rread header then the data pages; a 23-byte Twrite header then the data
pages). Messages are encoded before the clock starts and replies are only checked for their
type, so the time is the server's: decoding, the operation, encoding the reply.

- `seq_read_64MiB`, `seq_write_64MiB`: a 64 MiB file read and written front to back in 496 KiB
  requests (124 pages: what Linux sends at its virtio maximum msize), against a bare
  preadv/pwritev loop over the same page views.
- `create_stat_unlink_1000`: 1,000 files, each with the messages Linux's v9fs sends for
  `touch`, `stat` and `rm` (a failed lookup, a clone and Tlcreate, Tgetattr, Tclunk, a lookup,
  Tgetattr, Tclunk, Tunlinkat: 9 requests), against the same work done with os calls.

Prints JSON lines: {"case", "value", "unit", "ratio_to_reference", "reference", ...}.
Usage: python3 benchmarks/ninep_model.py [--repeat 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.ninep import Server
from kvmlet.ninep import messages as m
from kvmlet.ninep.wire import HEADER

MIB = 1 << 20
PAGE = 4096
FILE_SIZE = 64 * MIB
PAGES_PER_REQUEST = 124
CHUNK = PAGES_PER_REQUEST * PAGE
MSIZE = 512_000
FILES = 1000
ROOT, FILE_FID, CLONE, LOOKUP = 0, 1, 2, 3


class Clock:
    """Wall and process CPU time of a block (CPU time is what a loaded machine distorts less)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def best(runs: list[Clock]) -> tuple[float, float]:
    return min(run.wall for run in runs), min(run.cpu for run in runs)


def handle(server, request: bytes, reply: list[memoryview]) -> int:
    return server.handle([memoryview(request)], reply)


def reply_type(reply: list[memoryview]) -> int:
    return reply[0][4]


def mount(server) -> None:
    room = [memoryview(bytearray(8192))]
    for message in (
        m.Tversion(0xFFFF, MSIZE, b"9P2000.L"),
        m.Tattach(1, ROOT, m.NOFID, b"", b"", 0),
    ):
        handle(server, m.encode(message), room)
        assert reply_type(room) == message.TYPE + 1


def open_file(server, name: bytes, flags: int) -> None:
    room = [memoryview(bytearray(8192))]
    for message in (m.Twalk(2, ROOT, FILE_FID, (name,)), m.Tlopen(3, FILE_FID, flags)):
        handle(server, m.encode(message), room)
        assert reply_type(room) == message.TYPE + 1, message


def sequential(server, pages: list[memoryview], header: memoryview, reading: bool) -> Clock:
    """The time the server takes to read (or write) the whole file through `pages`."""
    requests = []
    for offset in range(0, FILE_SIZE, CHUNK):
        count = min(CHUNK, FILE_SIZE - offset)
        if reading:
            requests.append((m.encode(m.Tread(5, FILE_FID, offset, count)), count))
        else:  # the header alone: the data is in the pages (Linux's zero-copy layout)
            fixed = m.TWRITE_HEADER.pack(FILE_FID, offset, count)
            size = m.TWRITE_DATA_OFFSET + count
            requests.append((HEADER.pack(size, m.Twrite.TYPE, 5) + fixed, count))
    with Clock() as clock:
        for request, count in requests:
            data = pages[: count // PAGE]
            if reading:
                server.handle([memoryview(request)], [header, *data])
                assert header[4] == m.Rread.TYPE
            else:
                server.handle([memoryview(request), *data], [header])
                assert header[4] == m.Rwrite.TYPE
    return clock


def reference_sequential(fd: int, pages: list[memoryview], reading: bool) -> Clock:
    operation = os.preadv if reading else os.pwritev
    with Clock() as clock:
        for offset in range(0, FILE_SIZE, CHUNK):
            operation(fd, pages[: min(CHUNK, FILE_SIZE - offset) // PAGE], offset)
    return clock


def metadata_requests() -> list[tuple[bytes, int]]:
    """For each file, the requests v9fs sends for touch, stat and rm, with the reply type."""
    requests = []
    for index in range(FILES):
        name = b"file-%05d" % index
        for message, expected in (
            (m.Twalk(10, ROOT, LOOKUP, (name,)), m.Rlerror.TYPE),
            (m.Twalk(11, ROOT, CLONE, ()), m.Rwalk.TYPE),
            (m.Tlcreate(12, CLONE, name, m.L_RDWR, 0o644, 0), m.Rlcreate.TYPE),
            (m.Tgetattr(13, CLONE, m.GETATTR_BASIC), m.Rgetattr.TYPE),
            (m.Tclunk(14, CLONE), m.Rclunk.TYPE),
            (m.Twalk(15, ROOT, LOOKUP, (name,)), m.Rwalk.TYPE),
            (m.Tgetattr(16, LOOKUP, m.GETATTR_BASIC), m.Rgetattr.TYPE),
            (m.Tclunk(17, LOOKUP), m.Rclunk.TYPE),
            (m.Tunlinkat(18, ROOT, name, 0), m.Runlinkat.TYPE),
        ):
            requests.append((m.encode(message), expected))
    return requests


def metadata(server, requests: list[tuple[bytes, int]]) -> Clock:
    room = [memoryview(bytearray(8192))]
    with Clock() as clock:
        for request, expected in requests:
            server.handle([memoryview(request)], room)
            if room[0][4] != expected:
                raise AssertionError(f"reply type {room[0][4]}, expected {expected}")
    return clock


def reference_metadata(directory: str) -> Clock:
    """The same file system work with os calls on a directory descriptor."""
    names = [b"file-%05d" % index for index in range(FILES)]
    root = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    with Clock() as clock:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.stat(name, dir_fd=root, follow_symlinks=False)
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=root)
            os.fstat(fd)
            os.close(fd)
            os.stat(name, dir_fd=root, follow_symlinks=False)
            os.unlink(name, dir_fd=root)
    os.close(root)
    return clock


def report(case: str, model: list[Clock], reference: list[Clock], unit: str, amount: float):
    """One JSON line: the best wall-clock rate and its ratio to the reference's, and the same
    from process CPU time."""
    wall, cpu = best(model)
    reference_wall, reference_cpu = best(reference)
    print(
        json.dumps(
            {
                "case": case,
                "value": round(amount / wall, 1),
                "unit": unit,
                "ratio_to_reference": round(reference_wall / wall, 3),
                "reference": round(amount / reference_wall, 1),
                "cpu_value": round(amount / cpu, 1),
                "cpu_ratio_to_reference": round(reference_cpu / cpu, 3),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (best one kept)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the share is made")
    arguments = parser.parse_args()
    repeat = arguments.repeat

    with tempfile.TemporaryDirectory(dir=arguments.dir) as directory:
        share = Path(directory) / "share"
        share.mkdir()
        with open(share / "big", "wb") as file:
            for _ in range(FILE_SIZE // MIB):
                file.write(os.urandom(MIB))
        ram = mmap.mmap(-1, CHUNK + PAGE)
        window = memoryview(ram)
        pages = [window[start : start + PAGE] for start in range(PAGE, PAGE + CHUNK, PAGE)]
        header = window[: m.DATA_REPLY_HEADER_SIZE]
        server = Server(str(share), max_msize=MSIZE)
        reference_fd = os.open(share / "big", os.O_RDWR)
        try:
            mount(server)
            for reading, case in ((True, "seq_read_64MiB"), (False, "seq_write_64MiB")):
                open_file(server, b"big", m.L_RDONLY if reading else m.L_WRONLY)
                runs = [sequential(server, pages, header, reading) for _ in range(repeat)]
                references = [
                    reference_sequential(reference_fd, pages, reading) for _ in range(repeat)
                ]
                report(case, runs, references, "MB/s", FILE_SIZE / 1e6)
                handle(server, m.encode(m.Tclunk(4, FILE_FID)), [memoryview(bytearray(64))])
            requests = metadata_requests()
            runs = [metadata(server, requests) for _ in range(repeat)]
            references = [reference_metadata(str(share)) for _ in range(repeat)]
            report("create_stat_unlink_1000", runs, references, "files/s", FILES)
            wall, cpu = best(runs)
            per_request = {"wall": wall / len(requests) * 1e6, "cpu": cpu / len(requests) * 1e6}
            print(
                json.dumps(
                    {
                        "case": "metadata_request",
                        "value": round(per_request["wall"], 2),
                        "unit": "us/request",
                        "cpu_value": round(per_request["cpu"], 2),
                    }
                ),
                flush=True,
            )
        finally:
            os.close(reference_fd)
            server.close()
            header.release()
            for page in pages:
                page.release()
            window.release()
            ram.close()


if __name__ == "__main__":
    main()
