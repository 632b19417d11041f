"""The vhost-user frontend against a backend written in Python, over a socketpair: the handshake,
the descriptors it passes, and every way a reply can be wrong (never a hang, never a crash)."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from kvmlet.vhost import user_protocol as wire
from kvmlet.vhost.frontend import VhostError, memory_table
from kvmlet.vhost.user import VhostUserFrontend
from kvmlet.vhost.user_protocol import Request
from tests.helpers.vhost_user_backend import (
    ALL_PROTOCOL_FEATURES,
    BLK_FEATURES,
    HANG_UP,
    SILENCE,
    Answer,
    PythonBackend,
    reply,
)

TIMEOUT = 0.3
"""For the tests that wait for a reply that never comes; the others allow a loaded host 3 s."""
WANTED = (
    1 << wire.PROTOCOL_F_MQ
    | 1 << wire.PROTOCOL_F_REPLY_ACK
    | 1 << wire.PROTOCOL_F_CONFIG
    | 1 << wire.PROTOCOL_F_RESET_DEVICE
)


@pytest.fixture
def connect():
    """connect(**backend options) -> (frontend, backend), both cleaned up after the test."""
    made = []

    def make(timeout=3.0, **options):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = PythonBackend(theirs, **options).start()
        made.append((ours, backend))
        return VhostUserFrontend(ours, name="test-backend", timeout=timeout), backend

    yield make
    for ours, backend in made:
        ours.close()
        backend.stop()
        assert backend.error is None, backend.error


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_handshake_negotiates_protocol_features_then_takes_ownership(connect):
    frontend, backend = connect()
    assert backend.names() == [
        "GET_FEATURES",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM",
        "SET_OWNER",
    ]
    assert frontend.protocol_features == WANTED == backend.acked_protocol_features
    assert ALL_PROTOCOL_FEATURES & ~WANTED, "the backend offered more than kvmlet takes"
    assert frontend.max_vrings == 2
    assert frontend.guest_features() == BLK_FEATURES & ~(1 << 30)
    flags = [message.flags for message in backend.messages]
    assert flags == [1, 1, 1, 1, 1 | wire.FLAG_NEED_REPLY], "REPLY_ACK only once negotiated"


def test_a_backend_without_protocol_features_gets_the_plain_protocol(connect):
    frontend, backend = connect(features=BLK_FEATURES & ~(1 << 30))
    assert backend.wait_for(2) == ["GET_FEATURES", "SET_OWNER"]
    assert frontend.protocol_features == 0 and frontend.max_vrings is None
    assert frontend.read_config(8) is None
    frontend.start([0, 1])
    frontend.reset()
    frontend.set_features(1 << 32)
    assert backend.wait_for(3) == ["GET_FEATURES", "SET_OWNER", "SET_FEATURES"]
    assert backend.acked_features == 1 << 32, "no protocol-features bit it never offered"
    assert all(message.flags == 1 for message in backend.messages)


def test_features_acknowledge_the_protocol_bit_and_rings_are_enabled_one_by_one(connect):
    frontend, backend = connect()
    frontend.set_features(1 << 32 | 1 << 29)
    assert backend.acked_features == 1 << 32 | 1 << 29 | 1 << 30
    frontend.start([0, 1])
    frontend.stop([1])
    frontend.reset()
    enables = [m.payload for m in backend.messages if m.request == Request.SET_VRING_ENABLE]
    assert enables == [wire.vring_state(0, 1), wire.vring_state(1, 1), wire.vring_state(1, 0)]
    assert backend.names()[-1] == "RESET_DEVICE" and backend.resets == 1


def test_the_memory_table_passes_the_memfds_and_the_backend_maps_guest_ram(connect):
    frontend, backend = connect()
    memory = GuestMemory.memfd([(0, 0x20000), (1 << 32, 0x10000)])
    try:
        frontend.set_mem_table(memory_table(memory))
        message = backend.messages[-1]
        assert (message.name, message.fd_count) == ("SET_MEM_TABLE", 2)
        count, _ = wire.MEMORY_HEADER.unpack_from(message.payload)
        regions = [
            wire.MEMORY_REGION.unpack_from(message.payload, 8 + 32 * index)
            for index in range(count)
        ]
        assert regions == [
            (0, 0x20000, memory.host_address(0, 1), 0),
            (1 << 32, 0x10000, memory.host_address(1 << 32, 1), 0),
        ]
        memory.write(0x1F000, b"written by kvmlet")
        memory.write((1 << 32) + 8, b"high RAM too")
        assert backend.read_guest(0x1F000, 17) == b"written by kvmlet"
        assert backend.read_guest((1 << 32) + 8, 12) == b"high RAM too"
        backend.write_guest(0x100, b"written by the backend")
        assert memory.read(0x100, 22) == b"written by the backend"
    finally:
        memory.close()


def test_anonymous_ram_cannot_be_passed(connect):
    frontend, _ = connect()
    memory = GuestMemory.anonymous([(0, 0x10000)])
    with pytest.raises(VhostError, match="needs guest RAM in a memfd"):
        frontend.set_mem_table(memory_table(memory))
    memory.close()


def test_call_eventfds_reach_the_backend_and_signal_back(connect):
    frontend, backend = connect()
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        frontend.set_vring_call(1, call)
        assert backend.messages[-1].fd_count == 1
        os.eventfd_write(backend.vrings[1].call, 3)
        assert os.eventfd_read(call) == 3
    finally:
        os.close(call)


def test_vring_base_and_config_round_trip(connect):
    frontend, backend = connect(config=bytes(range(100, 164)))
    frontend.set_vring_base(1, 41)
    assert frontend.get_vring_base(1) == 41
    assert frontend.read_config(60) == bytes(range(100, 160))
    frontend.write_config(8, b"\xaa\xbb")
    assert backend.config[8:10] == b"\xaa\xbb"
    assert frontend.read_config(10)[8:] == b"\xaa\xbb"


# Hostile replies --------------------------------------------------------------------------


def to(request, answer):
    return lambda received: answer if received == request else None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (Answer(reply(2, wire.u64(0))), "reply to SET_FEATURES where GET_FEATURES was asked"),
        (
            Answer(struct.pack("<III", 1, 1, 8) + bytes(8)),
            "reply to GET_FEATURES with flags 0x1, not",
        ),
        (
            Answer(struct.pack("<III", 1, 5, 4) + bytes(4)),
            "reply to GET_FEATURES of 4 bytes where 8",
        ),
        (Answer(struct.pack("<III", 1, 5, 1 << 31)), "reply to GET_FEATURES of 2147483648 bytes"),
        (Answer(struct.pack("<III", 1, 5, 8) + bytes(3)), "no reply to GET_FEATURES within 0.3 s"),
        (Answer(b"\x01\x00"), "no reply to GET_FEATURES within 0.3 s"),
        (SILENCE, "no reply to GET_FEATURES within 0.3 s"),
        (Answer(reply(1, wire.u64(0)), delay=0.6), "no reply to GET_FEATURES within 0.3 s"),
        (HANG_UP, "the backend closed the connection instead of answering GET_FEATURES"),
        (Answer(reply(1, wire.u64(0)), with_fd=True), "the reply to GET_FEATURES came with file"),
    ],
    ids=[
        "other-request",
        "flags",
        "size",
        "huge-size",
        "short-payload",
        "short-header",
        "silence",
        "late",
        "hang-up",
        "fd",
    ],
)
def test_a_bad_reply_is_one_clear_error_within_the_timeout(answer, error):
    before = open_fd_count()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = PythonBackend(theirs, misbehave=to(Request.GET_FEATURES, answer)).start()
    started = time.monotonic()
    with pytest.raises(VhostError, match=f"^test-backend: {error}") as raised:
        VhostUserFrontend(ours, name="test-backend", timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT + 0.5
    assert isinstance(raised.value, KvmletError), "a user-facing, one-line error"
    assert "\n" not in str(raised.value)
    assert ours.fileno() == -1, "the frontend closed the connection"
    backend.stop()
    assert backend.error is None
    assert open_fd_count() == before, "nothing left open, a smuggled descriptor included"


def test_a_late_reply_is_never_taken_for_the_next_answer(connect):
    late = Answer(reply(11, wire.vring_state(0, 7)), delay=0.5)
    frontend, _ = connect(timeout=TIMEOUT, misbehave=to(Request.GET_VRING_BASE, late))
    with pytest.raises(VhostError, match=r"no reply to GET_VRING_BASE within 0\.3 s"):
        frontend.get_vring_base(0)
    time.sleep(0.4)
    started = time.monotonic()
    with pytest.raises(VhostError, match=r"no reply to GET_VRING_BASE.*\(connection closed\)"):
        frontend.get_vring_base(0)
    with pytest.raises(VhostError, match=r"\(connection closed\)"):
        frontend.set_vring_num(0, 8)
    assert time.monotonic() - started < 0.1, "no waiting on a closed connection"
    assert frontend.fileno() is None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (Answer(reply(11, wire.vring_state(1, 7))), "answered for ring 1, not 0"),
        (Answer(reply(11, wire.vring_state(0, 1 << 16))), "65536, beyond 16 bits"),
    ],
)
def test_a_malformed_vring_base_closes_the_connection(connect, answer, error):
    frontend, _ = connect(misbehave=to(Request.GET_VRING_BASE, answer))
    with pytest.raises(VhostError, match=error):
        frontend.get_vring_base(0)
    assert frontend.fileno() is None
    assert "connection closed" in frontend.failure


def test_a_refusal_is_an_error_but_the_connection_stays(connect):
    frontend, _ = connect(misbehave=to(Request.SET_VRING_NUM, Answer(reply(8, wire.u64(1)))))
    with pytest.raises(VhostError, match=r"refused SET_VRING_NUM \(status 1\)"):
        frontend.set_vring_num(0, 8)
    frontend.set_vring_base(0, 3)
    assert frontend.get_vring_base(0) == 3


def test_check_connection_tells_a_hang_up_from_a_spurious_wakeup(connect):
    frontend, backend = connect()
    frontend.check_connection()
    backend.hang_up()
    with pytest.raises(VhostError, match="the backend closed the connection"):
        frontend.check_connection()
    assert frontend.fileno() is None


def test_an_unsolicited_message_ends_the_connection(connect):
    frontend, backend = connect()
    backend.sock.sendall(reply(1, wire.u64(0)))
    with pytest.raises(VhostError, match="unsolicited message"):
        frontend.check_connection()


def test_connecting_to_a_missing_socket_is_one_line(tmp_path):
    with pytest.raises(
        VhostError, match=r"^cannot connect to the vhost-user backend at .*: no such"
    ):
        VhostUserFrontend.connect(str(tmp_path / "nobody.sock"))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_as_the_first_reply_give_a_frontend_or_a_vhost_error(data):
    """The backend writes arbitrary bytes and hangs up: the handshake succeeds or raises
    VhostError, at once (end of stream, not the timeout), never anything else."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    try:
        frontend = VhostUserFrontend(ours, timeout=5.0)
    except VhostError:
        assert ours.fileno() == -1, "the connection is closed after a bad reply"
    else:
        assert data[:12] == struct.pack("<III", 1, 5, 8)
        assert not frontend.features & 1 << 30
        frontend.close()
    finally:
        ours.close()
        theirs.close()
    assert time.monotonic() - started < 2.0
