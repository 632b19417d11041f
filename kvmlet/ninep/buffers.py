"""A request's guest buffers seen as one byte string, without copying them.

A virtio chain brings a 9P message in one or more readable buffers and takes the reply in one or
more writable ones; the server sees each side as a `Scatter` of memoryviews. Small messages are
copied out (usually from the first buffer alone); bulk data stays where it is and goes to
preadv/pwritev as views (`slices`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

IOV_MAX = os.sysconf("SC_IOV_MAX")


class Scatter:
    """Buffers in order, addressed as one string of `length` bytes."""

    __slots__ = ("length", "views")

    def __init__(self, views: Sequence[memoryview]):
        self.views = views
        self.length = sum(map(len, views))

    def copy(self, start: int, stop: int) -> bytes:
        """A copy of bytes [start, stop) (clipped to the buffers)."""
        views = self.views
        if views and stop <= len(views[0]):
            return bytes(views[0][start:stop])
        return b"".join(self.slices(start, stop))

    def slices(self, start: int, stop: int) -> list[memoryview]:
        """Bytes [start, stop) as views of the buffers (clipped to them)."""
        result = []
        position = 0
        for view in self.views:
            end = position + len(view)
            low, high = max(start, position), min(stop, end)
            if low < high:
                result.append(view[low - position : high - position])
            position = end
            if position >= stop:
                break
        return result

    def write(self, data: bytes, offset: int = 0) -> int:
        """Copy `data` into the buffers from `offset`; returns the bytes copied."""
        views = self.views
        if views and offset + len(data) <= len(views[0]):
            views[0][offset : offset + len(data)] = data
            return len(data)
        copied = 0
        for view in self.slices(offset, offset + len(data)):
            view[:] = data[copied : copied + len(view)]
            copied += len(view)
        return copied


def read_into(fd: int, views: list[memoryview], offset: int) -> int:
    """preadv into `views` from file offset `offset` until they are full or the file ends."""
    done = 0
    for start in range(0, len(views), IOV_MAX):
        batch = views[start : start + IOV_MAX]
        wanted = sum(map(len, batch))
        while wanted:
            moved = os.preadv(fd, batch, offset + done)
            if moved <= 0:
                return done
            done += moved
            wanted -= moved
            if wanted:
                batch = Scatter(batch).slices(moved, moved + wanted)
    return done


def write_from(fd: int, views: list[memoryview], offset: int) -> int:
    """pwritev `views` at file offset `offset`; returns the bytes written (fewer when the file
    system fills up after some were)."""
    done = 0
    for start in range(0, len(views), IOV_MAX):
        batch = views[start : start + IOV_MAX]
        wanted = sum(map(len, batch))
        while wanted:
            try:
                moved = os.pwritev(fd, batch, offset + done)
            except OSError:
                if done:
                    return done
                raise
            if moved <= 0:
                return done
            done += moved
            wanted -= moved
            if wanted:
                batch = Scatter(batch).slices(moved, moved + wanted)
    return done
