"""A vhost-user backend written in Python for the tests: the other end of kvmlet's frontend.

It speaks the backend side of the protocol over a connected socket and records every message
(request, flags, payload, how many file descriptors came with it). It maps guest RAM from the
memfds SET_MEM_TABLE passes (its own mappings: what it reads there proves the descriptors were
the guest's RAM) and serves its rings like a device: on a kick it takes each available chain,
writes the chain's readable bytes, reversed, into its writable buffers, returns the chain on the
used ring and signals the ring's call eventfd.

`misbehave(request)` may replace the answer to a request with an `Answer` (raw bytes, perhaps
late, perhaps with a descriptor), `SILENCE` (no answer) or `HANG_UP` (close the connection).

As a program (`python3 -m tests.helpers.vhost_user_backend SOCKET`) it listens on SOCKET, serves
one connection and exits when the frontend hangs up: a backend in a process of its own.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmlet.vhost import user_protocol as wire
from kvmlet.vhost.user_protocol import Request

_DESCRIPTOR = struct.Struct("<QIHH")
_USED_ELEMENT = struct.Struct("<II")
_U16 = struct.Struct("<H")
DESC_F_NEXT = 1
DESC_F_WRITE = 2

BLK_FEATURES = 1 << 32 | 1 << 29 | 1 << 28 | 1 << wire.F_PROTOCOL_FEATURES | 1 << 1 | 1 << 9
"""VERSION_1, EVENT_IDX, INDIRECT_DESC, protocol features, and two device bits (1, 9)."""
ALL_PROTOCOL_FEATURES = (
    1 << wire.PROTOCOL_F_MQ
    | 1 << wire.PROTOCOL_F_REPLY_ACK
    | 1 << wire.PROTOCOL_F_CONFIG
    | 1 << wire.PROTOCOL_F_RESET_DEVICE
    | 1 << 1  # LOG_SHMFD: offered, never wanted by kvmlet
)


@dataclass(frozen=True)
class Answer:
    """What to send instead of the normal reply."""

    raw: bytes
    delay: float = 0.0
    with_fd: bool = False


SILENCE = "silence"
HANG_UP = "hang up"

REPLIED = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE,
    Request.GET_CONFIG,
}


def reply(request: int, payload: bytes) -> bytes:
    """A well-formed reply to `request`."""
    return wire.HEADER.pack(request, wire.REPLY_FLAGS, len(payload)) + payload


@dataclass
class Received:
    request: int
    flags: int
    payload: bytes
    fd_count: int

    @property
    def name(self) -> str:
        return wire.request_name(self.request)


@dataclass
class Region:
    guest_address: int
    size: int
    user_address: int
    mapping: mmap.mmap


@dataclass
class Vring:
    num: int = 0
    base: int = 0
    descriptor: int = 0
    used: int = 0
    available: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    running: bool = False
    used_index: int = 0
    served: list[bytes] = field(default_factory=list)


class PythonBackend:
    """The backend end of one vhost-user connection, served on a thread of its own."""

    def __init__(
        self,
        sock: socket.socket,
        features: int = BLK_FEATURES,
        protocol_features: int = ALL_PROTOCOL_FEATURES,
        queue_num: int = 2,
        config: bytes = bytes(range(64)),
        misbehave: Callable[[int], Answer | str | None] = lambda request: None,
    ):
        self.sock = sock
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.config = bytearray(config)
        self.misbehave = misbehave
        self.acked_features: int | None = None
        self.acked_protocol_features = 0
        self.messages: list[Received] = []
        self.regions: list[Region] = []
        self.vrings: dict[int, Vring] = {}
        self.resets = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Running ------------------------------------------------------------------------------

    def start(self) -> PythonBackend:
        self._thread = threading.Thread(target=self.serve, name="python-backend", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(5)
        self.hang_up()
        for region in self.regions:
            region.mapping.close()
        for vring in self.vrings.values():
            for fd in (vring.kick, vring.call, vring.err):
                if fd is not None:
                    os.close(fd)
        self.vrings.clear()
        self.regions.clear()

    def hang_up(self) -> None:
        """Close the connection, as a backend that died (shut down first: another thread's
        select may still hold the socket, which would delay the close)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def serve(self) -> None:
        """Answer messages and serve kicked rings until the frontend hangs up (or `stop`)."""
        try:
            while not self._stopping and self.sock.fileno() >= 0:
                kicks = {v.kick: i for i, v in self.vrings.items() if v.kick is not None}
                readable, _, _ = select.select([self.sock, *kicks], [], [], 0.02)
                for fd in readable:
                    if fd is self.sock:
                        if not self._handle_message():
                            return
                    else:
                        self._kicked(kicks[fd])
        except BaseException as error:  # reported by the test through `self.error`
            self.error = error

    def names(self) -> list[str]:
        """The requests received so far, by name."""
        with self.lock:
            return [message.name for message in self.messages]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[str]:
        """The names of the first `count` messages, once that many arrived."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.names()[:count]

    # Messages -----------------------------------------------------------------------------

    def _receive(self, size: int) -> tuple[bytes, list[int]]:
        data, fds = b"", []
        while len(data) < size:
            chunk, more, _, _ = socket.recv_fds(self.sock, size - len(data), wire.MAX_REGIONS)
            if not chunk:
                raise EOFError
            data += chunk
            fds += more
        return data, fds

    def _handle_message(self) -> bool:
        try:
            header, fds = self._receive(wire.HEADER.size)
            request, flags, size = wire.HEADER.unpack(header)
            payload, more = self._receive(size) if size else (b"", [])
        except (EOFError, OSError):
            return False
        fds += more
        with self.lock:
            self.messages.append(Received(request, flags, payload, len(fds)))
        try:
            return self._answer(request, flags, payload, fds)
        except (BrokenPipeError, ConnectionResetError):
            return False  # the frontend hung up first (it gave up on a late answer)

    def _answer(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bool:
        action = self.misbehave(request)
        if action == HANG_UP:
            self.hang_up()
            return False
        if action == SILENCE:
            return True
        if isinstance(action, Answer):
            time.sleep(action.delay)
            extra = [os.eventfd(0)] if action.with_fd else []
            try:
                socket.send_fds(self.sock, [action.raw], extra)
            finally:
                for fd in extra:
                    os.close(fd)
            return True
        answer = self._dispatch(Request(request), payload, fds)
        if answer is not None:
            self.sock.sendall(reply(request, answer))
        elif flags & wire.FLAG_NEED_REPLY:
            self.sock.sendall(reply(request, wire.u64(0)))
        return True

    def _dispatch(self, request: Request, payload: bytes, fds: list[int]) -> bytes | None:
        if request is Request.GET_FEATURES:
            return wire.u64(self.features)
        if request is Request.GET_PROTOCOL_FEATURES:
            return wire.u64(self.protocol_features)
        if request is Request.GET_QUEUE_NUM:
            return wire.u64(self.queue_num)
        if request is Request.GET_CONFIG:
            offset, size, _ = wire.CONFIG_HEADER.unpack_from(payload)
            data = bytes(self.config[offset : offset + size])
            return wire.CONFIG_HEADER.pack(offset, size, 0) + data
        if request is Request.GET_VRING_BASE:
            index, _ = wire.VRING_STATE.unpack(payload)
            vring = self.vrings.setdefault(index, Vring())
            vring.running = False
            return wire.VRING_STATE.pack(index, vring.base)
        self._apply(request, payload, fds)
        return None

    def _apply(self, request: Request, payload: bytes, fds: list[int]) -> None:
        if request is Request.SET_FEATURES:
            self.acked_features = wire.decode_u64(payload)
        elif request is Request.SET_PROTOCOL_FEATURES:
            self.acked_protocol_features = wire.decode_u64(payload)
        elif request is Request.SET_MEM_TABLE:
            self._map_regions(payload, fds)
        elif request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ENABLE):
            index, num = wire.VRING_STATE.unpack(payload)
            vring = self.vrings.setdefault(index, Vring())
            if request is Request.SET_VRING_NUM:
                vring.num = num
            elif request is Request.SET_VRING_BASE:
                vring.base = vring.used_index = num
            else:
                vring.enabled = bool(num)
        elif request is Request.SET_VRING_ADDR:
            index, _, descriptor, used, available, _ = wire.VRING_ADDRESS.unpack(payload)
            vring = self.vrings.setdefault(index, Vring())
            vring.descriptor, vring.used, vring.available = descriptor, used, available
        elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            value = wire.decode_u64(payload)
            vring = self.vrings.setdefault(value & 0xFF, Vring())
            fd = None if value & wire.VRING_NO_FD else fds.pop(0)
            attribute = {
                Request.SET_VRING_KICK: "kick",
                Request.SET_VRING_CALL: "call",
                Request.SET_VRING_ERR: "err",
            }[request]
            old = getattr(vring, attribute)
            if old is not None:
                os.close(old)
            setattr(vring, attribute, fd)
            vring.running = vring.running or request is Request.SET_VRING_KICK
        elif request is Request.SET_CONFIG:
            offset, size, _ = wire.CONFIG_HEADER.unpack_from(payload)
            self.config[offset : offset + size] = payload[wire.CONFIG_HEADER.size :]
        elif request is Request.RESET_DEVICE:
            self.resets += 1
            for vring in self.vrings.values():
                vring.running = vring.enabled = False

    def _map_regions(self, payload: bytes, fds: list[int]) -> None:
        count, _ = wire.MEMORY_HEADER.unpack_from(payload)
        for region in self.regions:
            region.mapping.close()
        self.regions = []
        for index in range(count):
            offset = wire.MEMORY_HEADER.size + index * wire.MEMORY_REGION.size
            guest, size, user, mmap_offset = wire.MEMORY_REGION.unpack_from(payload, offset)
            mapping = mmap.mmap(fds[index], size, mmap.MAP_SHARED, offset=mmap_offset)
            os.close(fds[index])
            self.regions.append(Region(guest, size, user, mapping))

    # Guest memory and rings ---------------------------------------------------------------

    def _view(self, address: int, length: int, by_user_address: bool) -> memoryview:
        for region in self.regions:
            start = region.user_address if by_user_address else region.guest_address
            if start <= address and address + length <= start + region.size:
                offset = address - start
                return memoryview(region.mapping)[offset : offset + length]
        raise ValueError(f"{length} bytes at {address:#x} are not in the memory table")

    def read_guest(self, guest_address: int, length: int) -> bytes:
        """Guest RAM as this backend's own mapping shows it."""
        with self.lock:
            return bytes(self._view(guest_address, length, by_user_address=False))

    def write_guest(self, guest_address: int, data: bytes) -> None:
        with self.lock:
            self._view(guest_address, len(data), by_user_address=False)[:] = data

    def _kicked(self, index: int) -> None:
        vring = self.vrings[index]
        try:
            os.eventfd_read(vring.kick)
        except BlockingIOError:
            return
        protocol = self.acked_features is not None and self.acked_features >> 30 & 1
        if vring.running and (vring.enabled or not protocol):
            with self.lock:
                self._serve_ring(vring)

    def _serve_ring(self, vring: Vring) -> None:
        available = self._view(vring.available, 4 + 2 * vring.num, by_user_address=True)
        used = self._view(vring.used, 4 + 8 * vring.num, by_user_address=True)
        table = self._view(vring.descriptor, 16 * vring.num, by_user_address=True)
        served = 0
        while vring.base != _U16.unpack_from(available, 2)[0]:
            head = _U16.unpack_from(available, 4 + 2 * (vring.base % vring.num))[0]
            readable, writable, index = b"", [], head
            while True:
                address, length, flags, next_index = _DESCRIPTOR.unpack_from(table, 16 * index)
                if flags & DESC_F_WRITE:
                    writable.append(self._view(address, length, by_user_address=False))
                else:
                    readable += bytes(self._view(address, length, by_user_address=False))
                if not flags & DESC_F_NEXT:
                    break
                index = next_index
            answer, written = readable[::-1], 0
            for buffer in writable:
                part = answer[written : written + len(buffer)]
                buffer[: len(part)] = part
                written += len(part)
            vring.served.append(readable)
            slot = vring.used_index % vring.num
            _USED_ELEMENT.pack_into(used, 4 + 8 * slot, head, written)
            vring.used_index = (vring.used_index + 1) & 0xFFFF
            _U16.pack_into(used, 2, vring.used_index)
            vring.base = (vring.base + 1) & 0xFFFF
            served += 1
        if served and vring.call is not None:
            os.eventfd_write(vring.call, 1)

    def signal_error(self, index: int) -> None:
        """Report ring `index` broken through its err eventfd."""
        os.eventfd_write(self.vrings[index].err, 1)


def main(path: str) -> int:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(1)
    os.rename(path + ".new", path)  # the path appears once connecting to it works
    connection, _ = listener.accept()
    listener.close()
    backend = PythonBackend(connection)
    backend.serve()
    if backend.error is not None:
        raise backend.error
    print(f"served {len(backend.messages)} messages", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
