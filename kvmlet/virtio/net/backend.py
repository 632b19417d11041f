"""What the virtio-net device needs from the host side of its link: a `NetBackend`.

A backend owns one non-blocking descriptor (a socket, a tap) that the device's worker polls,
and moves whole Ethernet frames:

- `receive()` returns the oldest frame from the peer without taking it, doing at most a few
  reads when none is buffered, and `consume()` takes it once the guest has it. A frame the
  guest has no room for stays there, and the device stops polling until the guest posts
  buffers: backpressure reaches the peer instead of frames being dropped.
- `send(frames)` takes a batch of frames, each a list of buffers (views of guest memory),
  and writes what the peer accepts now; a backend keeps what it could not write
  (`blocked`) and writes it from `flush()` when the descriptor becomes writable, while the
  device takes nothing more from the guest.
- A frame carries the 12-byte virtio-net header in front when `vnet_header` is true (a tap
  with IFF_VNET_HDR), and is a bare Ethernet frame otherwise (passt's stream).

A peer that goes away raises `BackendClosed` from any of these; the device then reports the
link down once and stops using the backend.
"""

from __future__ import annotations

from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview
Frame = Sequence[Buffer]
"""One frame as the buffers it is made of, in order (scatter-gather, guest memory views)."""

IOV_MAX = 1024
"""Buffers one sendmsg/writev call may carry (Linux's UIO_MAXIOV)."""


class BackendClosed(Exception):
    """The backend's peer is gone (passt exited, the tap was deleted): the link is down."""


class NetBackend:
    """The host end of a virtio-net link; subclasses implement the I/O."""

    vnet_header = False
    offloads = 0
    """TUN_F_* offloads this backend can be told to deliver to the guest (`set_offloads`)."""

    def __init__(self, description: str):
        self.description = description
        self.closed = False
        self.dropped_from_peer = 0  # frames the peer sent that no guest could take (too big)

    def fileno(self) -> int:
        raise NotImplementedError

    def receive(self) -> memoryview | None:
        """The oldest frame from the peer (valid until `consume`), or None when none is
        ready now."""
        raise NotImplementedError

    def consume(self) -> None:
        """Take the frame `receive` returned."""
        raise NotImplementedError

    def send(self, frames: Sequence[Frame]) -> int:
        """Write `frames` to the peer, keeping what it cannot take now; returns how many frames
        the peer refused for good (a tap that is down: counted, not retried)."""
        raise NotImplementedError

    @property
    def blocked(self) -> bool:
        """Output is waiting for the descriptor to become writable."""
        return False

    def flush(self) -> int:
        """Write what is waiting; called when the descriptor is writable. Returns how many
        frames the peer refused for good, as `send` does."""
        return 0

    def set_offloads(self, flags: int) -> None:
        """Deliver only these TUN_F_* offloads to the guest from now on (those it accepted)."""

    def close(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"
