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
        """Bytes [start, stop) as views of the buffers (clipped to them): whole buffers as they
        are, only the first and last cut (bulk data usually fills page buffers of its own)."""
        result: list[memoryview] = []
        if start >= stop:
            return result
        views = self.views
        if stop >= self.length and views and start == len(views[0]):
            return list(views[1:])  # Linux's zero-copy layout: a header, then data buffers
        position = 0
        for view in views:
            end = position + len(view)
            if end > start and end > position:
                if position >= stop:
                    break
                if position >= start and end <= stop:
                    result.append(view)
                else:
                    low = start - position if start > position else 0
                    high = stop - position if stop < end else end - position
                    result.append(view[low:high])
            position = end
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


def read_into(fd: int, views: list[memoryview], offset: int, length: int) -> int:
    """preadv into `views` (`length` bytes in all) from file offset `offset` until they are
    full or the file ends; returns the bytes read."""
    done = 0
    while done < length:
        pending = views if done == 0 else Scatter(views).slices(done, length)
        moved = os.preadv(fd, pending[:IOV_MAX], offset + done)
        if moved <= 0:
            break
        done += moved
    return done


def write_from(fd: int, views: list[memoryview], offset: int, length: int) -> int:
    """pwritev `views` (`length` bytes in all) at file offset `offset`; returns the bytes
    written (fewer when the file system fills up after some were)."""
    done = 0
    while done < length:
        pending = views if done == 0 else Scatter(views).slices(done, length)
        try:
            moved = os.pwritev(fd, pending[:IOV_MAX], offset + done)
        except OSError:
            if done:
                break
            raise
        if moved <= 0:
            break
        done += moved
    return done
