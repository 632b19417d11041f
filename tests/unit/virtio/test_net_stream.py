"""The stream backend (QEMU's `-netdev stream` protocol, as passt speaks it): frames survive any
split of the byte stream, in both directions."""

from __future__ import annotations

import itertools
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.virtio.net.backend import BackendClosed
from kvmlet.virtio.net.config import MAX_FRAME_SIZE
from kvmlet.virtio.net.stream import StreamBackend
from tests.helpers.net import ethernet_frame, stream_message

FRAMES = [ethernet_frame(60, 1), b"", ethernet_frame(15, 2), ethernet_frame(1514, 3)]
STREAM = b"".join(stream_message(frame) for frame in FRAMES)


@pytest.fixture
def pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = StreamBackend(ours, "peer")
    yield backend, peer
    backend.close()
    peer.close()


def drain(backend) -> list[bytes]:
    frames = []
    while (frame := backend.receive()) is not None:
        frames.append(bytes(frame))
        backend.consume()
    return frames


def receive_in_pieces(backend, peer, data: bytes, cuts: list[int]) -> list[bytes]:
    """Write `data` cut at `cuts`, letting the backend read after every piece."""
    frames = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        peer.sendall(data[start:end])
        frames += drain(backend)
    return frames


def test_every_single_split_of_the_stream_gives_the_same_frames(pair):
    backend, peer = pair
    for cut in range(1, len(STREAM)):
        assert receive_in_pieces(backend, peer, STREAM, [cut]) == FRAMES, f"cut at {cut}"


@given(cuts=st.lists(st.integers(1, len(STREAM) - 1), max_size=12))
def test_any_splits_of_the_stream_give_the_same_frames(cuts):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = StreamBackend(ours)
    try:
        assert receive_in_pieces(backend, peer, STREAM, cuts) == FRAMES
    finally:
        backend.close()
        peer.close()


def test_a_frame_stays_until_consumed(pair):
    backend, peer = pair
    peer.sendall(STREAM)
    first = bytes(backend.receive())
    assert bytes(backend.receive()) == first == FRAMES[0]
    backend.consume()
    assert bytes(backend.receive()) == FRAMES[1]


def test_at_most_one_frame_is_read_ahead_of_the_guest(pair):
    """What the device cannot deliver yet stays in the socket, where the poll sees it."""
    backend, peer = pair
    peer.sendall(STREAM)
    backend.receive()
    still_in_socket = backend.socket.recv(1 << 20, socket.MSG_PEEK)
    assert len(still_in_socket) == len(STREAM) - (4 + len(FRAMES[0]) + 4)


@pytest.mark.parametrize("cut", [2, 4, 9, 4 + 70_000, 4 + 70_000 + 3])
def test_an_oversized_frame_is_skipped_and_counted(pair, cut):
    backend, peer = pair
    oversized = struct.pack(">I", 70_000) + bytes(70_000)
    data = oversized + STREAM
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    frames = receive_in_pieces(backend, peer, data, [cut])
    frames += drain(backend)  # the skipping may take a few calls
    assert frames == FRAMES
    assert backend.dropped_from_peer == 1


def test_a_frame_of_the_largest_size_is_received(pair):
    backend, peer = pair
    frame = ethernet_frame(MAX_FRAME_SIZE)
    peer.sendall(stream_message(frame))
    assert drain(backend) == [frame]


def test_a_peer_that_closes_ends_the_link(pair):
    backend, peer = pair
    peer.sendall(stream_message(FRAMES[0]) + b"\0\0")
    peer.close()
    assert bytes(backend.receive()) == FRAMES[0]
    backend.consume()
    with pytest.raises(BackendClosed, match="peer closed the connection"):
        backend.receive()


def test_sending_to_a_closed_peer_ends_the_link(pair):
    backend, peer = pair
    peer.close()
    with pytest.raises(BackendClosed, match="peer: Broken pipe"):
        backend.send([[FRAMES[0]]])


def test_frames_go_out_with_their_length_in_one_batch(pair):
    backend, peer = pair
    frames = [[b"\x01" * 10, b"\x02" * 50], [b"\x03" * 14], [memoryview(b"\x04" * 64)]]
    assert backend.send(frames) == 0
    expected = b"".join(stream_message(b"".join(parts)) for parts in frames)
    assert peer.recv(1 << 16) == expected


def test_a_batch_of_more_buffers_than_one_call_takes_arrives_whole(pair):
    backend, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    frames = [[bytes([n % 256]) * 20, bytes([n % 256]) * 30] for n in range(700)]  # 2,100 buffers
    backend.send(frames)
    expected = b"".join(stream_message(b"".join(parts)) for parts in frames)
    received = bytearray()
    while len(received) < len(expected):
        received += peer.recv(1 << 20)
        backend.flush()
    assert received == expected


class PartialSocket:
    """A socket that takes only as many bytes per call as the test says."""

    def __init__(self, accepts: list[int]):
        self.accepts = accepts
        self.taken = bytearray()

    def setblocking(self, flag):
        pass

    def sendmsg(self, buffers, ancillary=(), flags=0):
        data = b"".join(bytes(buffer) for buffer in buffers)
        count = min(len(data), self.accepts.pop(0) if self.accepts else len(data))
        if count == 0:
            raise BlockingIOError
        self.taken += data[:count]
        return count


@given(
    sizes=st.lists(st.integers(14, 3000), min_size=1, max_size=8),
    accepts=st.lists(st.integers(0, 5000), max_size=20),
)
def test_partial_writes_keep_every_byte_in_order(sizes, accepts):
    sock = PartialSocket(accepts)
    backend = StreamBackend(sock)
    frames = [
        [ethernet_frame(size, seed)[:7], ethernet_frame(size, seed)[7:]]
        for seed, size in enumerate(sizes)
    ]
    half = len(frames) // 2
    backend.send(frames[:half])
    backend.send(frames[half:])  # while blocked, later frames queue behind
    while backend.blocked:
        backend.flush()
    expected = b"".join(stream_message(b"".join(parts)) for parts in frames)
    assert bytes(sock.taken) == expected
