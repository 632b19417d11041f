"""Backends that move one frame per read and per write: a tap, or a datagram socket.

A tap opened with IFF_VNET_HDR (kvmlet.host.tap) gives and takes each frame behind the
virtio-net header, the vnet header size set to the 12 bytes of VERSION_1, so checksum and
segmentation offloads pass through untouched in both directions; the kernel is told which
offloads the guest accepted (TUNSETOFFLOAD) when the driver starts. A connected SOCK_SEQPACKET
(or SOCK_DGRAM) socket behaves the same way with or without the header, which is what the
tests use in place of a tap.

Writes are atomic: a frame goes whole from the guest's buffers (`writev` on guest memory
views) or not at all. One the descriptor cannot take now (EAGAIN) is copied and written when it
is writable again; one it refuses (EIO from a tap that is down, EINVAL for a header the
kernel rejects) is counted and dropped. A frame too big for any guest buffer is read, counted
and dropped. EBADFD (the tap was deleted) or a closed socket is the end of the link.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from kvmlet.virtio.net.backend import IOV_MAX, BackendClosed, Frame, NetBackend
from kvmlet.virtio.net.config import HEADER_SIZE, MAX_FRAME_SIZE

READS_PER_RECEIVE = 4
"""Oversized frames one `receive` may read past before it gives the worker back."""

_CLOSED = (
    errno.EBADFD,
    errno.EBADF,
    errno.EPIPE,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ENOTCONN,
    errno.ENODEV,
    errno.ENXIO,
)
_TRY_LATER = (errno.EAGAIN, errno.ENOBUFS, errno.EINTR)


class FrameBackend(NetBackend):
    """One frame per read and write on a non-blocking descriptor."""

    def __init__(self, fd: int, description: str, vnet_header: bool, offloads: int = 0):
        super().__init__(description)
        os.set_blocking(fd, False)
        self.fd = fd
        self.vnet_header = vnet_header
        self.offloads = offloads if vnet_header else 0
        # One byte more than the largest acceptable frame: a read that fills it was truncated.
        limit = MAX_FRAME_SIZE + (HEADER_SIZE if vnet_header else 0)
        self._input = bytearray(limit + 1)
        self._input_view = memoryview(self._input)
        self._held: int | None = None  # length of the frame `receive` returned
        self._pending: deque[bytes] = deque()  # frames waiting for the descriptor

    def fileno(self) -> int:
        return self.fd

    def _closed(self, error: OSError) -> BackendClosed:
        if error.errno == errno.EBADFD:  # what a tap says once its interface was deleted
            return BackendClosed(f"{self.description} was deleted")
        return BackendClosed(f"{self.description}: {error.strerror}")

    def receive(self) -> memoryview | None:
        if self._held is not None:
            return self._input_view[: self._held]
        for _ in range(READS_PER_RECEIVE):
            try:
                got = os.readv(self.fd, [self._input])
            except BlockingIOError:
                return None
            except OSError as error:
                if error.errno in _CLOSED:
                    raise self._closed(error) from None
                raise
            if got == 0:
                raise BackendClosed(f"{self.description} closed the connection")
            if got == len(self._input):
                self.dropped_from_peer += 1
                continue
            self._held = got
            return self._input_view[:got]
        return None

    def consume(self) -> None:
        self._held = None

    @property
    def blocked(self) -> bool:
        return bool(self._pending)

    def send(self, frames: Sequence[Frame]) -> int:
        refused = 0
        for index, frame in enumerate(frames):
            if self._pending:
                self._pending.extend(b"".join(later) for later in frames[index:])
                break
            written = self._write(frame)
            if written is None:
                self._pending.append(b"".join(frame))
            elif not written:
                refused += 1
        return refused

    def _write(self, frame: Frame) -> bool | None:
        """Write one frame: True when written, False when refused, None to try later."""
        try:
            os.writev(self.fd, frame if len(frame) <= IOV_MAX else [b"".join(frame)])
        except OSError as error:
            if error.errno in _TRY_LATER:
                return None
            if error.errno in _CLOSED:
                raise self._closed(error) from None
            return False
        return True

    def flush(self) -> int:
        refused = 0
        while self._pending:
            written = self._write([self._pending[0]])
            if written is None:
                break
            self._pending.popleft()
            refused += not written
        return refused

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)


class DatagramBackend(FrameBackend):
    """A connected SOCK_SEQPACKET or SOCK_DGRAM socket: one frame per message (tests, or a
    peer that frames its own messages). A peer must not send empty messages: a SEQPACKET
    socket reads its peer's close as one."""

    def __init__(
        self,
        sock: socket.socket,
        description: str = "datagram peer",
        vnet_header: bool = False,
        offloads: int = 0,
    ):
        self.socket = sock
        super().__init__(sock.fileno(), description, vnet_header, offloads)

    def close(self) -> None:
        self.closed = True
        self.socket.close()


class Tap(Protocol):
    """What the tap backend needs of a tap (kvmlet.host.tap.TapDevice is one)."""

    name: str
    supported_offloads: int

    def fileno(self) -> int: ...

    def set_offloads(self, flags: int) -> None: ...

    def close(self) -> None: ...


class TapBackend(FrameBackend):
    """A tap opened with IFF_VNET_HDR and a 12-byte vnet header."""

    def __init__(self, tap: Tap):
        self.tap = tap
        super().__init__(tap.fileno(), f"tap {tap.name}", True, tap.supported_offloads)

    def set_offloads(self, flags: int) -> None:
        try:
            self.tap.set_offloads(flags & self.offloads)
        except OSError as error:
            if error.errno in _CLOSED:
                raise self._closed(error) from None
            raise

    def close(self) -> None:
        self.closed = True
        self.tap.close()
