"""Hypothesis against the server: hostile bytes, mutated messages and random operation sequences.

Whatever comes in, the server answers with a well-formed R-message carrying the request's tag
(or nothing, when the reply buffer cannot hold one), never raises, never hits an internal error,
never touches anything outside the share, never sends the secret file's contents and leaves no
descriptor open once closed.
"""

from __future__ import annotations

import contextlib
import stat
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlet.ninep import Server
from kvmlet.ninep import messages as m
from tests.helpers.ninep_client import NinePClient, cut
from tests.unit.ninep.conftest import SECRET, Tree, open_fds

FIDS = st.sampled_from([0, 1, 2, 3, 4, 5, m.NOFID])
NAMES = st.sampled_from(
    [
        b"file",
        b"sub",
        b"inner",
        b"new",
        b"abs_link",
        b"rel_link",
        b"dir_link",
        b"deep_link",
        b"dangling",
        b"proc_link",
        b"outside",
        b"secret",
        b"..",
        b".",
        b"",
        b"a/b",
        b"../outside/secret",
        b"/etc/passwd",
        b"x\0y",
    ]
)
NUMBERS = st.sampled_from([0, 1, 7, 4096, 1 << 31, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
FLAGS = st.one_of(
    st.sampled_from(
        [m.L_RDONLY, m.L_WRONLY, m.L_RDWR, m.L_RDWR | m.L_TRUNC, m.L_RDWR | m.L_EXCL, 3, 0x200]
    ),
    st.integers(0, 0xFFFF_FFFF),
)
MODES = st.one_of(
    st.sampled_from([0o644, 0o755, stat.S_IFIFO | 0o600, stat.S_IFCHR | 0o666, 0o7777]),
    st.integers(0, 0xFFFF_FFFF),
)
_BY_FIELD = {
    "names": st.lists(NAMES, max_size=5).map(tuple),
    "data": st.binary(max_size=64),
    "target": st.sampled_from([b"/etc/passwd", b"../outside/secret", b"file", b"", b"a\0b"]),
    "version": st.sampled_from([b"9P2000.L", b"9P2000.u", b""]),
    "flags": FLAGS,
    "mode": MODES,
    "type": st.integers(0, 3),
    "count": st.sampled_from([0, 1, 24, 100, 8192, 0xFFFF_FFFF]),
    "oldtag": st.integers(0, 0xFFFF),
}
_BY_LETTER = {
    "b": st.integers(0, 0xFF),
    "w": st.integers(0, 0xFFFF),
    "d": st.one_of(FIDS, st.integers(0, 0xFFFF_FFFF)),
    "q": NUMBERS,
    "s": NAMES,
}


def field_strategy(name: str, letter: str):
    if name in _BY_FIELD:
        return _BY_FIELD[name]
    if "fid" in name and letter == "d":
        return FIDS
    return _BY_LETTER[letter]


@st.composite
def requests(draw):
    cls = draw(st.sampled_from(sorted(m.REQUEST_TYPES.values(), key=lambda c: c.TYPE)))
    values = [
        draw(field_strategy(name, letter))
        for name, letter in zip(cls._fields[1:], cls.FORMAT, strict=True)
    ]
    return cls(draw(st.integers(0, 0xFFFE)), *values)


@contextlib.contextmanager
def fresh_share():
    """A new tree and server for one example; checks the outside and the descriptors after."""
    with tempfile.TemporaryDirectory() as base:
        tree = Tree(Path(base))
        before = open_fds()
        server = Server(str(tree.share), max_fids=16)
        try:
            yield tree, server
        finally:
            server.close()
        assert server.internal_errors == 0
        assert open_fds() <= before
        tree.assert_outside_untouched()


def check_reply(request: bytes, reply: bytes, capacity: int) -> None:
    """A well-formed R-message with the request's tag, or nothing when there was no room."""
    if capacity < 11:
        assert reply == b""
        return
    response = m.decode_response(reply)
    assert struct.unpack_from("<I", reply)[0] == len(reply)
    tag = struct.unpack_from("<H", request, 5)[0] if len(request) >= 7 else m.NOTAG
    assert response.tag == tag
    assert SECRET[:16] not in reply


def serve(server, request: bytes, capacity: int, pieces: int) -> bytes:
    reply = bytearray(capacity)
    length = server.handle(cut(request, pieces) if request else [], cut(reply, pieces))
    assert 0 <= length <= capacity
    return bytes(reply[:length])


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.binary(max_size=120), st.integers(0, 300), st.integers(1, 4)), max_size=8)
)
def test_arbitrary_bytes(inputs):
    with fresh_share() as (_, server):
        NinePClient(server).mount()
        for request, capacity, pieces in inputs:
            check_reply(request, serve(server, request, capacity, pieces), capacity)


@st.composite
def mutated(draw):
    """A valid request, then bytes flipped, cut, extended or its size field rewritten."""
    data = bytearray(m.encode(draw(requests())))
    for _ in range(draw(st.integers(1, 4))):
        choice = draw(st.integers(0, 3))
        if choice == 0 and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif choice == 1:
            del data[draw(st.integers(0, len(data))) :]
        elif choice == 2:
            data += draw(st.binary(max_size=16))
        elif len(data) >= 4:
            struct.pack_into("<I", data, 0, draw(st.integers(0, 0xFFFF_FFFF)))
    return bytes(data)


@settings(max_examples=100)
@given(st.lists(st.tuples(mutated(), st.integers(0, 4096)), max_size=10))
def test_mutated_messages(inputs):
    with fresh_share() as (_, server):
        NinePClient(server).mount()
        for request, capacity in inputs:
            check_reply(request, serve(server, request, capacity, 2), capacity)


@settings(max_examples=150)
@given(st.booleans(), st.lists(requests(), min_size=1, max_size=30))
def test_random_operation_sequences(read_only, operations):
    """Sessions of random well-formed requests with hostile fields (names with `/` or `..`,
    symlinks pointing out, stale fids, huge offsets) after a normal mount, read-only or not."""
    with fresh_share() as (tree, server):
        server.share.read_only = read_only
        client = NinePClient(server).mount()
        client.walk(0, 1, b"sub")
        for operation in operations:
            request = m.encode(operation)
            capacity = 8192
            check_reply(request, serve(server, request, capacity, 1), capacity)
        assert all(SECRET[:16] not in reply for reply in client.replies)
        if read_only:
            assert sorted(p.name for p in tree.share.iterdir()) == [
                "abs_link",
                "dangling",
                "dir_link",
                "file",
                "proc_link",
                "rel_link",
                "sub",
            ]
            assert (tree.share / "file").read_bytes() == b"inside"
