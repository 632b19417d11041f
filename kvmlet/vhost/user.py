"""The vhost-user frontend: kvmlet's end of a UNIX socket to a backend daemon.

`VhostUserFrontend(sock)` (or `.connect(path)`) does the handshake at once: GET_FEATURES; when
the backend speaks protocol features, GET/SET_PROTOCOL_FEATURES keeping MQ, REPLY_ACK, CONFIG
and RESET_DEVICE; GET_QUEUE_NUM with MQ; SET_OWNER. Afterwards it implements `VhostFrontend`.
With REPLY_ACK every request that has no reply of its own asks for one, so a refusal is an error
at the request that caused it, not a silent divergence.

Every exchange has a deadline (`timeout`, for sending and for the whole reply): a backend that
does not answer, answers late, short, with the wrong type, flags or size, or with file
descriptors (closed at once) gets the connection closed, as the spec prescribes, and every call
from then on raises `VhostError` at once: a late reply can never be taken for the answer to a
later request. A backend that is gone shows as a readable socket; `check_connection` (called
then) tells a disconnect or an unsolicited message from a spurious wake-up.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from kvmlet.vhost import user_protocol as wire
from kvmlet.vhost.frontend import MemoryRegion, VhostError, VringAddresses
from kvmlet.vhost.user_protocol import Request

DEFAULT_TIMEOUT = 5.0
"""Seconds a backend has to take a request and answer it: a vCPU thread waits that long at
worst (driver status writes start and stop the backend)."""
WANTED_PROTOCOL_FEATURES = (
    1 << wire.PROTOCOL_F_MQ
    | 1 << wire.PROTOCOL_F_REPLY_ACK
    | 1 << wire.PROTOCOL_F_CONFIG
    | 1 << wire.PROTOCOL_F_RESET_DEVICE
)
T = TypeVar("T")
_FD_SPACE = socket.CMSG_SPACE(wire.MAX_REGIONS * array.array("i").itemsize)


class VhostUserFrontend:
    """One vhost-user connection, set up; `VhostFrontend` on top of the wire format."""

    needs_memory_fds = True

    def __init__(
        self,
        sock: socket.socket,
        name: str = "vhost-user",
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.name = name
        self.timeout = timeout
        self.features = 0
        self.protocol_features = 0
        self.max_vrings: int | None = None
        self.failure: str | None = None
        self._socket: socket.socket | None = sock
        self._lock = threading.Lock()
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path: str, **options) -> VhostUserFrontend:
        """Connect to a backend listening on the UNIX socket `path`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(options.get("timeout", DEFAULT_TIMEOUT))
        try:
            sock.connect(path)
        except OSError as error:
            sock.close()
            raise VhostError(
                f"cannot connect to the vhost-user backend at {path}: {_reason(error)}"
            ) from None
        return cls(sock, **options)

    def __repr__(self) -> str:
        return f"VhostUserFrontend({self.name!r}, features={self.features:#x})"

    def has(self, protocol_feature: int) -> bool:
        """Whether protocol feature `protocol_feature` (a bit number) was negotiated."""
        return bool(self.protocol_features >> protocol_feature & 1)

    @property
    def _speaks_protocol_features(self) -> bool:
        return bool(self.features >> wire.F_PROTOCOL_FEATURES & 1)

    def _handshake(self) -> None:
        self.features = self._query(Request.GET_FEATURES, b"", wire.U64.size, wire.decode_u64)
        if self._speaks_protocol_features:
            offered = self._query(
                Request.GET_PROTOCOL_FEATURES, b"", wire.U64.size, wire.decode_u64
            )
            negotiated = offered & WANTED_PROTOCOL_FEATURES
            self._command(Request.SET_PROTOCOL_FEATURES, wire.u64(negotiated))
            self.protocol_features = negotiated
        if self.has(wire.PROTOCOL_F_MQ):
            queues = self._query(Request.GET_QUEUE_NUM, b"", wire.U64.size, wire.decode_u64)
            self.max_vrings = min(queues, wire.MAX_VRINGS)
        self._command(Request.SET_OWNER)

    # VhostFrontend --------------------------------------------------------------------------

    def guest_features(self) -> int:
        return self.features & ~(1 << wire.F_PROTOCOL_FEATURES)

    def set_features(self, features: int) -> None:
        """Acknowledges VHOST_USER_F_PROTOCOL_FEATURES too when the backend offered it, so
        that rings start disabled and wait for SET_VRING_ENABLE."""
        private = self.features & 1 << wire.F_PROTOCOL_FEATURES
        self._command(Request.SET_FEATURES, wire.u64(features | private))

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        fds = [region.fd for region in regions]
        if None in fds:
            raise VhostError(f"{self.name}: vhost-user needs guest RAM in a memfd")
        self._command(Request.SET_MEM_TABLE, wire.memory_table(regions), fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self._command(Request.SET_VRING_NUM, wire.vring_state(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self._command(Request.SET_VRING_BASE, wire.vring_state(index, base))

    def set_vring_addr(self, index: int, addresses: VringAddresses) -> None:
        self._command(Request.SET_VRING_ADDR, wire.vring_address(index, addresses))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._command(Request.SET_VRING_KICK, wire.vring_fd(index), [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        self._command(Request.SET_VRING_CALL, wire.vring_fd(index), [fd])

    def set_vring_err(self, index: int, fd: int) -> None:
        self._command(Request.SET_VRING_ERR, wire.vring_fd(index), [fd])

    def get_vring_base(self, index: int) -> int:
        return self._query(
            Request.GET_VRING_BASE,
            wire.vring_state(index, 0),
            wire.VRING_STATE.size,
            lambda reply: wire.decode_vring_base(reply, index),
        )

    def start(self, indexes: Sequence[int]) -> None:
        """Rings start on their first kick; with protocol features they also wait to be
        enabled."""
        self._enable(indexes, True)

    def stop(self, indexes: Sequence[int]) -> None:
        self._enable(indexes, False)

    def _enable(self, indexes: Sequence[int], enabled: bool) -> None:
        if self._speaks_protocol_features:
            for index in indexes:
                self._command(Request.SET_VRING_ENABLE, wire.vring_state(index, int(enabled)))

    def reset(self) -> None:
        """RESET_DEVICE where the backend offers it. Otherwise stopping every ring (which the
        device has done) is the whole reset: RESET_OWNER is deprecated because backends read it
        as dropping the session, so kvmlet never sends it."""
        if self.has(wire.PROTOCOL_F_RESET_DEVICE):
            self._command(Request.RESET_DEVICE)

    def read_config(self, size: int) -> bytes | None:
        if not self.has(wire.PROTOCOL_F_CONFIG):
            return None
        return self._query(
            Request.GET_CONFIG,
            wire.config_access(0, bytes(size)),
            wire.config_reply_size(size),
            lambda reply: wire.decode_config(reply, 0, size),
        )

    def write_config(self, offset: int, data: bytes) -> None:
        if self.has(wire.PROTOCOL_F_CONFIG):
            self._command(Request.SET_CONFIG, wire.config_access(offset, data))

    def fileno(self) -> int | None:
        return None if self._socket is None else self._socket.fileno()

    def check_connection(self) -> None:
        """The socket became readable: the backend hung up, or sent what nobody asked for
        (the main channel carries only replies); either way the connection is over."""
        with self._lock:
            sock = self._connected()
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            if not poll.poll(0):
                return
            try:
                data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as error:
                self._fail(f"connection lost: {_reason(error)}")
            self._fail("the backend closed the connection" if not data else "unsolicited message")

    def close(self) -> None:
        """End the connection: shut down first, so that the backend sees it end even while
        another descriptor of the socket stays open (a worker's watch holds a duplicate)."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
            self._socket.close()
            self._socket = None

    # Exchanges ------------------------------------------------------------------------------

    def _command(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request without a reply of its own; with REPLY_ACK, wait for its acknowledgement
        (a refusal raises, the connection stays: the backend answered as the protocol says)."""
        acknowledged = self.has(wire.PROTOCOL_F_REPLY_ACK)
        with self._lock:
            deadline = time.monotonic() + self.timeout
            self._send(request, wire.encode(request, payload, acknowledged), fds, deadline)
            if acknowledged:
                status = self._receive_reply(request, wire.U64.size, deadline)
        if acknowledged:
            wire.decode_ack(status, request)

    def _query(
        self, request: Request, payload: bytes, reply_size: int, decode: Callable[[bytes], T]
    ) -> T:
        """A request whose reply carries `reply_size` bytes: what `decode` makes of them."""
        with self._lock:
            deadline = time.monotonic() + self.timeout
            self._send(request, wire.encode(request, payload), (), deadline)
            reply = self._receive_reply(request, reply_size, deadline)
            try:
                return decode(reply)
            except VhostError as error:
                self._fail(str(error))

    def _connected(self) -> socket.socket:
        if self._socket is None:
            raise VhostError(f"{self.name}: {self.failure or 'the connection is closed'}")
        return self._socket

    def _fail(self, reason: str) -> NoReturn:
        """Close the connection for good and raise the error that says why."""
        self.failure = f"{reason} (connection closed)"
        self.close()
        raise VhostError(f"{self.name}: {reason}")

    def _remaining(self, deadline: float, request: Request) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._fail(f"no reply to {request.name} within {self.timeout:g} s")
        return remaining

    def _send(self, request: Request, message: bytes, fds: Sequence[int], deadline: float) -> None:
        sock = self._connected()
        try:
            sock.settimeout(self._remaining(deadline, request))
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sent = sock.sendmsg([message], rights, socket.MSG_NOSIGNAL)
            if sent < len(message):
                sock.sendall(message[sent:], socket.MSG_NOSIGNAL)
        except TimeoutError:
            self._fail(f"the backend took no {request.name} within {self.timeout:g} s")
        except OSError as error:
            self._fail(f"cannot send {request.name}: {_reason(error)}")

    def _receive_reply(self, request: Request, size: int, deadline: float) -> bytes:
        header = self._receive_exactly(wire.HEADER.size, request, deadline)
        try:
            wire.check_reply_header(header, request, size)
        except VhostError as error:
            self._fail(str(error))
        return self._receive_exactly(size, request, deadline)

    def _receive_exactly(self, size: int, request: Request, deadline: float) -> bytes:
        sock = self._connected()
        data = bytearray()
        while len(data) < size:
            try:
                sock.settimeout(self._remaining(deadline, request))
                chunk, ancillary, flags, _ = sock.recvmsg(size - len(data), _FD_SPACE)
            except TimeoutError:
                self._fail(f"no reply to {request.name} within {self.timeout:g} s")
            except OSError as error:
                self._fail(f"connection lost: {_reason(error)}")
            if ancillary or flags & socket.MSG_CTRUNC:
                _close_passed_fds(ancillary)
                self._fail(f"the reply to {request.name} came with file descriptors")
            if not chunk:
                self._fail(f"the backend closed the connection instead of answering {request.name}")
            data += chunk
        return bytes(data)


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


def _close_passed_fds(ancillary: list[tuple[int, int, bytes]]) -> None:
    """Close descriptors a reply smuggled in, so that a hostile backend cannot fill our table."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
