"""The layout of a modern virtio-pci function (virtio 1.2 §4.1.3-§4.1.4): identity, the BAR map
and the vendor capabilities that point the driver into it.

One memory BAR holds everything, each part on its own 4 KiB page:

    0x0000  common configuration (struct virtio_pci_common_cfg, 0x38 bytes)
    0x1000  ISR status (1 byte; reading it clears it)
    0x2000  device-specific configuration
    0x3000  notifications: queue N at 0x3000 + 4 * N (queue_notify_off = N, multiplier 4)
    0x4000  MSI-X table (16 bytes per vector)
    0x5000  MSI-X pending-bit array

Because each queue has its own notify address, a doorbell needs no data match.
"""

from __future__ import annotations

import struct

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
"""Modern (non-transitional) devices are 0x1040 + the virtio device id (§4.1.2.1)."""
VIRTIO_PCI_REVISION = 1

VENDOR_CAPABILITY_ID = 0x09
COMMON_CFG = 1
NOTIFY_CFG = 2
ISR_CFG = 3
DEVICE_CFG = 4
PCI_CFG = 5

PAGE = 0x1000
COMMON_OFFSET = 0x0000
COMMON_SIZE = 0x38
ISR_OFFSET = 0x1000
ISR_SIZE = 4
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
NOTIFY_WIDTH = 2
"""Linux writes the queue index as a 16-bit value (no VIRTIO_F_NOTIFICATION_DATA)."""
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
BAR_SIZE = 0x8000
MAX_QUEUES = PAGE // 16 - 1
"""Bounded by the notify page and by the MSI-X table page (one vector per queue + config)."""

ISR_QUEUE = 1
ISR_CONFIG = 2

# Field offsets of struct virtio_pci_common_cfg (§4.1.4.3).
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30

COMMON_FIELDS = {
    DEVICE_FEATURE_SELECT: 4,
    DEVICE_FEATURE: 4,
    DRIVER_FEATURE_SELECT: 4,
    DRIVER_FEATURE: 4,
    CONFIG_MSIX_VECTOR: 2,
    NUM_QUEUES: 2,
    DEVICE_STATUS: 1,
    CONFIG_GENERATION: 1,
    QUEUE_SELECT: 2,
    QUEUE_SIZE: 2,
    QUEUE_MSIX_VECTOR: 2,
    QUEUE_ENABLE: 2,
    QUEUE_NOTIFY_OFF: 2,
    QUEUE_DESC: 8,
    QUEUE_DRIVER: 8,
    QUEUE_DEVICE: 8,
}
"""offset -> width of every field; the driver reads and writes each at its own width (64-bit
fields as two 32-bit halves)."""

FIELD_OF_BYTE = {
    offset + index: offset for offset, width in COMMON_FIELDS.items() for index in range(width)
}

# PCI class codes by virtio device id: (base class << 16) | (subclass << 8) | interface.
_CLASS_CODES = {
    1: 0x020000,  # network: Ethernet controller
    2: 0x010000,  # block: SCSI storage controller (what QEMU and Linux expect)
    3: 0x078000,  # console: other communication controller
    9: 0x018000,  # 9p transport: other mass storage controller
}
UNCLASSIFIED = 0xFF0000


def class_code(virtio_device_id: int) -> int:
    """The PCI class code a driver expects for a virtio device type (0xFF0000 if none)."""
    return _CLASS_CODES.get(virtio_device_id, UNCLASSIFIED)


_VIRTIO_CAP = struct.Struct("<BBBBxxII")
"""cap_len, cfg_type, bar, id, padding, offset, length: struct virtio_pci_cap after the
capability id and next pointer (which `PciDevice.add_capability` writes)."""

PCI_CFG_BAR = 2
PCI_CFG_OFFSET = 6
PCI_CFG_LENGTH = 10
PCI_CFG_DATA = 14
"""Offsets in the body of the VIRTIO_PCI_CAP_PCI_CFG capability (after id and next)."""


def virtio_capability(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b""):
    """The body of a virtio vendor capability (struct virtio_pci_cap plus `extra`)."""
    cap_len = 2 + _VIRTIO_CAP.size + len(extra)
    return _VIRTIO_CAP.pack(cap_len, cfg_type, bar, 0, offset, length) + extra


def pci_cfg_capability() -> tuple[bytes, bytes]:
    """Body and writable mask of the PCI configuration access window (§4.1.4.9)."""
    body = virtio_capability(PCI_CFG, 0, 0, 0, bytes(4))
    mask = bytearray(len(body))
    mask[PCI_CFG_BAR] = 0xFF
    mask[PCI_CFG_OFFSET : PCI_CFG_DATA + 4] = b"\xff" * 12
    return body, bytes(mask)
