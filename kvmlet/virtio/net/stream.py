"""QEMU's stream protocol on a connected stream socket: what passt speaks (`-netdev stream`).

Each Ethernet frame goes as its length (a 32-bit big-endian integer) followed by its bytes,
with no virtio-net header, so no offloads: the guest sends complete frames with checksums.
Reads and writes may split anywhere. Reading asks for no more than the rest of the current
frame plus the next frame's length, so at most one complete frame is ever buffered here and
everything else stays in the socket, where the worker's level-triggered poll still sees it
(one read per frame once the stream flows). Writing gathers a batch of frames (length prefixes
and guest memory views) into one `sendmsg`; what the socket does not take is copied and written
when it is writable again. A length above `MAX_FRAME_SIZE` is skipped over and counted.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

from kvmlet.virtio.net.backend import IOV_MAX, BackendClosed, Buffer, Frame, NetBackend
from kvmlet.virtio.net.config import MAX_FRAME_SIZE

_LENGTH = struct.Struct(">I")
PREFIX_SIZE = _LENGTH.size
READS_PER_RECEIVE = 4
"""Reads one `receive` may make (a length, the frame, the rest of a frame split in the socket)."""

_CLOSED = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)


class StreamBackend(NetBackend):
    """Frames with a 32-bit big-endian length prefix on a connected stream socket."""

    def __init__(self, sock: socket.socket, description: str = "stream peer"):
        super().__init__(description)
        sock.setblocking(False)
        self.socket = sock
        # The current frame with its prefix, and the next frame's prefix read ahead.
        self._input = bytearray(PREFIX_SIZE + MAX_FRAME_SIZE + PREFIX_SIZE)
        self._input_view = memoryview(self._input)
        self._filled = 0
        self._skipping = 0  # bytes of an oversized frame still to read past
        self._output = bytearray()  # accepted from the guest, not yet taken by the socket

    def fileno(self) -> int:
        return self.socket.fileno()

    # Receiving -------------------------------------------------------------------------------

    def _frame_length(self) -> int | None:
        return _LENGTH.unpack_from(self._input)[0] if self._filled >= PREFIX_SIZE else None

    def receive(self) -> memoryview | None:
        exhausted = False  # the last read found the socket empty
        for _ in range(READS_PER_RECEIVE + 1):
            length = self._frame_length()
            if length is None:
                wanted = PREFIX_SIZE
            elif length > MAX_FRAME_SIZE:  # known as soon as its prefix is: nothing else read
                self._skipping = length
                self._filled = 0
                self.dropped_from_peer += 1
                wanted = PREFIX_SIZE
            else:
                end = PREFIX_SIZE + length
                if self._filled >= end:
                    return self._input_view[PREFIX_SIZE:end]
                wanted = end + PREFIX_SIZE
            if exhausted:
                return None
            exhausted = not self._read(wanted)
        return None

    def _read(self, wanted: int) -> bool:
        """One read towards `wanted` buffered bytes; False when the socket had fewer."""
        if self._skipping:
            asked = min(self._skipping, len(self._input))
            got = self._recv(self._input_view[:asked])
            self._skipping -= got
            return got == asked
        asked = wanted - self._filled
        got = self._recv(self._input_view[self._filled : wanted])
        self._filled += got
        return got == asked

    def _recv(self, into: memoryview) -> int:
        try:
            got = self.socket.recv_into(into)
        except BlockingIOError:
            return 0
        except OSError as error:
            if error.errno in _CLOSED:
                raise BackendClosed(f"{self.description}: {error.strerror}") from None
            raise
        if got == 0:
            raise BackendClosed(f"{self.description} closed the connection")
        return got

    def consume(self) -> None:
        length = self._frame_length()
        if length is None or self._filled < PREFIX_SIZE + length:
            return
        end = PREFIX_SIZE + length
        rest = self._filled - end
        self._input_view[:rest] = self._input_view[end : self._filled]
        self._filled = rest

    # Sending ---------------------------------------------------------------------------------

    @property
    def blocked(self) -> bool:
        return bool(self._output)

    def send(self, frames: Sequence[Frame]) -> int:
        buffers: list[Buffer] = []
        for frame in frames:
            buffers.append(_LENGTH.pack(sum(len(part) for part in frame)))
            buffers.extend(frame)
        if self._output:  # still waiting to write older frames: these go after them
            self._keep(buffers, 0)
            return 0
        for start in range(0, len(buffers), IOV_MAX):
            group = buffers[start : start + IOV_MAX]
            sent = self._send(group)
            if sent < sum(len(buffer) for buffer in group):
                self._keep(buffers[start:], sent)
                break
        return 0

    def _send(self, buffers: Sequence[Buffer]) -> int:
        try:
            return self.socket.sendmsg(buffers, (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as error:
            if error.errno in _CLOSED:
                raise BackendClosed(f"{self.description}: {error.strerror}") from None
            if error.errno == errno.ENOBUFS:
                return 0
            raise

    def _keep(self, buffers: Sequence[Buffer], skip: int) -> None:
        """Copy what was not written (the buffers after their first `skip` bytes)."""
        for buffer in buffers:
            if skip >= len(buffer):
                skip -= len(buffer)
                continue
            self._output += memoryview(buffer)[skip:]
            skip = 0

    def flush(self) -> int:
        while self._output:
            sent = self._send([self._output])
            if not sent:
                break
            del self._output[:sent]
        return 0

    def close(self) -> None:
        self.closed = True
        self.socket.close()
