"""Helpers for the virtio-net tests: a virtio-net device, its mock driver and its backend's peer.

`NetRig` puts a `VirtioNet` in a fake guest memory with a `MockDriver` playing the guest and a
`FakeWatch` standing in for the worker's readiness watch; `pump()` then does what the worker
would: poll the backend's descriptor for what the device asked and call `backend_ready`.
"""

from __future__ import annotations

import select
import socket
import struct
import time

from kvmlet.memory import GuestMemory
from kvmlet.virtio.net.backend import NetBackend
from kvmlet.virtio.net.config import HEADER
from kvmlet.virtio.net.device import RECEIVE_QUEUE, TRANSMIT_QUEUE, VirtioNet
from kvmlet.virtio.net.frames import DatagramBackend
from kvmlet.virtio.net.stream import StreamBackend
from tests.helpers.virtio_driver import MockDriver

MAC = bytes.fromhex("525400123456")
ARENA = 0x10000


def header(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, buffers=0):
    return HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, buffers)


def ethernet_frame(size: int, seed: int = 0) -> bytes:
    """A frame of `size` bytes: broadcast destination, our MAC as source, a counting payload."""
    body = bytes((seed + index) & 0xFF for index in range(max(0, size - 14)))
    return (b"\xff" * 6 + MAC + b"\x08\x00" + body)[:size]


def stream_message(frame: bytes) -> bytes:
    return struct.pack(">I", len(frame)) + frame


def read_stream_frames(sock: socket.socket, count: int, timeout: float = 2.0) -> list[bytes]:
    """Read `count` length-prefixed frames from the peer end of a stream backend (exactly
    their bytes: what follows stays in the socket)."""
    sock.settimeout(timeout)
    frames = []
    for _ in range(count):
        length = struct.unpack(">I", _recv_exactly(sock, 4))[0]
        frames.append(_recv_exactly(sock, length))
    return frames


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"peer closed with {size - len(data)} bytes still expected")
        data += chunk
    return bytes(data)


def wait_for(condition, timeout: float = 5.0) -> None:
    """Wait until `condition()` holds (a worker thread is doing the work)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.001)


class FakeWatch:
    """A readiness watch as the worker gives one: records what the device wants."""

    def __init__(self) -> None:
        self.readable = False
        self.writable = False
        self.closed = False

    def want(self, readable: bool, writable: bool) -> None:
        self.readable, self.writable = readable, writable

    def close(self) -> None:
        self.closed = True


class NetRig:
    """A device, its driver, its watch and the peer end of its backend."""

    def __init__(
        self,
        memory: GuestMemory,
        backend: NetBackend,
        peer: socket.socket | None,
        **device_options,
    ):
        self.memory = memory
        self.backend = backend
        self.peer = peer
        self.link_reports: list[tuple[bool, str]] = []
        self.device = VirtioNet(
            memory,
            backend,
            MAC,
            on_link_change=lambda up, message: self.link_reports.append((up, message)),
            **device_options,
        )
        self.watch = FakeWatch()
        self.device.connect_backend_watch(self.watch)
        self.driver = MockDriver(self.device, memory, ARENA, memory.size - ARENA)

    @classmethod
    def stream(cls, memory: GuestMemory, **device_options) -> NetRig:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(memory, StreamBackend(ours, "test peer"), peer, **device_options)

    @classmethod
    def datagram(
        cls, memory: GuestMemory, vnet_header: bool = False, offloads: int = 0, **device_options
    ) -> NetRig:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        backend = DatagramBackend(ours, "test peer", vnet_header, offloads)
        return cls(memory, backend, peer, **device_options)

    def start(self, wanted: int | None = None, queue_size: int | None = None) -> int:
        return self.driver.initialize(wanted, queue_size)

    def transmit(self, *frames: bytes, head: bytes | None = None, kick: bool = True) -> list[int]:
        """Post each frame behind a header (`head`, or a plain one) and kick the queue."""
        heads = [
            self.driver.post_data(TRANSMIT_QUEUE, [head or header(), frame], [])[0]
            for frame in frames
        ]
        if kick:
            self.driver.kick(TRANSMIT_QUEUE)
        return heads

    def post_receive_buffers(self, count: int, size: int, kick: bool = True) -> dict[int, int]:
        """Post `count` one-buffer receive chains of `size` bytes; returns head -> address."""
        posted = {}
        for _ in range(count):
            head, addresses = self.driver.post_data(RECEIVE_QUEUE, [], [size])
            posted[head] = addresses[0]
        if kick:
            self.driver.kick(RECEIVE_QUEUE)
        return posted

    def pump(self, rounds: int = 64) -> int:
        """Do what the worker does while the backend is ready for what the device wants;
        returns how many times it called the device."""
        calls = 0
        for _ in range(rounds):
            if self.watch.closed:
                break
            mask = (select.POLLIN if self.watch.readable else 0) | (
                select.POLLOUT if self.watch.writable else 0
            )
            poller = select.poll()
            poller.register(self.backend.fileno(), mask)
            ready = poller.poll(0)
            if not ready:
                break
            events = ready[0][1]
            self.device.backend_ready(
                bool(events & select.POLLIN),
                bool(events & select.POLLOUT),
                bool(events & (select.POLLHUP | select.POLLERR)),
            )
            calls += 1
        return calls

    def close(self) -> None:
        self.device.close()
        if self.peer is not None:
            self.peer.close()
