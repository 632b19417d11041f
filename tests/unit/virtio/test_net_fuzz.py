"""Hypothesis against virtio-net's data path: hostile transmit chains and headers, hostile
receive buffers, and whatever the backend's peer sends.

Invariants: nothing escapes the device, every walk ends, every chain taken completes unless
the device gave up on the driver (DEVICE_NEEDS_RESET), what reaches the peer is a whole frame
of a sane size, every chain is counted as sent or dropped, and after a reset the device serves a
well-formed driver again.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import event, given
from hypothesis import strategies as st

from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, RingPart
from kvmlet.virtio.net.config import (
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
    without_unmet_dependencies,
)
from kvmlet.virtio.net.device import RECEIVE_QUEUE, TRANSMIT_QUEUE, VirtioNet
from kvmlet.virtio.net.frames import DatagramBackend
from kvmlet.virtio.net.stream import StreamBackend
from tests.helpers.net import MAC, FakeWatch, ethernet_frame, header, stream_message
from tests.helpers.virtio_driver import MockDriver

BANKS = [(0, 0x10000), (0x20000, 0x10000)]
QUEUE_SIZE = 8
RINGS = {TRANSMIT_QUEUE: (0x1000, 0x1100, 0x1200), RECEIVE_QUEUE: (0x1800, 0x1900, 0x1A00)}
HEADER_AREA = 0x3000
INDIRECT = 0x3400

ADDRESSES = st.one_of(
    st.integers(0x4000, 0x30010),
    st.sampled_from([HEADER_AREA, INDIRECT, 0xFFF0, 0x10000, 0x1FFF4, 0x2FFF0, 0x30000, 2**64 - 1]),
)
LENGTHS = st.one_of(
    st.integers(0, 0x200),
    st.sampled_from([12, 13, 26, 0x5EE, 0x1000, 0x10000, 0x10001, 2**32 - 1]),
)
DESCRIPTORS = st.tuples(ADDRESSES, LENGTHS, st.integers(0, 7), st.integers(0, 2 * QUEUE_SIZE))
TABLE = st.lists(DESCRIPTORS, min_size=QUEUE_SIZE, max_size=QUEUE_SIZE)
HEADER_BYTES = st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE)
BACKENDS = st.sampled_from(["stream", "vnet"])


def make_device(kind, memory):
    """A device over a socketpair, the peer end, and its fake readiness watch."""
    if kind == "stream":
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = StreamBackend(ours, "fuzz peer")
    else:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        backend = DatagramBackend(ours, "fuzz peer", True, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    peer.setblocking(False)
    device = VirtioNet(memory, backend, MAC, on_link_change=lambda up, message: None)
    watch = FakeWatch()
    device.connect_backend_watch(watch)
    return device, peer


def start(device, features_mask):
    """DRIVER_OK with a random subset of the offered features, rings at fixed addresses."""
    for status in (0, ACKNOWLEDGE, ACKNOWLEDGE | DRIVER):
        device.write_status(status)
    offered = device.device_features_word(0) | device.device_features_word(1) << 32
    accepted = without_unmet_dependencies(offered & (features_mask | 1 << 32))
    device.write_driver_features_word(0, accepted & 0xFFFF_FFFF)
    device.write_driver_features_word(1, accepted >> 32)
    device.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
    for index, (descriptors, available, used) in RINGS.items():
        device.set_queue_size(index, QUEUE_SIZE)
        device.set_queue_address(index, RingPart.DESCRIPTOR, descriptors)
        device.set_queue_address(index, RingPart.DRIVER, available)
        device.set_queue_address(index, RingPart.DEVICE, used)
        device.set_queue_ready(index, True)
    device.write_status(device.status | DRIVER_OK)


def write_table(memory, address, table):
    for slot, entry in enumerate(table):
        memory.write(address + 16 * slot, struct.pack("<QIHH", *entry))


def post(memory, queue_index, table, heads, available_index, used_event):
    descriptors, available, _ = RINGS[queue_index]
    write_table(memory, descriptors, table)
    for slot, head in enumerate(heads):
        memory.write_u16(available + 4 + 2 * slot, head)
    posted = len(heads) if available_index is None else available_index
    memory.write_u16(available + 2, posted)
    memory.write_u16(available + 4 + 2 * QUEUE_SIZE, used_event)
    return posted


def peer_frames(kind, peer) -> list[bytes]:
    """Everything the peer got, as frames (stream: split by the length prefixes)."""
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 17)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    if kind == "vnet":
        return [chunk[HEADER_SIZE:] for chunk in chunks]
    data, frames = b"".join(chunks), []
    while data:
        length = struct.unpack_from(">I", data)[0]
        assert len(data) >= 4 + length, "a frame cut short on the stream"
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    return frames


def used_index(memory, queue_index):
    return memory.read_u16(RINGS[queue_index][2] + 2)


def recover_after_reset(device, memory, kind, peer):
    """A reset brings a device fed garbage back to serving a sane driver both ways."""
    device.write_status(0)
    driver = MockDriver(device, memory, 0x20000, 0x10000)
    driver.initialize(queue_size=QUEUE_SIZE)
    frame = ethernet_frame(60)
    head, _ = driver.post_data(TRANSMIT_QUEUE, [header() + frame], [])
    driver.kick(TRANSMIT_QUEUE)
    assert [c.head for c in driver.collect(TRANSMIT_QUEUE)] == [head]
    if device.link_up:
        assert peer_frames(kind, peer)[-1:] == [frame]
    assert not driver.needs_reset


@given(
    kind=BACKENDS,
    features=st.integers(0, 2**32 - 1),
    table=TABLE,
    indirect_table=TABLE,
    heads=st.lists(st.integers(0, 2 * QUEUE_SIZE), max_size=QUEUE_SIZE),
    available_index=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    header_bytes=HEADER_BYTES,
    used_event=st.integers(0, 0xFFFF),
)
def test_hostile_transmit_chains_never_escape_the_device(
    kind, features, table, indirect_table, heads, available_index, header_bytes, used_event
):
    memory = GuestMemory.anonymous(BANKS)
    device, peer = make_device(kind, memory)
    try:
        start(device, features)
        memory.write(HEADER_AREA, header_bytes)
        write_table(memory, INDIRECT, indirect_table)
        posted = post(memory, TRANSMIT_QUEUE, table, heads, available_index, used_event)
        device.notify(TRANSMIT_QUEUE)

        needs_reset = device.stats()["needs_reset"]
        completed = used_index(memory, TRANSMIT_QUEUE)
        counters = device.counters
        dropped = counters.tx_dropped_malformed + counters.tx_dropped_too_big
        event(f"needs reset: {needs_reset}, sent: {min(counters.tx_frames, 2)}+")
        if not needs_reset:
            assert completed == posted, "without NEEDS_RESET every posted chain completes"
            assert counters.tx_frames + dropped == completed
        for frame in peer_frames(kind, peer):
            assert 14 <= len(frame) <= MAX_FRAME_SIZE
        recover_after_reset(device, memory, kind, peer)
    finally:
        device.close()
        peer.close()
        memory.close()


FRAME_SIZES = st.one_of(st.integers(0, 3000), st.sampled_from([13, 14, 1514, 1519, 65554, 65555]))


@given(
    kind=BACKENDS,
    features=st.integers(0, 2**32 - 1),
    table=TABLE,
    indirect_table=TABLE,
    heads=st.lists(st.integers(0, 2 * QUEUE_SIZE), max_size=QUEUE_SIZE),
    available_index=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    used_event=st.integers(0, 0xFFFF),
    frames=st.lists(st.tuples(HEADER_BYTES, FRAME_SIZES), max_size=6),
)
def test_hostile_receive_buffers_and_peer_frames_never_escape_the_device(
    kind, features, table, indirect_table, heads, available_index, used_event, frames
):
    memory = GuestMemory.anonymous(BANKS)
    device, peer = make_device(kind, memory)
    try:
        start(device, features)
        write_table(memory, INDIRECT, indirect_table)
        posted = post(memory, RECEIVE_QUEUE, table, heads, available_index, used_event)
        for vnet_header, size in frames:
            frame = ethernet_frame(size)
            try:
                if kind == "stream":
                    peer.sendall(stream_message(frame))
                else:
                    peer.send(vnet_header + frame)
            except BlockingIOError:
                break
        device.notify(RECEIVE_QUEUE)
        for _ in range(4):
            device.backend_ready(True, False, False)

        needs_reset = device.stats()["needs_reset"]
        completed = used_index(memory, RECEIVE_QUEUE)
        event(f"needs reset: {needs_reset}, delivered: {min(device.counters.rx_frames, 2)}+")
        assert completed <= max(posted, 0) or needs_reset
        _, _, used = RINGS[RECEIVE_QUEUE]
        mergeable = device.negotiated(VIRTIO_NET_F_MRG_RXBUF)
        for slot in range(min(completed, QUEUE_SIZE)):
            length = memory.read_u32(used + 8 + 8 * slot)
            assert length <= (HEADER_SIZE + MAX_FRAME_SIZE if not mergeable else memory.size)
        recover_after_reset(device, memory, kind, peer)
    finally:
        device.close()
        peer.close()
        memory.close()


@given(
    kind=BACKENDS,
    features=st.integers(0, 2**32 - 1),
    chains=st.lists(st.tuples(HEADER_BYTES, FRAME_SIZES, st.integers(1, 3)), max_size=4),
)
def test_each_well_formed_chain_is_sent_whole_or_counted_as_dropped(kind, features, chains):
    """Random headers and sizes in well-formed chains: what goes out is exactly the frame."""
    memory = GuestMemory.anonymous([(0, 4 << 20)])
    device, peer = make_device(kind, memory)
    try:
        driver = MockDriver(device, memory, 0x10000, (4 << 20) - 0x10000)
        offered = device.device_features_word(0) | device.device_features_word(1) << 32
        driver.initialize(without_unmet_dependencies(offered & (features | 1 << 32)))
        expected = []
        for header_bytes, size, pieces in chains:
            frame = ethernet_frame(size, size)
            cut = len(frame) // 2
            parts = {
                1: [header_bytes + frame],
                2: [header_bytes, frame],
                3: [header_bytes, frame[:cut], frame[cut:]],
            }[pieces]
            driver.post_data(TRANSMIT_QUEUE, parts, [])
            expected.append(frame)
        driver.kick(TRANSMIT_QUEUE)
        assert len(driver.collect(TRANSMIT_QUEUE)) == len(chains)
        counters = device.counters
        dropped = counters.tx_dropped_malformed + counters.tx_dropped_too_big
        assert counters.tx_frames + dropped == len(chains)
        sent = peer_frames(kind, peer)
        assert len(sent) == counters.tx_frames
        remaining = iter(expected)
        assert all(frame in remaining for frame in sent), "frames sent whole and in order"
    finally:
        device.close()
        peer.close()
        memory.close()
