"""Throughput of the virtio-blk device model alone, driven by the mock driver (no KVM).

Measures the time the device spends in `notify()` (popping chains, preadv/pwritev on guest
memory views, pushing used elements) for batches of requests posted by the mock driver, and
compares it with a plain `os.preadv`/`os.pwritev` loop over the same file and sizes: the limit a
Python device model could reach (page-aligned buffers, as many as the device has in flight).
The image is written first so both read from the page cache.

`--served` measures instead the path the machine runs: the device on its own queue worker
(doorbell eventfd, worker threads, completion interrupt), random 4 KiB reads at queue depths 1,
8 and 32 as wall-clock requests per second: the driver posts a batch, rings, and waits for the
interrupts until the whole batch is back. Against a `preadv` reference: as many threads as the
device serves requests at once (at most the depth), each reading back to back.

Prints JSON lines: {"case", "value", "unit", "ratio_to_preadv", "reference"}.
Usage: python3 benchmarks/virtio_blk_model.py [--seconds 1.5] [--dir DIR] [--direct] [--served]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.memory import GuestMemory
from kvmlet.virtio.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.device import VIRTIO_F_EVENT_IDX
from kvmlet.virtio.worker import QueueWorker, doorbell
from tests.helpers.virtio_driver import MockDriver

IMAGE_SIZE = 256 << 20
GUEST_RAM = 64 << 20
MIB = 1 << 20
PAGE = 4096


@dataclass(frozen=True)
class Case:
    """One measured case: request type and size, requests per notify, and the buffer layout."""

    name: str
    request_type: int
    size: int
    depth: int
    sequential: bool
    unit: str
    segment: int = 64 << 10
    scattered: bool = False
    indirect: bool = False


CASES = [
    Case("seq_read_1MiB", VIRTIO_BLK_T_IN, MIB, 8, True, "MB/s"),
    Case("seq_write_1MiB", VIRTIO_BLK_T_OUT, MIB, 8, True, "MB/s"),
    Case("rand_read_4KiB", VIRTIO_BLK_T_IN, PAGE, 64, False, "requests/s"),
    Case("rand_write_4KiB", VIRTIO_BLK_T_OUT, PAGE, 64, False, "requests/s"),
    # As Linux posts an O_DIRECT 1 MiB request: two requests of 128 scattered pages, each in
    # an indirect table; and a 4 KiB read at queue depth 1 (three descriptors, indirect).
    Case("linux_seq_read_512KiB", VIRTIO_BLK_T_IN, MIB // 2, 2, True, "MB/s", PAGE, True, True),
    Case("linux_seq_write_512KiB", VIRTIO_BLK_T_OUT, MIB // 2, 2, True, "MB/s", PAGE, True, True),
    Case(
        "linux_rand_read_4KiB_qd1", VIRTIO_BLK_T_IN, PAGE, 1, False, "requests/s", PAGE, False, True
    ),
]


def data_buffers(driver, size, segment, scattered):
    """Guest buffers for one request's data: `segment`-byte pieces of one aligned block, or,
    `scattered`, 4 KiB pages no two of them adjacent and in shuffled order (what a guest's
    O_DIRECT buffer looks like after its block layer merged whatever was contiguous)."""
    if not scattered:
        address = driver.allocate(size, 4096)
        return [(address + start, min(segment, size - start)) for start in range(0, size, segment)]
    pages = size // PAGE
    block = driver.allocate(2 * pages * PAGE, PAGE)
    buffers = [(block + 2 * index * PAGE, PAGE) for index in range(pages)]
    random.Random(size).shuffle(buffers)
    return buffers


def device_rate(device, driver, case, seconds, offsets):
    """Requests per second of device time for batches of `case.depth` requests."""
    memory = driver.memory
    depth, size = case.depth, case.size
    headers = [driver.allocate(16) for _ in range(depth)]
    statuses = [driver.allocate(1) for _ in range(depth)]
    data = [data_buffers(driver, size, case.segment, case.scattered) for _ in range(depth)]
    tables = [driver.allocate(16 * (len(buffers) + 2), 16) for buffers in data]
    requests, busy = 0, 0.0
    while busy < seconds:
        for slot in range(depth):
            sector = next(offsets) // 512
            memory.write(headers[slot], struct.pack("<IIQ", case.request_type, 0, sector))
            readable = [(headers[slot], 16)]
            writable = [(statuses[slot], 1)]
            if case.request_type == VIRTIO_BLK_T_IN:
                writable = data[slot] + writable
            else:
                readable += data[slot]
            driver.post(0, readable, writable, indirect=case.indirect, table=tables[slot])
        started = time.perf_counter()
        device.notify(0)
        busy += time.perf_counter() - started
        completions = driver.collect(0)
        assert len(completions) == depth and not driver.needs_reset
        assert all(memory.read_u8(status) == 0 for status in statuses)
        requests += depth
    return requests / busy


def reference_rate(fd, case, seconds, offsets):
    """Requests per second of a bare preadv/pwritev loop over `case.depth` requests with the
    same number and sizes of buffers."""
    operation = os.preadv if case.request_type == VIRTIO_BLK_T_IN else os.pwritev
    piece = PAGE if case.scattered else case.segment
    mappings = [mmap.mmap(-1, case.size) for _ in range(case.depth)]
    requests = [
        [memoryview(mapping)[start : start + piece] for start in range(0, case.size, piece)]
        for mapping in mappings
    ]
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for buffers in requests:
            operation(fd, buffers, next(offsets))
        count += case.depth
    for buffers in requests:
        for view in buffers:
            view.release()
    for mapping in mappings:
        mapping.close()
    return count / elapsed


def offsets_for(size, sequential):
    """An endless stream of request offsets: sequential, or random and size-aligned."""
    slots = IMAGE_SIZE // size
    position = 0
    while True:
        if sequential:
            yield (position % slots) * size
            position += 1
        else:
            yield random.randrange(slots) * size


SERVED_DEPTHS = (1, 8, 32)


def served_rate(device, driver, depth: int, seconds: float, offsets) -> float:
    """Requests per second of wall time, random 4 KiB reads at queue depth `depth`, with the
    device served by its worker as in a machine (no event index: an interrupt per round).

    The driver side is kept lean, so the figure is the device's: each request's indirect
    table is written once, and a batch only rewrites the headers' sectors and the available
    ring, then waits for interrupts until the used index has moved by `depth`."""
    memory = driver.memory
    queue = driver.queues[0]
    interrupted = threading.Event()
    device.connect_interrupts(lambda kind, queue_index: interrupted.set())
    bell = doorbell(device, 0)
    worker = QueueWorker("virtio-bench", device.concurrency)
    worker.add(bell)
    worker.start()
    headers, heads = [], []
    for _ in range(depth):
        header, status, data = driver.allocate(16), driver.allocate(1), driver.allocate(PAGE, PAGE)
        table = driver.allocate(48, 16)
        heads.append(driver.post(0, [(header, 16)], [(data, PAGE), (status, 1)], True, table))
        headers.append(header)
    driver.collect(0)  # nothing yet: this only primes the driver's bookkeeping
    available = queue.available_index  # the posts above are not kicked: undo them
    available_index = (available - depth) & 0xFFFF
    used_index = queue.used_ring + 2
    requests, started = 0, time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            for position, (header, head) in enumerate(zip(headers, heads, strict=True)):
                sector = next(offsets) // 512
                memory.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector))
                slot = (available_index + position) % queue.size
                memory.write_u16(queue.available_ring + 4 + 2 * slot, head)
            target = (available_index + depth) & 0xFFFF
            interrupted.clear()
            memory.write_u16(queue.available_ring + 2, target)
            bell.ring()
            while memory.read_u16(used_index) != target:
                if not interrupted.wait(5):
                    raise RuntimeError("the device stopped completing requests")
                interrupted.clear()
            available_index = target
            requests += depth
        rate = requests / (time.perf_counter() - started)
        print(json.dumps({"worker": worker.stats(), "requests": requests}), file=sys.stderr)
        return rate
    finally:
        worker.stop()
        bell.close()


def threaded_reference_rate(fd: int, depth: int, threads: int, seconds: float) -> float:
    """Requests per second of min(depth, threads) threads each doing 4 KiB preadv calls at
    random offsets back to back: the host's own limit at that concurrency."""
    count = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def read(start: int) -> None:
        buffer, done = mmap.mmap(-1, PAGE), 0
        generator = random.Random(start)
        slots = IMAGE_SIZE // PAGE
        while not stop.is_set():
            os.preadv(fd, [buffer], generator.randrange(slots) * PAGE)
            done += 1
        buffer.close()
        with lock:
            count[0] += done

    readers = [threading.Thread(target=read, args=(i,)) for i in range(min(threads, depth))]
    started = time.perf_counter()
    for thread in readers:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in readers:
        thread.join()
    return count[0] / (time.perf_counter() - started)


