"""ctypes mirrors of <linux/vhost_types.h> and the ioctl numbers of <linux/vhost.h>.

Field names and order follow the kernel header. The numbers are derived from the structures'
sizes with Linux's `_IO`/`_IOR`/`_IOW`/`_IOWR` encoding, as `kvmlet.kvm.ioctls` does for KVM:
a structure that drifts from the header changes its number and the kernel refuses the call.
The unit tests compare every size and number with what gcc computes from the real headers.
"""

from __future__ import annotations

import ctypes
from functools import cache

from kvmlet.kvm.ioctls import _IO, _IOR, _IOW, _IOWR

u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64


class VhostVringState(ctypes.Structure):
    _fields_ = [("index", u32), ("num", u32)]


class VhostVringFile(ctypes.Structure):
    _fields_ = [("index", u32), ("fd", s32)]


class VhostVringAddr(ctypes.Structure):
    _fields_ = [
        ("index", u32),
        ("flags", u32),
        ("desc_user_addr", u64),
        ("used_user_addr", u64),
        ("avail_user_addr", u64),
        ("log_guest_addr", u64),
    ]


class VhostMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
        ("flags_padding", u64),
    ]


class VhostMemory(ctypes.Structure):
    """The fixed header of `struct vhost_memory` (regions follow: `memory_with`)."""

    _fields_ = [("nregions", u32), ("padding", u32)]


@cache
def memory_with(count: int) -> type[ctypes.Structure]:
    """`struct vhost_memory` carrying `count` regions."""
    return type(
        f"VhostMemory{count}",
        (ctypes.Structure,),
        {"_fields_": [*VhostMemory._fields_, ("regions", VhostMemoryRegion * count)]},
    )


VHOST_VIRTIO = 0xAF

VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, u64)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, u64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, VhostMemory)
VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, VhostVringState)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, VhostVringAddr)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, VhostVringState)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, VhostVringState)
VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, VhostVringFile)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, VhostVringFile)
VHOST_SET_VRING_ERR = _IOW(VHOST_VIRTIO, 0x22, VhostVringFile)
VHOST_NET_SET_BACKEND = _IOW(VHOST_VIRTIO, 0x30, VhostVringFile)
VHOST_VSOCK_SET_GUEST_CID = _IOW(VHOST_VIRTIO, 0x60, u64)
VHOST_VSOCK_SET_RUNNING = _IOW(VHOST_VIRTIO, 0x61, ctypes.c_int)

VHOST_FILE_UNBIND = -1
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27
