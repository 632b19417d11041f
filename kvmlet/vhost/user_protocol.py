"""The vhost-user wire format (QEMU's docs/interop/vhost-user.rst): messages and reply checks.

A message is a 12-byte header, then the payload: `request` (what is asked), `flags` (bits 0-1
the version, 1; bit 2 set on replies; bit 3 asks for a reply) and `size` (payload bytes), all
in the machine's byte order. Payloads are a u64, a vring state (index, num), a vring address
(index, flags, descriptor, used, available, log), a memory table (count, padding, up to 8
regions of guest address, size, user address, mmap offset) or a device config access (offset,
size, flags, bytes). File descriptors travel beside the message (SCM_RIGHTS).

Replies come from another process and are hostile input. `check_reply_header` accepts a header
only when it answers the request that was sent, with exactly flags VERSION | REPLY (as QEMU
demands) and exactly the payload size that request's reply has, so nothing larger is ever read;
the decoders check what the payload echoes (the ring index, the config window) and its range.
Anything else raises `VhostError`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

from kvmlet.vhost.frontend import MemoryRegion, VhostError, VringAddresses

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDRESS = struct.Struct("=IIQQQQ")
MEMORY_HEADER = struct.Struct("=II")
MEMORY_REGION = struct.Struct("=QQQQ")
CONFIG_HEADER = struct.Struct("=III")

VERSION = 1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
REPLY_FLAGS = VERSION | FLAG_REPLY

F_PROTOCOL_FEATURES = 30
"""The virtio feature bit a backend sets when it speaks protocol features (never the guest's)."""
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_RESET_DEVICE = 13

MAX_REGIONS = 8
MAX_CONFIG_SIZE = 256
"""QEMU's VHOST_USER_MAX_CONFIG_SIZE: no virtio device's configuration is larger."""
MAX_VRINGS = 256
"""Ring indexes travel in 8 bits of a kick/call/err payload."""
VRING_NO_FD = 1 << 8
MAX_BASE = 0xFFFF
"""A split ring's available index is 16 bits."""


class Request(enum.IntEnum):
    """The front-end requests kvmlet sends (their numbers in the spec)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def encode(request: Request, payload: bytes = b"", need_reply: bool = False) -> bytes:
    """A whole message: header and payload."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return U64.pack(value)


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def vring_address(index: int, addresses: VringAddresses) -> bytes:
    """SET_VRING_ADDR's payload: no flags (no dirty log), log address 0."""
    return VRING_ADDRESS.pack(
        index, 0, addresses.descriptor, addresses.used, addresses.available, 0
    )


def vring_fd(index: int, has_fd: bool = True) -> bytes:
    """SET_VRING_KICK/CALL/ERR's payload: the ring index, and bit 8 when no fd goes with it."""
    return u64(index | (0 if has_fd else VRING_NO_FD))


def memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    """SET_MEM_TABLE's payload; each region's fd goes beside the message, in the same order."""
    if not 0 < len(regions) <= MAX_REGIONS:
        raise VhostError(f"vhost-user takes 1 to {MAX_REGIONS} memory regions, not {len(regions)}")
    body = b"".join(
        MEMORY_REGION.pack(r.guest_address, r.size, r.user_address, r.fd_offset) for r in regions
    )
    return MEMORY_HEADER.pack(len(regions), 0) + body


def config_access(offset: int, data: bytes) -> bytes:
    """GET_CONFIG's (data: zeros of the size wanted) or SET_CONFIG's payload."""
    if len(data) > MAX_CONFIG_SIZE:
        raise VhostError(f"a config access of {len(data)} bytes exceeds {MAX_CONFIG_SIZE}")
    return CONFIG_HEADER.pack(offset, len(data), 0) + data


# Replies -----------------------------------------------------------------------------------


def check_reply_header(header: bytes, request: Request, expected_size: int) -> None:
    """Accept `header` only as the reply to `request` carrying `expected_size` bytes."""
    if len(header) != HEADER.size:
        raise VhostError(f"reply header of {len(header)} bytes to {request.name}")
    answered, flags, size = HEADER.unpack(header)
    if answered != request:
        raise VhostError(f"reply to {request_name(answered)} where {request.name} was asked")
    if flags != REPLY_FLAGS:
        raise VhostError(f"reply to {request.name} with flags {flags:#x}, not {REPLY_FLAGS:#x}")
    if size != expected_size:
        raise VhostError(
            f"reply to {request.name} of {size} bytes where {expected_size} were expected"
        )


def _unpack(layout: struct.Struct, payload: bytes, what: str) -> tuple[int, ...]:
    if len(payload) < layout.size:
        raise VhostError(f"{what} payload of {len(payload)} bytes, {layout.size} needed")
    return layout.unpack_from(payload)


def decode_u64(payload: bytes) -> int:
    return _unpack(U64, payload, "u64")[0]


def decode_ack(payload: bytes, request: Request) -> None:
    """A REPLY_ACK answer: 0 is success, anything else the backend refusing the request."""
    status = decode_u64(payload)
    if status:
        raise VhostError(f"the backend refused {request.name} (status {status})")


def decode_vring_base(payload: bytes, index: int) -> int:
    """GET_VRING_BASE's answer for ring `index`: the next available index, 16 bits."""
    answered, base = _unpack(VRING_STATE, payload, "GET_VRING_BASE")
    if answered != index:
        raise VhostError(f"GET_VRING_BASE answered for ring {answered}, not {index}")
    if base > MAX_BASE:
        raise VhostError(f"GET_VRING_BASE gave ring {index} the base {base}, beyond 16 bits")
    return base


def config_reply_size(size: int) -> int:
    return CONFIG_HEADER.size + size


def decode_config(payload: bytes, offset: int, size: int) -> bytes:
    """GET_CONFIG's answer: the window asked for, echoed, then its bytes."""
    answered_offset, answered_size, _ = _unpack(CONFIG_HEADER, payload, "GET_CONFIG")
    if (answered_offset, answered_size) != (offset, size):
        raise VhostError(
            f"GET_CONFIG answered {answered_size} bytes at {answered_offset}, "
            f"not {size} at {offset}"
        )
    data = bytes(payload[CONFIG_HEADER.size :])
    if len(data) != size:
        raise VhostError(f"GET_CONFIG gave {len(data)} bytes of the {size} it announced")
    return data


def parse_reply(message: bytes, request: Request, expected_size: int) -> bytes:
    """The payload of a whole reply `message`, checked as `check_reply_header` does."""
    check_reply_header(message[: HEADER.size], request, expected_size)
    payload = message[HEADER.size :]
    if len(payload) != expected_size:
        raise VhostError(f"reply to {request.name} cut short at {len(payload)} payload bytes")
    return payload
