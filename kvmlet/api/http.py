"""An HTTP/1.1 server on a listening UNIX socket, bounded against hostile clients.

This module does the I/O, on threads of its own (nothing here runs on a vCPU thread), in two
parts; each client's protocol state (h11's parser, the request arriving, the answer's bytes)
is a `Connection` (http_connection.py):

- one I/O thread owns every socket: it accepts, checks the peer's credentials (SO_PEERCRED:
  only the user that owns the machine may connect, whatever the socket's mode says), reads
  without blocking and feeds h11, writes answers without blocking, and enforces deadlines. A
  slow, idle or silent client therefore costs a socket and a few objects, never a thread;
- at most `Limits.handlers` handler threads run the handler on whole requests, at a lower
  scheduling priority than the guest's threads; at most `Limits.queued` requests wait for them.

Limits and what a client gets past them, each as a JSON `{"error": ...}`: a request that has
not arrived whole `request_seconds` after its first byte gets 408; headers over `header_bytes`
431; a body over `body_bytes` 413, without reading it; malformed requests h11's 400 (505 for an
HTTP version it cannot speak); a connection beyond `connections` open ones, or a request beyond
the queue's room, 503. A kept-alive connection idle for `idle_seconds` is closed, and so is one
whose client does not read its answer within `send_seconds`. A client that disconnects
mid-request is forgotten. After an error the server shuts its side and lingers up to
`LINGER_SECONDS`, reading and dropping what the client still sends: closing with unread data
would reset the connection, and the client could lose the answer.

The server's threads keep to a `CpuBudget` of `Limits.cpu_share` of one CPU (cpu_budget.py),
so that a flood of requests does not slow the guest.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import h11

from kvmlet.api.cpu_budget import CpuBudget, lower_priority
from kvmlet.api.http_connection import (
    DISPATCHED,
    LINGERING,
    READING,
    WRITING,
    Connection,
    Handler,
    Reply,
    Request,
    check_head,
    raw_answer,
)
from kvmlet.errors import LazyLogger

log = LazyLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
LINGER_SECONDS = 1.0
READ_SIZE = 65536


class Limits(NamedTuple):
    connections: int = 64
    handlers: int = 4
    queued: int = 64
    header_bytes: int = 8 * 1024
    body_bytes: int = 64 * 1024
    request_seconds: float = 10.0
    idle_seconds: float = 30.0
    send_seconds: float = 5.0
    cpu_share: float = 0.25  # of one CPU, on average, for all the server's threads
    cpu_burst: float = 0.05  # CPU seconds the server may use at once before it must wait


DEFAULT_LIMITS = Limits()


def owner_only(peer_uid: int) -> bool:
    """The default peer check: the connecting process runs as the monitor's user."""
    return peer_uid == os.geteuid()


