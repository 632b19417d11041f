"""The 9P2000.L codec: layouts as Linux writes them, round trips, and hostile bodies."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.ninep import messages as m
from kvmlet.ninep.wire import Layout, MalformedMessage, Qid

_FIELD_VALUES = {
    "b": st.integers(0, 0xFF),
    "w": st.integers(0, 0xFFFF),
    "d": st.integers(0, 0xFFFF_FFFF),
    "q": st.integers(0, 0xFFFF_FFFF_FFFF_FFFF),
    "s": st.binary(max_size=40),
    "Q": st.builds(
        Qid, st.integers(0, 0xFF), st.integers(0, 0xFFFF_FFFF), st.integers(0, (1 << 64) - 1)
    ),
    "W": st.lists(st.binary(max_size=12), max_size=20).map(tuple),
    "R": st.lists(
        st.builds(Qid, st.integers(0, 0xFF), st.integers(0, 9), st.integers(0, 9)), max_size=20
    ).map(tuple),
    "D": st.binary(max_size=200),
}


def message_values(cls):
    return st.tuples(st.integers(0, 0xFFFF), *(_FIELD_VALUES[letter] for letter in cls.FORMAT))


@st.composite
def any_message(draw):
    cls = draw(st.sampled_from(sorted(m.MESSAGE_TYPES.values(), key=lambda c: c.TYPE)))
    return cls(*draw(message_values(cls)))


@given(any_message())
def test_every_message_survives_encoding_and_decoding(message):
    data = m.encode(message)
    assert struct.unpack_from("<I", data)[0] == len(data)
    if message.TYPE in m.REQUEST_TYPES:
        assert m.decode_request(data) == message
    else:
        assert m.decode_response(data) == message


@given(any_message(), st.data())
def test_a_truncated_body_is_malformed_never_misread(message, data):
    encoded = m.encode(message)
    if len(encoded) == m.HEADER_SIZE:
        return
    cut = data.draw(st.integers(m.HEADER_SIZE, len(encoded) - 1))
    body = memoryview(encoded)[m.HEADER_SIZE : cut]
    with pytest.raises(MalformedMessage):
        m.decode_body(message.TYPE, message.tag, body, m.MESSAGE_TYPES)


def test_layouts_are_those_linux_writes():
    """Bytes written by hand from the field lists of net/9p/client.c, not from our encoder."""
    walk = m.encode(m.Twalk(3, 1, 2, (b"ab", b"c")))
    assert walk == bytes.fromhex("180000006e03000100000002000000020002006162010063")
    assert m.encode(m.Rlerror(9, 2)) == bytes.fromhex("0b00000007090002000000")
    assert (
        m.encode(m.Tversion(0xFFFF, 8192, b"9P2000.L"))
        == bytes.fromhex("1500000064ffff002000000800") + b"9P2000.L"
    )
    qid = Qid(0x80, 7, 0x1122334455667788)
    assert m.encode(m.Rattach(1, qid)) == bytes.fromhex("1400000069010080070000008877665544332211")
    getattr_reply = m.encode(m.Rgetattr(1, 0x7FF, qid, *range(18)))
    assert len(getattr_reply) == 7 + 8 + 13 + 3 * 4 + 15 * 8 == 160
    assert len(m.encode(m.Tsetattr(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11))) == 7 + 5 * 4 + 5 * 8
    assert len(m.encode(m.Tlock(1, 2, 0, 1, 2, 3, 4, b"host"))) == 7 + 4 + 1 + 4 + 8 + 8 + 4 + 6


def test_the_twrite_and_rread_headers_match_the_generic_encoding():
    twrite = m.encode(m.Twrite(5, 1, 4096, b"data"))
    assert m.TWRITE_HEADER.unpack_from(twrite, m.HEADER_SIZE) == (1, 4096, 4)
    assert twrite[m.TWRITE_DATA_OFFSET :] == b"data"
    rread = m.encode(m.Rread(5, b"data"))
    assert m.data_reply_header(m.Rread.TYPE, 5, 4) == rread[: m.DATA_REPLY_HEADER_SIZE]


def test_decode_checks_size_and_type():
    good = m.encode(m.Tclunk(1, 2))
    with pytest.raises(MalformedMessage):
        m.decode_request(good + b"x")
    with pytest.raises(MalformedMessage):
        m.decode_request(good[:5])
    with pytest.raises(m.UnknownMessage):
        m.decode_request(struct.pack("<IBH", 7, 250, 1))
    with pytest.raises(m.UnknownMessage):
        m.decode_request(m.encode(m.Rclunk(1)))
    with pytest.raises(m.UnknownMessage):
        m.decode_response(good)


def test_counts_that_claim_more_than_the_body_are_malformed():
    with pytest.raises(MalformedMessage):
        Layout("W").unpack(struct.pack("<HH", 3, 1) + b"a")
    with pytest.raises(MalformedMessage):
        Layout("R").unpack(struct.pack("<H", 2) + bytes(13))
    with pytest.raises(MalformedMessage):
        Layout("D").unpack(struct.pack("<I", 0xFFFF_FFFF) + bytes(100))
    with pytest.raises(MalformedMessage):
        Layout("ds").unpack(struct.pack("<IH", 1, 5) + b"abcd")


def test_walk_names_are_read_exactly_and_every_cut_of_them_is_malformed():
    """Twalk's names (read inline, without a call per name): each cut of the body inside a
    count or a name is malformed, the whole body gives the names, trailing bytes are ignored."""
    names = (b"a", b"", b"longer-name")
    body = Layout("ddW").pack((1, 2, names))
    assert Layout("ddW").unpack(body + b"extra") == [1, 2, names]
    for cut in range(8, len(body)):
        with pytest.raises(MalformedMessage):
            Layout("ddW").unpack(body[:cut])


def test_values_out_of_range_are_refused_when_encoding():
    with pytest.raises(ValueError):
        m.encode(m.Tclunk(1, 1 << 32))
    with pytest.raises(ValueError):
        Layout("dq").pack((1 << 32, 0))
    with pytest.raises(ValueError):
        m.encode(m.Rreadlink(1, b"x" * 70000))
    with pytest.raises(ValueError):
        Layout("dz")
