"""Backends that move one frame per read and write (a tap, a seqpacket socket in the tests)."""

from __future__ import annotations

import socket

import pytest

from kvmlet.virtio.net.backend import BackendClosed
from kvmlet.virtio.net.config import HEADER_SIZE, MAX_FRAME_SIZE
from kvmlet.virtio.net.frames import DatagramBackend
from tests.helpers.net import ethernet_frame, header


@pytest.fixture
def pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    backend = DatagramBackend(ours, "peer", vnet_header=True)
    yield backend, peer
    backend.close()
    peer.close()


def test_a_frame_is_read_whole_and_held_until_consumed(pair):
    backend, peer = pair
    peer.send(header() + ethernet_frame(60))
    peer.send(header() + ethernet_frame(70))
    assert bytes(backend.receive()) == header() + ethernet_frame(60)
    assert bytes(backend.receive()) == header() + ethernet_frame(60)
    backend.consume()
    assert bytes(backend.receive()) == header() + ethernet_frame(70)
    backend.consume()
    assert backend.receive() is None


def test_a_frame_too_big_for_any_guest_is_dropped_and_counted(pair):
    backend, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    largest = header() + ethernet_frame(MAX_FRAME_SIZE)
    peer.send(header() + ethernet_frame(MAX_FRAME_SIZE + 1))
    peer.send(largest)
    assert bytes(backend.receive()) == largest
    assert backend.dropped_from_peer == 1


def test_frames_go_out_one_message_each_from_their_buffers(pair):
    backend, peer = pair
    frames = [[header(), ethernet_frame(60)], [memoryview(header() + ethernet_frame(80))]]
    assert backend.send(frames) == 0
    assert peer.recv(4096) == HEADER_SIZE * b"\0" + ethernet_frame(60)
    assert peer.recv(4096) == header() + ethernet_frame(80)


def test_frames_the_peer_cannot_take_yet_wait_in_order(pair):
    backend, peer = pair
    frames = [[header(), ethernet_frame(1000, n)] for n in range(400)]
    backend.send(frames)
    assert backend.blocked
    received = []
    peer.settimeout(1)
    while len(received) < len(frames):
        received.append(peer.recv(4096))
        if backend.blocked:
            backend.flush()
    assert received == [b"".join(parts) for parts in frames]
    assert not backend.blocked


def test_a_frame_the_peer_refuses_is_counted_not_retried(pair):
    backend, peer = pair
    too_big = [bytes(1 << 22)]  # beyond the socket's send buffer: EMSGSIZE
    assert backend.send([too_big, [header() + ethernet_frame(60)]]) == 1
    assert peer.recv(4096) == header() + ethernet_frame(60)
    assert not backend.blocked


def test_a_peer_that_closes_ends_the_link(pair):
    backend, peer = pair
    peer.close()
    with pytest.raises(BackendClosed, match="peer closed the connection"):
        backend.receive()
    with pytest.raises(BackendClosed, match="peer: "):
        backend.send([[header() + ethernet_frame(60)]])
