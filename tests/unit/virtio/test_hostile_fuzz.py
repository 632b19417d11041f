"""Hypothesis fuzzing of rings a hostile guest makes refer to themselves, and of chains whose
descriptors all alias one buffer.

Self-referencing rings: the buffers a device writes into (disk reads of an image the test fills,
random bytes, console input) overlap the descriptor table, the available ring, the used ring
and the request headers, so serving one request rewrites the rings the next one comes from,
up to re-arming them for ever. Invariants: every kick returns after a bounded round
(ROUND_REQUESTS chains), nothing escapes the device, it either still runs or needs a reset,
and a reset brings it back.

Aliasing descriptors: up to a queue's worth of descriptors pointing at the same large buffer,
directly or in an indirect table. Invariants: what a device moves per chain stays within its
own limit, not the sum the descriptors claim, and used lengths never exceed what was writable.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.memory import GuestMemory
from kvmlet.virtio.blk import SECTOR_SIZE, VIRTIO_BLK_T_IN, VirtioBlock
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.console import (
    MAX_OUTPUT_PER_CHAIN,
    RECEIVE_QUEUE,
    TRANSMIT_QUEUE,
    VirtioConsole,
)
from kvmlet.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmlet.virtio.rng import MAX_BYTES_PER_REQUEST, VirtioRng
from kvmlet.virtio.serving import ROUND_REQUESTS
from tests.unit.virtio.test_virtio_fuzz import recover_after_reset, start

RAM = 0x40000
QUEUE_SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x1100, 0x1200
RING_END = USED + 6 + 8 * QUEUE_SIZE
HEADERS = AVAIL + 0x40  # 16 bytes per chain, between the available and the used ring
STATUS = 0x1400
SECTORS = 64
REARMING_SECTORS = 1 << 16

_directory = tempfile.TemporaryDirectory(prefix="kvmlet-hostile-fuzz-")


def image_with(seed: int, rearming: bool) -> Path:
    """64 sectors of random bytes; or, `rearming`, one sector per value of the 16-bit available
    index (a sparse 32 MiB file), each of which, read over the available ring, bumps its index
    and points the next header at the next sector: the ring re-arms for ever."""
    path = Path(_directory.name) / f"image-{seed}-{rearming}.img"
    if path.exists():
        return path
    if not rearming:
        path.write_bytes(random.Random(seed).randbytes(SECTORS * SECTOR_SIZE))
        return path
    with open(path, "wb") as image:
        image.truncate(REARMING_SECTORS * SECTOR_SIZE)
        block = bytearray(HEADERS - AVAIL + 16)
        for sector in range(REARMING_SECTORS):
            struct.pack_into("<H", block, 2, (sector + 2) & 0xFFFF)
            next_sector = (sector + 1) % REARMING_SECTORS
            struct.pack_into("<IIQ", block, HEADERS - AVAIL, VIRTIO_BLK_T_IN, 0, next_sector)
            os.pwrite(image.fileno(), block, sector * SECTOR_SIZE)
    return path


# Where a written buffer lands: on a ring, a header, or next to them.
TARGETS = st.one_of(
    st.sampled_from([DESC, AVAIL, AVAIL + 2, USED, USED + 2, HEADERS, HEADERS + 8]),
    st.integers(DESC, RING_END + 0x200),
)
CHAINS = st.lists(
    st.tuples(TARGETS, st.integers(1, 0x400), st.integers(0, 2**64 - 1)),
    min_size=1,
    max_size=3,
)


def lay_out_chains(memory, chains, request_type=VIRTIO_BLK_T_IN) -> int:
    """Per chain: a header, a writable buffer at the fuzzed target, a status byte."""
    slot = 0
    for position, (target, length, sector) in enumerate(chains):
        header = HEADERS + 16 * position
        memory.write(header, struct.pack("<IIQ", request_type, 0, sector % SECTORS))
        descriptors = [
            (header, 16, VIRTQ_DESC_F_NEXT, slot + 1),
            (target, length, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, slot + 2),
            (STATUS + position, 1, VIRTQ_DESC_F_WRITE, 0),
        ]
        for index, descriptor in enumerate(descriptors):
            memory.write(DESC + 16 * (slot + index), struct.pack("<QIHH", *descriptor))
        memory.write_u16(AVAIL + 4 + 2 * position, slot)
        slot += 3
    memory.write_u16(AVAIL + 2, len(chains))
    return len(chains)


def break_any_loop(memory) -> None:
    """Point every descriptor outside its table: a device still serving stops (NEEDS_RESET)."""
    for slot in range(QUEUE_SIZE):
        memory.write(DESC + 16 * slot, struct.pack("<QIHH", 0, 16, VIRTQ_DESC_F_NEXT, 999))


def bounded_kicks(device, memory, queue_index: int, kicks: int = 4) -> None:
    """Kick `kicks` times; each kick must return after one bounded round."""
    for _ in range(kicks):
        before = device.queue_stats[queue_index].requests
        kick = threading.Thread(target=device.notify, args=(queue_index,), daemon=True)
        kick.start()
        kick.join(20)
        if kick.is_alive():
            break_any_loop(memory)
            kick.join(5)
            pytest.fail("a kick did not return")
        assert device.queue_stats[queue_index].requests - before <= ROUND_REQUESTS


@settings(max_examples=100, deadline=None)
@given(chains=CHAINS, seed=st.integers(0, 3), rearming=st.booleans())
def test_disk_reads_over_their_own_rings_stay_bounded(chains, seed, rearming):
    memory = GuestMemory.anonymous([(0, RAM)])
    device = VirtioBlock(memory, DiskConfig(str(image_with(seed, rearming))))
    try:
        start(device, memory)
        if rearming:
            chains = [(AVAIL, SECTOR_SIZE, 0)]
        lay_out_chains(memory, chains)
        bounded_kicks(device, memory, 0)
        assert device.running or device.stats()["needs_reset"]
        recover_after_reset(device, memory)
    finally:
        device.close()
        memory.close()


@settings(max_examples=100, deadline=None)
@given(chains=CHAINS)
def test_random_bytes_over_the_rings_stay_bounded(chains):
    memory = GuestMemory.anonymous([(0, RAM)])
    device = VirtioRng(memory)
    try:
        start(device, memory)
        lay_out_chains(memory, chains)
        bounded_kicks(device, memory, 0)
        recover_after_reset(device, memory)
    finally:
        device.close()
        memory.close()


@settings(max_examples=100, deadline=None)
@given(
    targets=st.lists(st.tuples(TARGETS, st.integers(1, 0x100)), min_size=1, max_size=4),
    typed=st.binary(min_size=1, max_size=0x200),
)
def test_console_input_over_the_receive_rings_stays_bounded(targets, typed):
    memory = GuestMemory.anonymous([(0, RAM)])
    device = VirtioConsole(memory, lambda data: None)
    try:
        start(device, memory)
        for position, (target, length) in enumerate(targets):
            descriptor = (target, length, VIRTQ_DESC_F_WRITE, 0)
            memory.write(DESC + 16 * position, struct.pack("<QIHH", *descriptor))
            memory.write_u16(AVAIL + 4 + 2 * position, position)
        memory.write_u16(AVAIL + 2, len(targets))
        for _ in range(3):
            device.receive(typed)
            bounded_kicks(device, memory, RECEIVE_QUEUE, kicks=1)
        assert device.pending_input <= len(typed) * 3
        recover_after_reset(device, memory)
    finally:
        device.close()
        memory.close()


BIG = 0x10000
ALIASES = st.lists(
    st.tuples(st.sampled_from([0x8000, 0x8010, 0x20000]), st.sampled_from([BIG, BIG - 1, 1])),
    min_size=1,
    max_size=QUEUE_SIZE,
)


def aliasing_chain(memory, aliases, writable_from: int, indirect: bool) -> None:
    """One chain of `aliases` (address, length) descriptors, readable up to `writable_from`."""
    table = 0x30000 if indirect else DESC
    count = len(aliases)
    for index, (address, length) in enumerate(aliases):
        flags = (VIRTQ_DESC_F_WRITE if index >= writable_from else 0) | (
            VIRTQ_DESC_F_NEXT if index < count - 1 else 0
        )
        memory.write(table + 16 * index, struct.pack("<QIHH", address, length, flags, index + 1))
    if indirect:
        memory.write(DESC, struct.pack("<QIHH", table, 16 * count, VIRTQ_DESC_F_INDIRECT, 0))
    memory.write_u16(AVAIL + 4, 0)
    memory.write_u16(AVAIL + 2, 1)


@pytest.mark.parametrize("kind", ["console", "rng", "blk"])
@settings(max_examples=60, deadline=None)
@given(aliases=ALIASES, writable_from=st.integers(0, QUEUE_SIZE), indirect=st.booleans())
def test_aliasing_descriptors_move_bounded_bytes(kind, aliases, writable_from, indirect):
    memory = GuestMemory.anonymous([(0, 0x40000)])
    handed_over = []
    if kind == "console":
        device = VirtioConsole(memory, lambda data: handed_over.append(len(data)))
        queue_index = TRANSMIT_QUEUE
    elif kind == "rng":
        device, queue_index = VirtioRng(memory), 0
    else:
        device, queue_index = VirtioBlock(memory, DiskConfig(str(image_with(0, False)))), 0
    try:
        start(device, memory)
        memory.write(0x8000, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        aliasing_chain(memory, aliases, writable_from, indirect)
        device.notify(queue_index)
        stats = device.stats()
        if stats["needs_reset"]:
            return
        queue = stats["queues"][queue_index]
        claimed_writable = sum(length for _, length in aliases[writable_from:])
        assert queue["requests"] == 1
        assert queue["bytes_to_guest"] <= claimed_writable
        if kind == "console":
            assert sum(handed_over) == queue["bytes_from_guest"] <= MAX_OUTPUT_PER_CHAIN
        elif kind == "rng":
            assert queue["bytes_to_guest"] <= MAX_BYTES_PER_REQUEST
        used_length = memory.read_u32(USED + 8)
        assert used_length <= claimed_writable
    finally:
        device.close()
        memory.close()
