"""virtio-blk (virtio 1.2 §5.2) served by a vhost-user-blk backend (qemu-storage-daemon's
`--export type=vhost-user-blk`, ...): the backend owns the image and its configuration space
(capacity, limits, the number of queues), which the device reads with GET_CONFIG.
"""

from __future__ import annotations

from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import TRANSPORT_FEATURES, VhostDevice
from kvmlet.vhost.frontend import VhostError, VhostFrontend

VIRTIO_ID_BLOCK = 2
QUEUE_SIZE = 128
"""As QEMU's vhost-user-blk-pci (`queue-size`)."""
CONFIG_SIZE = 60
"""struct virtio_blk_config up to the write-zeroes fields (no secure erase, no zones)."""
NUM_QUEUES_OFFSET = 34
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_MQ = 12
BLOCK_FEATURES = sum(
    1 << bit
    for bit in (
        1,  # SIZE_MAX
        2,  # SEG_MAX
        4,  # GEOMETRY
        VIRTIO_BLK_F_RO,
        6,  # BLK_SIZE
        9,  # FLUSH
        10,  # TOPOLOGY
        11,  # CONFIG_WCE
        VIRTIO_BLK_F_MQ,
        13,  # DISCARD
        14,  # WRITE_ZEROES
    )
)
"""The virtio-blk features a backend may offer the driver (QEMU's vhost-user-blk list)."""


def vhost_user_blk_device(
    memory: GuestMemory,
    frontend: VhostFrontend,
    read_only: bool = False,
    queue_size: int = QUEUE_SIZE,
) -> VhostDevice:
    """A virtio-blk device on a vhost-user-blk backend, with as many queues as the backend's
    configuration says (one without VIRTIO_BLK_F_MQ); `read_only` tells the driver the disk
    is read-only (VIRTIO_BLK_F_RO; only the backend can refuse writes for certain)."""
    config = frontend.read_config(CONFIG_SIZE)
    if config is None:
        raise VhostError(
            f"{frontend.name}: the backend gives no configuration space (vhost-user CONFIG)"
        )
    queues = 1
    if frontend.guest_features() >> VIRTIO_BLK_F_MQ & 1:
        queues = max(1, int.from_bytes(config[NUM_QUEUES_OFFSET : NUM_QUEUES_OFFSET + 2], "little"))
    return VhostDevice(
        memory,
        frontend,
        name="vhost-user-blk",
        device_id=VIRTIO_ID_BLOCK,
        queue_sizes=[queue_size] * queues,
        features_mask=TRANSPORT_FEATURES | BLOCK_FEATURES,
        own_features=(1 << VIRTIO_BLK_F_RO) if read_only else 0,
        config_size=CONFIG_SIZE,
    )