def peer_uid(connection: socket.socket) -> int:
    """The user id of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(credentials)[1]


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
        self.counters: collections.Counter[str] = collections.Counter()
        self._connections: dict[int, Connection] = {}
        self._poller = select.poll()
        self._lock = threading.Condition()
        self._queue: collections.deque[tuple[Connection, Request]] = collections.deque()
        self._answers: list[tuple[Connection, int, bytes]] = []
        self._handlers: list[threading.Thread] = []
        self._idle_handlers = 0
        self._closing = False
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.budget = CpuBudget(limits.cpu_share, limits.cpu_burst)
        self._io_thread = threading.Thread(target=self._io_loop, name=name, daemon=True)

    def start(self) -> HttpServer:
        self.listener.setblocking(False)
        self._io_thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, give requests being answered up to `timeout` seconds, close every
        connection. The listener is its owner's to close."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify_all()
        self._wake()
        deadline = time.monotonic() + timeout
        threads = [self._io_thread, *self._handlers]
        for thread in threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in threads):  # else a late wake-up would
            for fd in (self._wake_read, self._wake_write):  # write to a reused descriptor
                os.close(fd)

    def dispatch(self, request: Request) -> Reply:
        try:
            return self.handler(request)
        except Exception as error:
            log.exception("%s: %s %s failed", self.name, request.method, request.target)
            return 500, {"error": f"internal error: {type(error).__name__}: {error}"}, []

    # -- the I/O thread -------------------------------------------------------------------------

    def _io_loop(self) -> None:
        lower_priority()
        listener = self.listener.fileno()
        self._poller.register(listener, select.POLLIN)
        self._poller.register(self._wake_read, select.POLLIN)
        try:
            while True:
                events = self._poller.poll(self._poll_timeout())
                used = time.thread_time()
                for fd, mask in events:
                    if fd == self._wake_read:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_read, 4096)
                    elif fd == listener:
                        self._accept_all()
                    elif fd in self._connections:
                        self._ready(self._connections[fd], mask)
                self._take_answers()
                self._expire()
                if self._closing and self._shut_down(listener):
                    return
                self.budget.pay(time.thread_time() - used)
        finally:
            for connection in list(self._connections.values()):
                self._drop(connection)

    def _poll_timeout(self) -> int | None:
        waiting = [c.deadline for c in self._connections.values() if c.state != DISPATCHED]
        if self._closing:
            waiting.append(time.monotonic() + 0.05)
        if not waiting:
            return None
        return max(0, int((min(waiting) - time.monotonic()) * 1000) + 1)

    def _shut_down(self, listener: int) -> bool:
        """While closing: stop accepting, end connections waiting for a request; True once
        no answer is still being made or sent."""
        with contextlib.suppress(KeyError):
            self._poller.unregister(listener)
        for connection in list(self._connections.values()):
            if connection.state in (READING, LINGERING):
                self._drop(connection)
        return not self._connections

    def _accept_all(self) -> None:
        for _ in range(64):  # a burst; the rest on the next round
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors: answer the others first
                log.warning("%s: accept failed: %s", self.name, error)
                return
            self.counters["connections"] += 1
            sock.setblocking(False)
            connection = Connection(sock, self.limits, time.monotonic())
            self._connections[connection.fd] = connection
            try:
                uid = peer_uid(sock)
            except OSError:
                uid = -1
            if not self.allowed(uid):
                self.counters["refused_peers"] += 1
                self._fail(connection, 403, f"user {uid} may not use this machine's API")
            elif len(self._connections) > self.limits.connections:
                self.counters["refused_busy"] += 1
                self._fail(connection, 503, "too many clients: try again")
            else:
                self._poller.register(connection.fd, select.POLLIN)

    def _ready(self, connection: Connection, mask: int) -> None:
        if connection.state == WRITING:
            self._write(connection)
            return
        try:
            data = connection.socket.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if connection.state == LINGERING:
            if not data:
                self._drop(connection)
            return
        if data and connection.request_started is None:
            connection.request_started = time.monotonic()
            connection.deadline = connection.request_started + self.limits.request_seconds
        connection.http.receive_data(data)
        self._advance(connection)

    def _advance(self, connection: Connection) -> None:
        """Parse what has arrived; a whole request goes to the handlers."""
        limits = self.limits
        while True:
            try:
                event = connection.http.next_event()
            except h11.RemoteProtocolError as error:  # malformed, or the client went away
                self._fail(connection, error.error_status_hint, f"malformed request: {error}")
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                problem = check_head(event, limits)
                if problem is not None:
                    self._fail(connection, *problem)
                    return
                connection.head = event
            elif isinstance(event, h11.Data):
                connection.body += event.data
                if len(connection.body) > limits.body_bytes:
                    self._fail(connection, 413, f"request body over {limits.body_bytes} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage) and connection.head is not None:
                self._queue_request(connection)
                return
            else:  # ConnectionClosed: the client is done
                self._drop(connection)
                return

    def _queue_request(self, connection: Connection) -> None:
        request = connection.request()
        self.counters["requests"] += 1
        with self._lock:
            if len(self._queue) >= self.limits.queued:
                busy = True
            else:
                busy = False
                connection.state = DISPATCHED
                self._poller.unregister(connection.fd)
                self._queue.append((connection, request))
                if len(self._queue) > self._idle_handlers:
                    self._start_handler()
                self._lock.notify()
        if busy:
            self.counters["refused_busy"] += 1
            self._fail(connection, 503, "too many requests at once: try again")

    def _take_answers(self) -> None:
        with self._lock:
            answers, self._answers = self._answers, []
        for connection, status, data in answers:
            if status >= 400:
                self.counters[f"status_{status}"] += 1
            connection.state = WRITING
            connection.outgoing = data
            connection.deadline = time.monotonic() + self.limits.send_seconds
            self._poller.register(connection.fd, select.POLLOUT)
            self._write(connection)

    def _write(self, connection: Connection) -> None:
        try:
            sent = connection.socket.send(connection.outgoing, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return
        except OSError:
            self._drop(connection)
            return
        connection.outgoing = connection.outgoing[sent:]
        if connection.outgoing:
            return
        http = connection.http
        if connection.close_after or (http.our_state, http.their_state) != (h11.DONE, h11.DONE):
            self._linger(connection)
        else:
            connection.next_request(time.monotonic() + self.limits.idle_seconds)
            self._poller.modify(connection.fd, select.POLLIN)
            self._advance(connection)  # a pipelined request may be buffered already

    def _fail(self, connection: Connection, status: int, message: str) -> None:
        """Answer an error and close (through lingering) once it is sent."""
        self.counters[f"status_{status}"] += 1
        data = connection.answer(status, {"error": message}, [("connection", "close")])
        if not data:  # h11 cannot answer (the client broke off, or a refused connection)
            data = raw_answer(status, message)
        connection.close_after = True
        connection.state = WRITING
        connection.outgoing = data
        connection.deadline = time.monotonic() + self.limits.send_seconds
        self._register(connection, select.POLLOUT)
        self._write(connection)

    def _linger(self, connection: Connection) -> None:
        with contextlib.suppress(OSError):
            connection.socket.shutdown(socket.SHUT_WR)
        connection.state = LINGERING
        connection.deadline = time.monotonic() + LINGER_SECONDS
        self._register(connection, select.POLLIN)

    def _register(self, connection: Connection, events: int) -> None:
        try:
            self._poller.modify(connection.fd, events)
        except FileNotFoundError:
            self._poller.register(connection.fd, events)

    def _expire(self) -> None:
        now = time.monotonic()
        for connection in list(self._connections.values()):
            if connection.state == DISPATCHED or now < connection.deadline:
                continue
            if connection.state == READING and connection.request_started is not None:
                seconds = self.limits.request_seconds
                self._fail(connection, 408, f"request not received within {seconds:g} s")
            else:  # idle, a client that does not read its answer, or done lingering
                self._drop(connection)

    def _drop(self, connection: Connection) -> None:
        if self._connections.pop(connection.fd, None) is None:
            return
        if connection.state != DISPATCHED:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(connection.fd)
        connection.socket.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    # -- the handler threads --------------------------------------------------------------------

    def _start_handler(self) -> None:
        if len(self._handlers) >= self.limits.handlers:
            return
        thread = threading.Thread(
            target=self._handler_loop, name=f"{self.name}-{len(self._handlers)}", daemon=True
        )
        self._handlers.append(thread)
        self._idle_handlers += 1
        thread.start()

    def _handler_loop(self) -> None:
        lower_priority()
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                connection, request = self._queue.popleft()
                self._idle_handlers -= 1
            used = time.thread_time()
            status, payload, headers = self.dispatch(request)
            data = connection.answer(status, payload, headers)
            with self._lock:
                self._answers.append((connection, status, data))
            self._wake()
            self.budget.pay(time.thread_time() - used)
            with self._lock:
                self._idle_handlers += 1