def measure_served(path: Path, direct: bool, seconds: float) -> None:
    for depth in SERVED_DEPTHS:
        memory = GuestMemory.anonymous([(0, GUEST_RAM)])
        device = VirtioBlock(memory, DiskConfig(str(path), direct=direct))
        driver = MockDriver(device, memory, 0x1000, GUEST_RAM - 0x1000, record_interrupts=False)
        features = device.device_features_word(0) | device.device_features_word(1) << 32
        driver.initialize(wanted=features & ~(1 << VIRTIO_F_EVENT_IDX))
        fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
        try:
            rate = served_rate(device, driver, depth, seconds, offsets_for(PAGE, False))
            threads = getattr(device, "concurrency", 1)
            limit = threaded_reference_rate(fd, depth, threads, seconds)
        finally:
            os.close(fd)
            device.close()
            memory.close()
        print(
            json.dumps(
                {
                    "case": f"served_rand_read_4KiB_qd{depth}" + ("_direct" if direct else ""),
                    "value": round(rate, 1),
                    "unit": "requests/s",
                    "ratio_to_preadv": round(rate / limit, 3),
                    "reference": round(limit, 1),
                }
            ),
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measured time per case")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the image")
    parser.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    parser.add_argument("--served", action="store_true", help="the device on its worker")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=arguments.dir) as directory:
        path = Path(directory) / "bench.img"
        with open(path, "wb") as image:
            for _ in range(IMAGE_SIZE // MIB):
                image.write(os.urandom(MIB))
        if arguments.served:
            measure_served(path, arguments.direct, arguments.seconds)
            return
        memory = GuestMemory.anonymous([(0, GUEST_RAM)])
        device = VirtioBlock(memory, DiskConfig(str(path), direct=arguments.direct))
        driver = MockDriver(device, memory, 0x1000, GUEST_RAM - 0x1000)
        driver.initialize()
        flags = os.O_RDWR | (os.O_DIRECT if arguments.direct else 0)
        reference_fd = os.open(path, flags)
        try:
            for case in CASES:
                seconds = arguments.seconds
                model = device_rate(
                    device, driver, case, seconds, offsets_for(case.size, case.sequential)
                )
                limit = reference_rate(
                    reference_fd, case, seconds, offsets_for(case.size, case.sequential)
                )
                scale = case.size / 1e6 if case.unit == "MB/s" else 1
                print(
                    json.dumps(
                        {
                            "case": case.name + ("_direct" if arguments.direct else ""),
                            "value": round(model * scale, 1),
                            "unit": case.unit,
                            "ratio_to_preadv": round(model / limit, 3),
                            "reference": round(limit * scale, 1),
                        }
                    ),
                    flush=True,
                )
        finally:
            os.close(reference_fd)
            device.close()
            memory.close()


if __name__ == "__main__":
    main()
