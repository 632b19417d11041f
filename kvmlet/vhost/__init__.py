"""Data paths outside Python: virtio devices whose queues a vhost backend serves.

Python keeps the control plane (which device, its registers, queues and memory); the bytes move
between the guest and a backend that maps guest RAM itself: a daemon speaking vhost-user over a
UNIX socket (`user.VhostUserFrontend`), or the kernel's vhost (`kernel.KernelVhostVsock`,
`kernel.KernelVhostNet`). Both have the shape of `frontend.VhostFrontend`, and
`device.VhostDevice` puts either behind any virtio transport.
"""

from kvmlet.vhost.frontend import (
    MemoryRegion,
    VhostError,
    VhostFrontend,
    VringAddresses,
    memory_table,
)

__all__ = ["MemoryRegion", "VhostError", "VhostFrontend", "VringAddresses", "memory_table"]
