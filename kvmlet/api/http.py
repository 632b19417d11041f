"""An HTTP/1.1 server on a listening UNIX socket, bounded against hostile clients.

Parsing is h11's (a small, well-kept sans-I/O HTTP/1.1 library): it turns bytes into request
events and refuses what is malformed with the status to answer. This module does the I/O, on
threads of its own so nothing here ever runs on a vCPU thread:

- an acceptor thread takes connections, checks the peer's credentials (SO_PEERCRED: only the
  user that owns the machine may connect, whatever the socket's mode says), and queues them;
- at most `Limits.connections` handler threads serve the queue, started as needed, at a lower
  scheduling priority than the guest's threads;
- every connection has deadlines: a request must arrive whole within `request_seconds` of its
  first byte (a client that trickles bytes gets 408 and is closed), a kept-alive connection is
  closed after `idle_seconds` without a request, and a client that does not read its response
  within `send_seconds` is dropped;
- headers beyond `header_bytes` get 431, bodies beyond `body_bytes` get 413 without being
  read, malformed requests get h11's 400 (or 505 for an HTTP version it cannot speak), and a
  connection beyond the queue's room gets 503 at once. Each error is a JSON `{"error": ...}`.
  The acceptor answers 503 and 403 itself without waiting: it sends the answer, shuts its
  side, and keeps the socket for up to `REJECT_LINGER` seconds, reading and dropping what the
  client sends meanwhile (closing on unread data would reset the connection, and the client
  might lose the answer), at most `MAX_REJECTED` at a time.

A client that disconnects mid-request is simply forgotten. The handler (`Handler`) runs on a
handler thread and returns (status, JSON-able body, extra headers).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import h11

from kvmlet.errors import LazyLogger

log = LazyLogger(__name__)

SERVER_NAME = b"kvmlet"
REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    411: b"Length Required",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
REJECT_LINGER = 1.0
MAX_REJECTED = 256
NICENESS_INCREMENT = 5
"""The acceptor and handler threads run this much nicer than the monitor: under CPU pressure
the guest's vCPU and device threads come first."""


class Limits(NamedTuple):
    connections: int = 8
    waiting: int = 64
    header_bytes: int = 8 * 1024
    body_bytes: int = 64 * 1024
    request_seconds: float = 10.0
    idle_seconds: float = 30.0
    send_seconds: float = 5.0


DEFAULT_LIMITS = Limits()


class Request(NamedTuple):
    method: str
    target: str  # path and query string, as sent
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


Reply = tuple[int, object, list[tuple[str, str]]]
Handler = Callable[[Request], Reply]


def owner_only(peer_uid: int) -> bool:
    """The default peer check: the connecting process runs as the monitor's user."""
    return peer_uid == os.geteuid()


def peer_uid(connection: socket.socket) -> int:
    """The user id of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(credentials)[1]


def encode_json(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode() + b"\n"


class HttpServer:
    """Serves `handler` on `listener` (a listening UNIX socket) until `close()`."""

    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        limits: Limits = DEFAULT_LIMITS,
        allowed: Callable[[int], bool] = owner_only,
        name: str = "kvmlet-api",
    ):
        self.listener = listener
        self.handler = handler
        self.limits = limits
        self.allowed = allowed
        self.name = name
        self.counters = collections.Counter()
        self._waiting: collections.deque[socket.socket] = collections.deque()
        self._condition = threading.Condition()
        self._idle_workers = 0
        self._workers: list[threading.Thread] = []
        self._sessions: set[Session] = set()
        self._closing = False
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._rejected: dict[int, tuple[socket.socket, float]] = {}  # fd: (socket, deadline)
        self._acceptor = threading.Thread(target=self._accept_loop, name=name, daemon=True)

    def start(self) -> HttpServer:
        self.listener.setblocking(False)
        self._acceptor.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, let requests in progress finish for up to `timeout` seconds, and
        drop the rest. The listener itself is its owner's to close."""
        with self._condition:
            if self._closing:
                return
            self._closing = True
            self._condition.notify_all()
            for session in self._sessions:
                if not session.busy:  # waiting for a request: end it now
                    with contextlib.suppress(OSError):
                        session.connection.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        deadline = time.monotonic() + timeout
        for thread in [self._acceptor, *self._workers]:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._condition:
            while self._waiting:
                self._waiting.popleft().close()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)

    # -- accepting ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        _lower_priority()
        self._poller = poller = select.poll()
        listener = self.listener.fileno()
        poller.register(listener, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        try:
            while not self._closing:
                timeout = None
                if self._rejected:
                    first = min(deadline for _, deadline in self._rejected.values())
                    timeout = max(0, int((first - time.monotonic()) * 1000) + 1)
                ready = {fd for fd, _ in poller.poll(timeout)}
                if self._wake_read in ready:
                    return
                self._drain_rejected(ready)
                if listener in ready:
                    self._accept()
        finally:
            for connection, _ in self._rejected.values():
                connection.close()
            self._rejected.clear()

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:  # out of descriptors: wait rather than spin
            log.warning("%s: accept failed: %s", self.name, error)
            time.sleep(0.1)
            return
        self._admit(connection)

    def _reject(self, connection: socket.socket, status: int, message: str) -> None:
        """Answer `status` at once and linger (see the module docstring), never waiting."""
        body = encode_json({"error": message})
        reply = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, REASONS[status], len(body))
        ) + body
        try:
            connection.setblocking(False)
            connection.send(reply, socket.MSG_NOSIGNAL)
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            connection.close()
            return
        if len(self._rejected) >= MAX_REJECTED:
            connection.close()
            return
        self._rejected[connection.fileno()] = (connection, time.monotonic() + REJECT_LINGER)
        self._poller.register(connection.fileno(), select.POLLIN)

    def _drain_rejected(self, ready: set[int]) -> None:
        now = time.monotonic()
        for fd, (connection, deadline) in list(self._rejected.items()):
            if fd in ready:
                try:
                    finished = not connection.recv(65536)
                except BlockingIOError:
                    finished = False
                except OSError:
                    finished = True
            else:
                finished = now >= deadline
            if finished:
                self._poller.unregister(fd)
                del self._rejected[fd]
                connection.close()

    def _admit(self, connection: socket.socket) -> None:
        self.counters["connections"] += 1
        try:
            uid = peer_uid(connection)
        except OSError:
            uid = -1
        if not self.allowed(uid):
            self.counters["refused_peers"] += 1
            self._reject(connection, 403, f"user {uid} may not use this machine's API")
            return
        with self._condition:
            if len(self._waiting) >= self.limits.waiting:
                self.counters["refused_busy"] += 1
                busy = True
            else:
                busy = False
                self._waiting.append(connection)
                if (
                    len(self._waiting) > self._idle_workers
                    and len(self._workers) < self.limits.connections
                ):
                    self._start_worker()
                self._condition.notify()
        if busy:
            self._reject(connection, 503, "too many clients: try again")

    def _start_worker(self) -> None:
        thread = threading.Thread(
            target=self._worker_loop, name=f"{self.name}-{len(self._workers)}", daemon=True
        )
        self._workers.append(thread)
        self._idle_workers += 1
        thread.start()

    def _worker_loop(self) -> None:
        _lower_priority()
        while True:
            with self._condition:
                while not self._waiting and not self._closing:
                    self._condition.wait()
                if self._closing:
                    self._idle_workers -= 1
                    return
                connection = self._waiting.popleft()
                self._idle_workers -= 1
            session = Session(self, connection)
            with self._condition:
                self._sessions.add(session)
            try:
                session.serve()
            except Exception:  # a bug here must not take the server down
                log.exception("%s: connection failed", self.name)
            finally:
                connection.close()
                with self._condition:
                    self._sessions.discard(session)
                    self._idle_workers += 1

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Reply:
        self.counters["requests"] += 1
        try:
            return self.handler(request)
        except Exception as error:
            log.exception("%s: %s %s failed", self.name, request.method, request.target)
            return 500, {"error": f"internal error: {type(error).__name__}: {error}"}, []


