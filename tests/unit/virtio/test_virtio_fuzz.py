"""Hypothesis fuzzing of descriptor tables and rings against every device.

The driver here is hostile: descriptor tables with random flags and links (loops, indices past
the table, indirect tables inside indirect tables), buffers in the gap between RAM banks or
across the end of RAM, lengths up to 4 GiB, absurd available indexes. Invariants: nothing
escapes `notify()`, every walk terminates, the device either completes every posted chain or
reports DEVICE_NEEDS_RESET, no used length exceeds guest RAM, and after a reset the device
serves a well-formed request again.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmlet.memory import GuestMemory
from kvmlet.virtio.blk import VirtioBlock
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.console import VirtioConsole
from kvmlet.virtio.device import (
    ACKNOWLEDGE,
    COMMON_FEATURES,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    RingPart,
)
from kvmlet.virtio.rng import VirtioRng
from tests.helpers.virtio_driver import MockDriver

BANKS = [(0, 0x10000), (0x20000, 0x10000)]
QUEUE_SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x1100, 0x1200
INDIRECT = 0x1400
HEADER = 0x3000

ADDRESSES = st.one_of(
    st.integers(0x4000, 0x30010),
    st.sampled_from(
        [INDIRECT, HEADER, 0xFFF0, 0x10000, 0x1FFF0, 0x2FFF0, 0x2FFFF, 0x30000, 2**64 - 1]
    ),
)
LENGTHS = st.one_of(
    st.integers(0, 0x200), st.sampled_from([16, 32, 0x1000, 0x10000, 0x10001, 2**32 - 1])
)
DESCRIPTORS = st.tuples(ADDRESSES, LENGTHS, st.integers(0, 7), st.integers(0, 2 * QUEUE_SIZE))
TABLE = st.lists(DESCRIPTORS, min_size=QUEUE_SIZE, max_size=QUEUE_SIZE)
HEADERS = st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 2**64 - 1))

_image_directory = tempfile.TemporaryDirectory(prefix="kvmlet-fuzz-")
IMAGE = Path(_image_directory.name) / "fuzz.img"
IMAGE.write_bytes(bytes(64 * 512))


def make_device(kind, memory):
    if kind == "blk":
        return VirtioBlock(memory, DiskConfig(str(IMAGE)))
    if kind == "console":
        return VirtioConsole(memory, lambda data: None)
    return VirtioRng(memory)


def start(device, memory):
    """Bring the device to DRIVER_OK with every queue at the fuzzed ring addresses."""
    for status in (0, ACKNOWLEDGE, ACKNOWLEDGE | DRIVER):
        device.write_status(status)
    device.write_driver_features_word(0, COMMON_FEATURES & 0xFFFF_FFFF)
    device.write_driver_features_word(1, COMMON_FEATURES >> 32)
    device.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
    for index in range(device.queue_count):
        device.set_queue_size(index, QUEUE_SIZE)
        device.set_queue_address(index, RingPart.DESCRIPTOR, DESC)
        device.set_queue_address(index, RingPart.DRIVER, AVAIL)
        device.set_queue_address(index, RingPart.DEVICE, USED)
        device.set_queue_ready(index, True)
    device.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)


def write_table(memory, address, table):
    for slot, entry in enumerate(table):
        memory.write(address + 16 * slot, struct.pack("<QIHH", *entry))


@pytest.mark.parametrize("kind", ["blk", "console", "rng"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=TABLE,
    indirect_table=TABLE,
    heads=st.lists(st.integers(0, 2 * QUEUE_SIZE), max_size=QUEUE_SIZE),
    available_index=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    header=HEADERS,
    used_event=st.integers(0, 0xFFFF),
)
def test_hostile_rings_never_escape_the_device(
    kind, table, indirect_table, heads, available_index, header, used_event
):
    memory = GuestMemory.anonymous(BANKS)
    device = make_device(kind, memory)
    try:
        start(device, memory)
        write_table(memory, DESC, table)
        write_table(memory, INDIRECT, indirect_table)
        memory.write(HEADER, struct.pack("<IIQ", header[0], 0, header[1]))
        for slot, head in enumerate(heads):
            memory.write_u16(AVAIL + 4 + 2 * slot, head)
        posted = len(heads) if available_index is None else available_index
        memory.write_u16(AVAIL + 2, posted)
        memory.write_u16(AVAIL + 4 + 2 * QUEUE_SIZE, used_event)
        for queue_index in range(device.queue_count):
            device.notify(queue_index)
        if kind == "console":
            device.receive(b"input for the hostile guest")

        completed = memory.read_u16(USED + 2)
        event(f"needs reset: {device.stats()['needs_reset']}, completed: {min(completed, 3)}+")
        if not device.stats()["needs_reset"]:
            assert completed == posted, "without NEEDS_RESET every posted chain completes"
        for slot in range(min(completed, QUEUE_SIZE)):
            assert memory.read_u32(USED + 8 + 8 * slot) <= memory.size

        recover_after_reset(device, memory)
    finally:
        device.close()
        memory.close()


def recover_after_reset(device, memory):
    """A reset brings a device that was fed garbage back to serving a sane driver."""
    device.write_status(0)
    assert device.status == 0
    driver = MockDriver(device, memory, 0x20000, 0x10000)
    driver.initialize(queue_size=QUEUE_SIZE)
    if isinstance(device, VirtioBlock):
        head, _ = driver.post_data(0, [struct.pack("<IIQ", 0, 0, 0)], [512, 1])
    elif isinstance(device, VirtioConsole):
        head, _ = driver.post_data(1, [b"hello"], [])
    else:
        head, _ = driver.post_data(0, [], [16])
    queue_index = 1 if isinstance(device, VirtioConsole) else 0
    driver.kick(queue_index)
    assert [c.head for c in driver.collect(queue_index)] == [head]
    assert not driver.needs_reset
    device.write_status(0)


BUFFERS = st.tuples(st.integers(0x4000, 0xF000), st.integers(1, 0x400))
CHAINS = st.lists(
    st.tuples(st.lists(BUFFERS, max_size=2), st.lists(BUFFERS, min_size=1, max_size=2)),
    min_size=1,
    max_size=4,
)
MUTATIONS = st.lists(
    st.tuples(st.integers(0, 16 * QUEUE_SIZE + 6 + 2 * QUEUE_SIZE), st.integers(1, 255)),
    max_size=3,
)


def lay_out(memory, chains) -> int:
    """Well-formed chains (a 16-byte header first) in the table; returns how many were posted."""
    slot = 0
    for position, (readable, writable) in enumerate(chains):
        buffers = [(HEADER, 16, 0)] + [(a, n, 0) for a, n in readable]
        buffers += [(a, n, 2) for a, n in writable]
        if slot + len(buffers) > QUEUE_SIZE:
            return position
        memory.write_u16(AVAIL + 4 + 2 * position, slot)
        for offset, (address, length, flags) in enumerate(buffers):
            last = offset == len(buffers) - 1
            entry = (address, length, flags | (0 if last else 1), 0 if last else slot + 1)
            memory.write(DESC + 16 * slot, struct.pack("<QIHH", *entry))
            slot += 1
    return len(chains)


@pytest.mark.parametrize("kind", ["blk", "console", "rng"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=CHAINS, mutations=MUTATIONS, header=HEADERS)
def test_nearly_valid_rings_complete_or_need_reset(kind, chains, mutations, header):
    memory = GuestMemory.anonymous(BANKS)
    device = make_device(kind, memory)
    try:
        start(device, memory)
        memory.write(HEADER, struct.pack("<IIQ", header[0], 0, header[1] % 128))
        posted = lay_out(memory, chains)
        memory.write_u16(AVAIL + 2, posted)
        for offset, flip in mutations:
            address = (
                DESC + offset if offset < 16 * QUEUE_SIZE else AVAIL + offset - 16 * QUEUE_SIZE
            )
            memory.write_u8(address, memory.read_u8(address) ^ flip)
        posted = memory.read_u16(AVAIL + 2)
        for queue_index in range(device.queue_count):
            device.notify(queue_index)
        completed = memory.read_u16(USED + 2)
        event(f"needs reset: {device.stats()['needs_reset']}, completed: {min(completed, 3)}+")
        if not device.stats()["needs_reset"]:
            assert completed == posted
        recover_after_reset(device, memory)
    finally:
        device.close()
        memory.close()
