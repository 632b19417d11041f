"""The frontend shape shared by vhost-user (a daemon behind a UNIX socket) and the kernel's vhost
(ioctls on /dev/vhost-*): what a `VhostDevice` asks of its backend.

Both follow the model the kernel's vhost defined first. kvmlet, the frontend, negotiates
features, hands over a memory table (each guest-physical range, where this process maps it,
and for vhost-user the file it maps), then, for each virtqueue: its size, the available index
to start from (the base), the addresses of its three parts in this process, and three eventfds:
kick (the guest's doorbell), call (the queue's interrupt) and err (the backend met a broken
ring). From then on the backend moves the bytes; `get_vring_base` stops a ring and says where
the backend got to.

What differs is how a backend lets rings run and how it resets: vhost-user enables each ring
(SET_VRING_ENABLE) and resets with RESET_DEVICE when it offers it; vhost-vsock runs all rings
together (VHOST_VSOCK_SET_RUNNING); vhost-net attaches each ring to its tap (VHOST_NET_SET_BACKEND)
and resets with RESET_OWNER. `start`, `stop` and `reset` hide that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory


class VhostError(KvmletError):
    """A vhost backend failed, refused a request or broke the protocol (one line)."""


class MemoryRegion(NamedTuple):
    """One guest RAM bank as a backend needs it: guest-physical range, this process's address
    of its first byte, and (shareable RAM only) the file and offset another process maps."""

    guest_address: int
    size: int
    user_address: int
    fd: int | None
    fd_offset: int


class VringAddresses(NamedTuple):
    """Where the three parts of a split virtqueue are mapped in this process."""

    descriptor: int
    used: int
    available: int


def memory_table(memory: GuestMemory) -> list[MemoryRegion]:
    """The memory table of guest RAM: one region per bank."""
    return [
        MemoryRegion(bank.base, bank.size, bank.host_address(), bank.fd, bank.fd_offset)
        for bank in memory
    ]


class VhostFrontend(Protocol):
    """kvmlet's end of one vhost backend. Every method raises `VhostError` on failure."""

    name: str
    needs_memory_fds: bool
    """Whether the backend maps guest RAM itself (vhost-user): RAM must then be shareable."""
    max_vrings: int | None
    """How many rings the backend serves, when it says (None: as many as the device has)."""

    def guest_features(self) -> int:
        """The virtio feature bits the backend supports (its vhost-private bits left out)."""

    def set_features(self, features: int) -> None:
        """The features the driver accepted (a subset of `guest_features`)."""

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None: ...

    def set_vring_num(self, index: int, num: int) -> None: ...

    def set_vring_base(self, index: int, base: int) -> None: ...

    def set_vring_addr(self, index: int, addresses: VringAddresses) -> None: ...

    def set_vring_kick(self, index: int, fd: int) -> None: ...

    def set_vring_call(self, index: int, fd: int) -> None: ...

    def set_vring_err(self, index: int, fd: int) -> None: ...

    def get_vring_base(self, index: int) -> int:
        """Stop ring `index`; the next available index the backend would have taken."""

    def start(self, indexes: Sequence[int]) -> None:
        """The rings `indexes` are fully set up: let the backend process them."""

    def stop(self, indexes: Sequence[int]) -> None:
        """Let the backend stop processing rings `indexes` (before `get_vring_base`)."""

    def reset(self) -> None:
        """Every ring is stopped: return the backend's device state to its initial state."""

    def read_config(self, size: int) -> bytes | None:
        """The first `size` bytes of the device configuration space, or None when the backend
        does not keep one (the device then builds its own)."""

    def write_config(self, offset: int, data: bytes) -> None: ...

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when the backend goes away (None: never)."""

    def check_connection(self) -> None:
        """Raise `VhostError` if the backend went away (call when `fileno()` is readable)."""

    def close(self) -> None: ...
