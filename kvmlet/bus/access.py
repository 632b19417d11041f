"""Access adaptation: turning any guest access into the handler calls a region implements.

The guest sees a region as bytes in its own (little-endian) order. A handler call of width `w`
at offset `o` returning `v` stands for the bytes `v.to_bytes(w, region byte order)` at
o..o+w-1. So an access of any width at any offset becomes: cover its bytes with aligned calls
of an implemented width (splitting a wide access, widening a narrow one), read the chunks,
pick out the bytes; for writes, fill a chunk from the access and, where the access covers a
chunk only partly, read the chunk first (read-modify-write). Bytes past the region's end read
as 0xFF and are dropped on write.
"""

from __future__ import annotations

from kvmlet.bus.region import Region


def _chunk_width(length: int, impl_min: int, impl_max: int) -> int:
    width = 1
    while width < length:
        width *= 2
    return min(max(width, impl_min), impl_max)


def _chunks(region: Region, offset: int, length: int):
    """(chunk_offset, chunk_width) handler calls covering [offset, offset + length)."""
    impl = region.impl
    width = _chunk_width(length, impl.min, impl.max)
    end = offset + length
    position = offset - offset % width
    while position < end:
        chunk = width
        while position + chunk > region.size and chunk > impl.min:
            chunk //= 2
        if position + chunk > region.size:
            return
        if position + chunk > offset:
            yield position, chunk
        position += chunk


def _swap(value: int, width: int) -> int:
    return int.from_bytes(value.to_bytes(width, "little"), "big")


def _enclosing_chunk(region: Region, offset: int, length: int) -> int:
    """The width of the one aligned handler call that wholly holds the access, or 0."""
    width = _chunk_width(length, region.impl.min, region.impl.max)
    start = offset - offset % width
    if offset + length <= start + width <= region.size:
        return width
    return 0


def read_region(region: Region, offset: int, length: int) -> int:
    """Read `length` bytes at `offset` of `region` as a little-endian int (lock held by caller)."""
    order = region.endian.byteorder
    impl = region.impl
    if (
        impl.min <= length <= impl.max
        and length in (1, 2, 4, 8)
        and (impl.unaligned or offset % length == 0)
        and offset + length <= region.size
    ):
        value = region.handler_read(offset, length) & ((1 << (8 * length)) - 1)
        if order == "little" or length == 1:
            return value
        return _swap(value, length)
    width = _enclosing_chunk(region, offset, length)
    if width:
        start = offset - offset % width
        value = region.handler_read(start, width) & ((1 << (8 * width)) - 1)
        if order != "little":
            value = _swap(value, width)
        return (value >> (8 * (offset - start))) & ((1 << (8 * length)) - 1)
    buffer = bytearray(b"\xff" * length)
    for chunk_offset, width in _chunks(region, offset, length):
        value = region.handler_read(chunk_offset, width) & ((1 << (8 * width)) - 1)
        _overlay(buffer, offset, value.to_bytes(width, order), chunk_offset)
    return int.from_bytes(buffer, "little")


def write_region(region: Region, offset: int, length: int, value: int) -> None:
    """Write `length` bytes (little-endian `value`) at `offset` of `region` (lock held)."""
    order = region.endian.byteorder
    impl = region.impl
    value &= (1 << (8 * length)) - 1
    if (
        impl.min <= length <= impl.max
        and length in (1, 2, 4, 8)
        and (impl.unaligned or offset % length == 0)
        and offset + length <= region.size
    ):
        region.handler_write(offset, length, value if order == "little" else _swap(value, length))
        return
    width = _enclosing_chunk(region, offset, length)
    if width:
        start = offset - offset % width
        shift = 8 * (offset - start)
        current = region.handler_read(start, width) & ((1 << (8 * width)) - 1)
        if order != "little":
            current = _swap(current, width)
        keep = current & ~(((1 << (8 * length)) - 1) << shift)
        merged = keep | (value << shift)
        region.handler_write(start, width, merged if order == "little" else _swap(merged, width))
        return
    data = value.to_bytes(length, "little")
    for chunk_offset, width in _chunks(region, offset, length):
        if chunk_offset >= offset and chunk_offset + width <= offset + length:
            chunk = bytearray(data[chunk_offset - offset : chunk_offset - offset + width])
        else:
            current = region.handler_read(chunk_offset, width) & ((1 << (8 * width)) - 1)
            chunk = bytearray(current.to_bytes(width, order))
            _overlay(chunk, chunk_offset, data, offset)
        region.handler_write(chunk_offset, width, int.from_bytes(chunk, order))


def _overlay(target: bytearray, target_offset: int, source: bytes, source_offset: int) -> None:
    """Copy the bytes of `source` (placed at source_offset) that fall inside `target`."""
    low = max(target_offset, source_offset)
    high = min(target_offset + len(target), source_offset + len(source))
    if low < high:
        target[low - target_offset : high - target_offset] = source[
            low - source_offset : high - source_offset
        ]
