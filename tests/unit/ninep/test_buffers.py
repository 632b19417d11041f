"""Scatter: guest buffers addressed as one string, and preadv/pwritev over them."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from kvmlet.ninep.buffers import Scatter, read_into, write_from


def scatter(sizes: list[int]) -> tuple[bytearray, Scatter]:
    data = bytearray(os.urandom(sum(sizes)))
    views, position = [], 0
    for size in sizes:
        views.append(memoryview(data)[position : position + size])
        position += size
    return data, Scatter(views)


SIZES = st.lists(st.integers(0, 9), max_size=8)
POSITION = st.integers(0, 80)


@given(SIZES, POSITION, POSITION)
def test_slices_and_copies_are_the_bytes_of_the_concatenation(sizes, start, stop):
    data, buffers = scatter(sizes)
    assert buffers.length == len(data)
    pieces = buffers.slices(start, stop)
    assert b"".join(pieces) == buffers.copy(start, stop) == data[start:stop]


@given(SIZES, POSITION, st.binary(max_size=40))
def test_write_fills_from_an_offset_and_stops_at_the_end(sizes, offset, payload):
    data, buffers = scatter(sizes)
    expected = bytearray(data)
    copied = len(expected[offset : offset + len(payload)])
    expected[offset : offset + copied] = payload[:copied]
    assert buffers.write(payload, offset) == copied
    assert data == expected


def test_whole_buffers_are_not_cut(tmp_path):
    _, buffers = scatter([11, 4096, 4096, 100])
    pieces = buffers.slices(11, 11 + 8192)
    assert [piece is view for piece, view in zip(pieces, buffers.views[1:3], strict=True)] == [
        True,
        True,
    ]


def test_read_into_and_write_from_move_every_byte(tmp_path):
    path = tmp_path / "file"
    content = os.urandom(50_000)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        data, buffers = scatter([4096] * 20)
        assert read_into(fd, buffers.views, 100, buffers.length) == len(content) - 100
        assert bytes(data[: len(content) - 100]) == content[100:]
        assert write_from(fd, buffers.views[:3], 60_000, 3 * 4096) == 3 * 4096
        assert path.read_bytes()[60_000:] == bytes(data[: 3 * 4096])
    finally:
        os.close(fd)


def test_more_buffers_than_iov_max_take_several_calls(tmp_path):
    path = tmp_path / "file"
    content = os.urandom(3000)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        data, buffers = scatter([1] * 2500)
        assert read_into(fd, buffers.views, 0, 2500) == 2500
        assert bytes(data) == content[:2500]
        assert write_from(fd, buffers.views, 3000, 2500) == 2500
        assert path.read_bytes()[3000:] == content[:2500]
    finally:
        os.close(fd)
