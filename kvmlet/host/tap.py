"""Tap interfaces for a guest's NIC: /dev/net/tun, created or attached, with the virtio-net header.

`open_tap(name)` opens /dev/net/tun and asks for a tap (IFF_TAP) without the packet-information
prefix (IFF_NO_PI) and with the virtio-net header on every frame (IFF_VNET_HDR), sized to the
12 bytes of virtio 1.x (TUNSETVNETHDRSZ), so a guest's partial checksums and TSO frames pass
through, and the kernel can hand the guest the same. A name that does not exist creates the
interface (gone again when kvmlet closes it, unless made persistent with `ip tuntap`); one that
exists is attached to. The kernel's offloads are probed with TUNSETOFFLOAD and switched off
again until a guest driver accepts some (`TapDevice.set_offloads`).

A missing /dev/net/tun, no permission, an interface name in use or taken by another kind of
interface: each is one `KvmletError` line.

`LinkRemovals` says when interfaces are deleted (rtnetlink's RTM_DELLINK): a tap's descriptor
tells a poller only when the poller waits for input (its deletion wakes only readers), and a
tap served by vhost-net has no reader in kvmlet.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from kvmlet.errors import KvmletError

TUN_DEVICE = "/dev/net/tun"
VNET_HEADER_SIZE = 12
IFNAMSIZ = 16


def _iow(kind: str, number: int, size: int) -> int:
    """_IOW(kind, number, size) as asm-generic/ioctl.h computes it."""
    return 1 << 30 | size << 16 | ord(kind) << 8 | number


TUNSETIFF = _iow("T", 202, 4)
TUNSETOFFLOAD = _iow("T", 208, 4)
TUNSETVNETHDRSZ = _iow("T", 216, 4)

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
_PROBED_OFFLOADS = (TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO)

# struct ifreq: the name, then a union whose first member here is the short ifr_flags.
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")


class TapDevice:
    """An open tap: its name, interface index, descriptor and the offloads its kernel accepts."""

    def __init__(self, name: str, fd: int, supported_offloads: int, index: int = 0):
        self.name = name
        self.fd = fd
        self.supported_offloads = supported_offloads
        self.index = index
        self.vnet_header_size = VNET_HEADER_SIZE

    def __repr__(self) -> str:
        return f"TapDevice({self.name!r}, fd {self.fd}, offloads {self.supported_offloads:#x})"

    def fileno(self) -> int:
        return self.fd

    def set_offloads(self, flags: int) -> None:
        """What the kernel may hand the guest (TUN_F_*): only what its driver accepted."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_interface_name(name: str) -> None:
    """A name the kernel accepts for a network interface, or a KvmletError."""
    if not 0 < len(name.encode()) < IFNAMSIZ:
        raise KvmletError(f"interface name {name!r} must have 1 to {IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise KvmletError(f"interface name {name!r} is not valid (no '/', ':' or spaces)")


def open_tap(name: str | None = None, device: str = TUN_DEVICE) -> TapDevice:
    """Create tap `name` (or let the kernel name one, `tapN`) or attach to it."""
    if name is not None:
        check_interface_name(name)
    try:
        fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmletError(
            f"{device} does not exist: this kernel has no tap support loaded (modprobe tun)"
        ) from None
    except PermissionError:
        raise KvmletError(
            f"no permission to open {device}: a tap needs root or CAP_NET_ADMIN"
        ) from None
    except OSError as error:
        raise KvmletError(f"cannot open {device}: {error.strerror}") from None
    try:
        request = _IFREQ.pack((name or "").encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            reply = fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as error:
            raise KvmletError(_setiff_error(name, error)) from None
        actual = _IFREQ.unpack(reply)[0].rstrip(b"\0").decode()
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HEADER_SIZE))
        tap = TapDevice(actual, fd, _probe_offloads(fd), socket.if_nametoindex(actual))
    except BaseException:
        os.close(fd)
        raise
    return tap


def _setiff_error(name: str | None, error: OSError) -> str:
    label = f"tap interface {name}" if name else "a tap interface"
    if error.errno == errno.EBUSY:
        return f"{label} is in use by another process"
    if error.errno == errno.EINVAL:
        return f"{name} exists and is not a tap interface kvmlet can attach to"
    if error.errno == errno.EPERM:
        return (
            f"no permission to create or attach {label}: it needs CAP_NET_ADMIN, or a tap made "
            f"for this user beforehand (ip tuntap add NAME mode tap user USER)"
        )
    return f"cannot create or attach {label}: {error.strerror}"


def _probe_offloads(fd: int) -> int:
    """The TUN_F_* offloads this kernel accepts on the tap; left all off afterwards.

    The kernel takes segmentation offloads only together with TUN_F_CSUM and refuses a set
    with a bit it does not know (EINVAL), so each is tried on top of the ones that passed."""
    supported = 0
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
    except OSError:
        return 0
    supported = TUN_F_CSUM
    for flag in _PROBED_OFFLOADS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, supported | flag)
        except OSError:
            continue
        supported |= flag
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return supported


RTMGRP_LINK = 1
RTM_DELLINK = 17
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change


class LinkRemovals:
    """A non-blocking rtnetlink socket that reports the network interfaces of this network
    namespace as they are deleted (or moved to another namespace)."""

    def __init__(self) -> None:
        kind = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        self.socket = socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE)
        try:
            self.socket.bind((0, RTMGRP_LINK))
        except BaseException:
            self.socket.close()
            raise

    def fileno(self) -> int:
        return self.socket.fileno()

    def read(self) -> set[int] | None:
        """The indexes of the interfaces deleted since the last call (what is waiting is
        read), or None when the kernel dropped messages: the caller must then look for
        itself (`interface_exists`)."""
        removed: set[int] = set()
        while True:
            try:
                data = self.socket.recv(65536)
            except BlockingIOError:
                return removed
            except OSError as error:
                if error.errno == errno.ENOBUFS:  # the socket overflowed: messages are lost
                    return None
                raise
            removed.update(deleted_links(data))

    def close(self) -> None:
        self.socket.close()


def deleted_links(data: bytes) -> list[int]:
    """The interface indexes of the RTM_DELLINK messages in one netlink datagram."""
    found = []
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
        if length < _NLMSG_HEADER.size or offset + length > len(data):
            break
        if kind == RTM_DELLINK and length >= _NLMSG_HEADER.size + _IFINFOMSG.size:
            found.append(_IFINFOMSG.unpack_from(data, offset + _NLMSG_HEADER.size)[2])
        offset += (length + 3) & ~3
    return found


def interface_exists(index: int) -> bool:
    try:
        socket.if_indextoname(index)
    except OSError:
        return False
    return True
