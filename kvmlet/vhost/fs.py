"""virtio-fs (virtio 1.2 §5.11) served by a vhost-user virtiofsd: a host directory the guest
mounts with `mount -t virtiofs TAG DIR`.

The device has a high-priority queue (FUSE_INTERRUPT, FUSE_FORGET) and request queues, all
served by the daemon; its configuration space (the tag and the number of request queues) is
kvmlet's own, since virtiofsd keeps none. DAX (the shared memory window) is not offered.
"""

from __future__ import annotations

import struct

from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import VhostDevice
from kvmlet.vhost.frontend import VhostError, VhostFrontend

VIRTIO_ID_FS = 26
TAG_SIZE = 36
QUEUE_SIZE = 128
"""As QEMU's vhost-user-fs-pci (`queue-size`)."""
_CONFIG = struct.Struct(f"<{TAG_SIZE}sI")


def fs_config(tag: str, request_queues: int) -> bytes:
    """virtio_fs_config: the tag, NUL-padded (not terminated when it fills the field), and
    the number of request queues."""
    encoded = tag.encode()
    if not 0 < len(encoded) <= TAG_SIZE or b"\0" in encoded:
        raise ValueError(f"virtio-fs tag {tag!r}: 1 to {TAG_SIZE} bytes without NUL")
    return _CONFIG.pack(encoded, request_queues)


def virtiofs_device(
    memory: GuestMemory,
    frontend: VhostFrontend,
    tag: str,
    request_queues: int = 1,
    queue_size: int = QUEUE_SIZE,
) -> VhostDevice:
    """The virtio-fs device for share `tag`, queues 0 (high priority) and 1.. (requests)
    served by `frontend`'s daemon. VhostError when the daemon serves fewer queues."""
    if request_queues < 1:
        raise VhostError(f"virtio-fs {tag!r}: at least one request queue")
    return VhostDevice(
        memory,
        frontend,
        name="vhost-user-fs",
        device_id=VIRTIO_ID_FS,
        queue_sizes=[queue_size] * (1 + request_queues),
        config=fs_config(tag, request_queues),
    )