class Session:
    """One connection: requests read with h11 under deadlines, answered one at a time."""

    def __init__(self, server: HttpServer, connection: socket.socket):
        self.server = server
        self.limits = server.limits
        self.connection = connection
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.header_bytes)
        self.busy = False  # between a whole request and the end of its response

    def serve(self) -> None:
        while not self.server._closing:
            request = self._read_request()
            if request is None:
                return
            self.busy = True
            status, payload, headers = self.server.dispatch(request)
            sent = self._send(status, payload, headers)
            self.busy = False
            if not sent:
                return
            if self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE:
                return
            self.http.start_next_cycle()

    def _read_request(self) -> Request | None:
        """The next whole request, or None after answering an error or losing the client."""
        limits = self.limits
        idle_deadline = time.monotonic() + limits.idle_seconds
        request_deadline: float | None = None
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as error:  # malformed, or the client went away
                self._error(error.error_status_hint, f"malformed request: {error}")
                return None
            if event is h11.NEED_DATA:
                deadline = idle_deadline if request_deadline is None else request_deadline
                data = self._receive(deadline)
                if data is None:
                    if request_deadline is not None:
                        seconds = limits.request_seconds
                        self._error(408, f"request not received within {seconds:g} s")
                    return None
                if data and request_deadline is None:
                    request_deadline = time.monotonic() + limits.request_seconds
                self.http.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                if event.http_version not in (b"1.0", b"1.1"):
                    self._error(505, f"HTTP/{event.http_version.decode()} is not spoken here")
                    return None
                size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if size > limits.header_bytes:  # arrived in one read: h11 did not count it
                    self._error(431, f"request headers over {limits.header_bytes} bytes")
                    return None
                length = _header(event.headers, b"content-length")
                if length is not None and int(length) > limits.body_bytes:
                    self._error(413, f"request body over {limits.body_bytes} bytes")
                    return None
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.body_bytes:
                    self._error(413, f"request body over {limits.body_bytes} bytes")
                    return None
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = {
                    name.decode("ascii").lower(): value.decode("latin-1")
                    for name, value in head.headers
                }
                return Request(
                    head.method.decode("ascii", "replace"),
                    head.target.decode("ascii", "replace"),
                    headers,
                    bytes(body),
                )
            else:  # ConnectionClosed, or a PAUSED state we never ask for
                return None

    def _receive(self, deadline: float) -> bytes | None:
        """Bytes from the client (b"" at its end of stream), or None at the deadline or on an
        error of the connection."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.connection.settimeout(remaining)
        try:
            return self.connection.recv(65536)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def _error(self, status: int, message: str) -> None:
        self.server.counters[f"status_{status}"] += 1
        self._send(status, {"error": message}, [("connection", "close")])

    def _send(self, status: int, payload: object, headers: list[tuple[str, str]]) -> bool:
        if self.http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        body = encode_json(payload)
        head = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("server", "kvmlet"),
            *headers,
        ]
        try:
            data = self.http.send(
                h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))
            )
            data += self.http.send(h11.Data(data=body))
            data += self.http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return False
        self.connection.settimeout(self.limits.send_seconds)
        try:
            self.connection.sendall(data, socket.MSG_NOSIGNAL)
        except OSError:
            return False
        return True


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread) + NICENESS_INCREMENT
        os.setpriority(os.PRIO_PROCESS, thread, niceness)
