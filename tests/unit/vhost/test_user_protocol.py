"""The vhost-user wire format: message layouts from the spec, and replies as hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kvmlet.vhost import user_protocol as wire
from kvmlet.vhost.frontend import MemoryRegion, VhostError, VringAddresses
from kvmlet.vhost.user_protocol import Request
from tests.helpers.vhost_user_backend import reply


def test_a_request_is_a_12_byte_header_then_its_payload():
    message = wire.encode(Request.SET_FEATURES, wire.u64(1 << 32), need_reply=True)
    assert message == struct.pack("<IIIQ", 2, 1 | 1 << 3, 8, 1 << 32)
    assert wire.encode(Request.SET_OWNER) == struct.pack("<III", 3, 1, 0)


def test_payload_layouts_follow_the_spec():
    assert wire.vring_state(1, 256) == struct.pack("<II", 1, 256)
    addresses = VringAddresses(descriptor=0x1000, used=0x3000, available=0x2000)
    assert wire.vring_address(2, addresses) == struct.pack(
        "<IIQQQQ", 2, 0, 0x1000, 0x3000, 0x2000, 0
    )
    assert wire.vring_fd(3) == struct.pack("<Q", 3)
    assert wire.vring_fd(3, has_fd=False) == struct.pack("<Q", 3 | 1 << 8)
    assert wire.config_access(4, b"ab") == struct.pack("<III", 4, 2, 0) + b"ab"


def test_the_memory_table_carries_each_region_and_its_mmap_offset():
    regions = [
        MemoryRegion(0, 0x10000, 0x7F00_0000_0000, 5, 0),
        MemoryRegion(1 << 32, 0x2000, 0x7F00_1000_0000, 6, 0x1000),
    ]
    assert wire.memory_table(regions) == struct.pack(
        "<II QQQQ QQQQ",
        2,
        0,
        *(0, 0x10000, 0x7F00_0000_0000, 0),
        *(1 << 32, 0x2000, 0x7F00_1000_0000, 0x1000),
    )


@pytest.mark.parametrize("count", [0, 9])
def test_a_memory_table_has_one_to_eight_regions(count):
    with pytest.raises(VhostError, match="1 to 8 memory regions"):
        wire.memory_table([MemoryRegion(0, 0x1000, 0, 3, 0)] * count)


def test_a_config_access_is_at_most_256_bytes():
    with pytest.raises(VhostError, match="257 bytes"):
        wire.config_access(0, bytes(257))


def test_a_well_formed_reply_is_accepted():
    payload = wire.parse_reply(reply(Request.GET_FEATURES, wire.u64(7)), Request.GET_FEATURES, 8)
    assert wire.decode_u64(payload) == 7


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack("<III", 2, 5, 8), "reply to SET_FEATURES where GET_FEATURES was asked"),
        (struct.pack("<III", 99, 5, 8), "reply to request 99 where GET_FEATURES"),
        (struct.pack("<III", 1, 1, 8), r"flags 0x1, not 0x5"),
        (struct.pack("<III", 1, 5 | 8, 8), r"flags 0xd, not 0x5"),
        (struct.pack("<III", 1, 6, 8), r"flags 0x6, not 0x5"),
        (struct.pack("<III", 1, 5, 4), "of 4 bytes where 8 were expected"),
        (struct.pack("<III", 1, 5, 0xFFFF_FFFF), "of 4294967295 bytes where 8"),
        (struct.pack("<II", 1, 5), "reply header of 8 bytes"),
    ],
)
def test_reply_headers_that_do_not_answer_the_request_are_refused(header, message):
    with pytest.raises(VhostError, match=message):
        wire.check_reply_header(header, Request.GET_FEATURES, 8)


def test_acknowledgements_and_refusals():
    wire.decode_ack(wire.u64(0), Request.SET_MEM_TABLE)
    with pytest.raises(VhostError, match=r"refused SET_MEM_TABLE \(status 22\)"):
        wire.decode_ack(wire.u64(22), Request.SET_MEM_TABLE)


def test_vring_base_replies_must_echo_the_ring_and_fit_16_bits():
    assert wire.decode_vring_base(wire.vring_state(1, 0xFFFF), 1) == 0xFFFF
    with pytest.raises(VhostError, match="for ring 0, not 1"):
        wire.decode_vring_base(wire.vring_state(0, 5), 1)
    with pytest.raises(VhostError, match="65536, beyond 16 bits"):
        wire.decode_vring_base(wire.vring_state(1, 0x10000), 1)


def test_config_replies_must_echo_the_window():
    assert wire.decode_config(wire.config_access(0, b"abcd"), 0, 4) == b"abcd"
    with pytest.raises(VhostError, match="answered 4 bytes at 8, not 4 at 0"):
        wire.decode_config(wire.config_access(8, b"abcd"), 0, 4)
    with pytest.raises(VhostError, match="gave 3 bytes of the 4"):
        wire.decode_config(struct.pack("<III", 0, 4, 0) + b"abc", 0, 4)


REPLIES = [
    (Request.GET_FEATURES, 8, wire.decode_u64),
    (Request.GET_QUEUE_NUM, 8, wire.decode_u64),
    (Request.SET_MEM_TABLE, 8, lambda payload: wire.decode_ack(payload, Request.SET_MEM_TABLE)),
    (Request.GET_VRING_BASE, 8, lambda payload: wire.decode_vring_base(payload, 1)),
    (Request.GET_CONFIG, 12 + 60, lambda payload: wire.decode_config(payload, 0, 60)),
]


@given(
    case=st.sampled_from(REPLIES),
    message=st.one_of(
        st.binary(max_size=100),
        st.builds(
            lambda request, flags, size, payload: (
                struct.pack("<III", request, flags, size) + payload
            ),
            st.sampled_from([1, 11, 17, 24, 5, 0, 0xFFFF_FFFF]),
            st.sampled_from([5, 1, 4, 13, 0xFFFF_FFFF]),
            st.sampled_from([0, 8, 72, 7, 1 << 31]),
            st.binary(max_size=80),
        ),
    ),
)
@example(case=REPLIES[3], message=reply(11, wire.vring_state(1, 9)))
@example(case=REPLIES[4], message=reply(24, wire.config_access(0, bytes(60))))
def test_any_reply_is_decoded_or_refused_with_a_vhost_error(case, message):
    """Whatever bytes come back, parsing yields a checked value or a VhostError, nothing else."""
    request, size, decode = case
    try:
        value = decode(wire.parse_reply(message, request, size))
    except VhostError:
        return
    answered, flags, announced = struct.unpack_from("<III", message)
    assert (answered, flags, announced) == (request, wire.REPLY_FLAGS, size)
    assert len(message) == 12 + size
    if request is Request.GET_VRING_BASE:
        assert 0 <= value <= 0xFFFF
    if request is Request.GET_CONFIG:
        assert value == message[24:]
