"""One client's HTTP/1.1 connection to the control API: its h11 state, the request that is
arriving, and the bytes of its answer. The server's I/O thread (http.py) owns every connection
and moves it through its states: READING a request, DISPATCHED to a handler, WRITING the
answer, LINGERING after an error (shut for writing, draining what the client still sends).

Parsing is h11's (a small, well-kept sans-I/O HTTP/1.1 library): it turns bytes into request
events and refuses what is malformed with the status to answer; `check_head` refuses what
h11 lets through but the server's `Limits` do not.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import h11

if TYPE_CHECKING:
    from kvmlet.api.http import Limits

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}
READING, DISPATCHED, WRITING, LINGERING = "reading", "dispatched", "writing", "lingering"


class Request(NamedTuple):
    method: str
    target: str  # path and query string, as sent
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


Reply = tuple[int, object, list[tuple[str, str]]]
Handler = Callable[[Request], Reply]


def encode_json(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode() + b"\n"


class Connection:
    """One client. The I/O thread owns it, except while a handler answers its request."""

    def __init__(self, sock: socket.socket, limits: Limits, now: float):
        self.socket = sock
        self.fd = sock.fileno()
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.header_bytes)
        self.state = READING
        self.deadline = now + limits.idle_seconds
        self.request_started: float | None = None
        self.head: h11.Request | None = None
        self.body = bytearray()
        self.outgoing = b""
        self.close_after = False

    def request(self) -> Request:
        """The request whose head and body have arrived whole."""
        head = self.head
        return Request(
            head.method.decode("ascii", "replace"),
            head.target.decode("ascii", "replace"),
            {name.decode("ascii").lower(): value.decode("latin-1") for name, value in head.headers},
            bytes(self.body),
        )

    def next_request(self, deadline: float) -> None:
        """The answer is sent on a kept-alive connection: wait for the next request until
        `deadline`."""
        self.http.start_next_cycle()
        self.state = READING
        self.request_started = None
        self.head = None
        self.body = bytearray()
        self.deadline = deadline

    def answer(self, status: int, payload: object, headers: list[tuple[str, str]]) -> bytes:
        """The bytes of a JSON answer (empty when h11 says none can be sent now)."""
        body = encode_json(payload)
        head = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("server", "kvmlet"),
            *headers,
        ]
        if self.http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""
        try:
            response = h11.Response(
                status_code=status, headers=head, reason=REASONS.get(status, b"")
            )
            return (
                self.http.send(response)
                + self.http.send(h11.Data(data=body))
                + self.http.send(h11.EndOfMessage())
            )
        except h11.LocalProtocolError:
            return b""


def check_head(event: h11.Request, limits: Limits) -> tuple[int, str] | None:
    """Why a request head is refused (status, message), or None."""
    if event.http_version not in (b"1.0", b"1.1"):
        return 505, f"HTTP/{event.http_version.decode()} is not spoken here"
    size = len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)
    if size > limits.header_bytes:  # it arrived in one read: h11 did not count it
        return 431, f"request headers over {limits.header_bytes} bytes"
    for name, value in event.headers:
        if name == b"content-length" and int(value) > limits.body_bytes:
            return 413, f"request body over {limits.body_bytes} bytes"
    return None


def raw_answer(status: int, message: str) -> bytes:
    body = encode_json({"error": message})
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, REASONS.get(status, b""), len(body))
    ) + body
