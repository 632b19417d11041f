"""Throughput of the virtio-blk device model alone, driven by the mock driver (no KVM).

Measures the time the device spends in `notify()` (popping chains, preadv/pwritev on guest
memory views, pushing used elements) for batches of requests posted by the mock driver, and
compares it with a plain `os.preadv`/`os.pwritev` loop over the same file and sizes: the limit a
Python device model could reach (page-aligned buffers, as many as the device has in flight).
The image is written first so both read from the page cache.

Prints JSON lines: {"case", "value", "unit", "ratio_to_preadv", "reference"}.
Usage: python3 benchmarks/virtio_blk_model.py [--seconds 1.5] [--dir DIR] [--direct]
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.memory import GuestMemory
from kvmlet.virtio.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, DiskOptions, VirtioBlock
from tests.helpers.virtio_driver import MockDriver

IMAGE_SIZE = 256 << 20
GUEST_RAM = 64 << 20
MIB = 1 << 20
SEGMENT = 64 << 10


def device_rate(device, driver, request_type, size, depth, seconds, offsets):
    """Requests per second of device time for `depth`-deep batches of `size`-byte requests."""
    memory = driver.memory
    headers = [driver.allocate(16) for _ in range(depth)]
    statuses = [driver.allocate(1) for _ in range(depth)]
    data = [driver.allocate(size, 4096) for _ in range(depth)]
    segments = [
        [(address + start, min(SEGMENT, size - start)) for start in range(0, size, SEGMENT)]
        for address in data
    ]
    requests, busy = 0, 0.0
    while busy < seconds:
        for slot in range(depth):
            sector = next(offsets) // 512
            memory.write(headers[slot], struct.pack("<IIQ", request_type, 0, sector))
            readable = [(headers[slot], 16)]
            writable = [(statuses[slot], 1)]
            if request_type == VIRTIO_BLK_T_IN:
                writable = segments[slot] + writable
            else:
                readable += segments[slot]
            driver.post(0, readable, writable)
        started = time.perf_counter()
        device.notify(0)
        busy += time.perf_counter() - started
        completions = driver.collect(0)
        assert len(completions) == depth and not driver.needs_reset
        assert all(memory.read_u8(status) == 0 for status in statuses)
        requests += depth
    return requests / busy


def reference_rate(fd, operation, size, depth, seconds, offsets):
    """Requests per second of a bare preadv/pwritev loop over `depth` buffers of `size` bytes."""
    buffers = [mmap.mmap(-1, size) for _ in range(depth)]
    requests, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for buffer in buffers:
            operation(fd, [buffer], next(offsets))
        requests += depth
    for buffer in buffers:
        buffer.close()
    return requests / elapsed


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measured time per case")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the image")
    parser.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=arguments.dir) as directory:
        path = Path(directory) / "bench.img"
        with open(path, "wb") as image:
            for _ in range(IMAGE_SIZE // MIB):
                image.write(os.urandom(MIB))
        memory = GuestMemory.anonymous([(0, GUEST_RAM)])
        device = VirtioBlock(memory, DiskOptions(str(path), direct=arguments.direct))
        driver = MockDriver(device, memory, 0x1000, GUEST_RAM - 0x1000)
        driver.initialize()
        flags = os.O_RDWR | (os.O_DIRECT if arguments.direct else 0)
        reference_fd = os.open(path, flags)
        cases = [
            ("seq_read_1MiB", VIRTIO_BLK_T_IN, os.preadv, MIB, 8, True, "MB/s"),
            ("seq_write_1MiB", VIRTIO_BLK_T_OUT, os.pwritev, MIB, 8, True, "MB/s"),
            ("rand_read_4KiB", VIRTIO_BLK_T_IN, os.preadv, 4096, 64, False, "requests/s"),
            ("rand_write_4KiB", VIRTIO_BLK_T_OUT, os.pwritev, 4096, 64, False, "requests/s"),
        ]
        try:
            for name, request_type, operation, size, depth, sequential, unit in cases:
                seconds = arguments.seconds
                model = device_rate(
                    device,
                    driver,
                    request_type,
                    size,
                    depth,
                    seconds,
                    offsets_for(size, sequential),
                )
                limit = reference_rate(
                    reference_fd, operation, size, depth, seconds, offsets_for(size, sequential)
                )
                scale = size / 1e6 if unit == "MB/s" else 1
                print(
                    json.dumps(
                        {
                            "case": name + ("_direct" if arguments.direct else ""),
                            "value": round(model * scale, 1),
                            "unit": unit,
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
