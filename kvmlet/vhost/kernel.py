"""The kernel's vhost as a `VhostFrontend`: ioctls on /dev/vhost-vsock and /dev/vhost-net.

Opening the device and VHOST_SET_OWNER bind it to this process: the kernel's vhost worker then
reads and writes guest RAM through this process's own mappings, so ring addresses and the
memory table carry this process's addresses and no file needs to be shared (anonymous RAM
works). Each ring gets its size, base, addresses and kick/call/err eventfds by ioctl.

The devices differ in how rings run: vhost-vsock runs its two rings (rx, tx) together once both
are set up (VHOST_VSOCK_SET_RUNNING) and needs the guest's CID first; vhost-net attaches each
ring to a tap (VHOST_NET_SET_BACKEND) and detaches it with fd -1, and resets its whole state
with VHOST_RESET_OWNER (after which it must be owned again).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Sequence

from kvmlet.vhost import kernel_abi as abi
from kvmlet.vhost.frontend import MemoryRegion, VhostError, VringAddresses


def _reason(error: OSError) -> str:
    return (error.strerror or os.strerror(error.errno or 0)).lower()


class KernelVhost:
    """One open /dev/vhost-* device, owned by this process; the subclasses say how its rings
    start and stop."""

    path = ""
    vring_count = 0
    private_features = 1 << abi.VHOST_F_LOG_ALL
    """Feature bits of vhost itself, not of the virtio device: never offered to a guest."""
    needs_memory_fds = False
    missing_hint = ""

    def __init__(self, name: str, path: str | None = None):
        self.name = name
        self.path = path or self.path
        self.max_vrings: int | None = self.vring_count
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            hint = self.missing_hint if error.errno == errno.ENOENT else ""
            raise VhostError(f"cannot open {self.path}: {_reason(error)}{hint}") from None
        try:
            self._ioctl("VHOST_SET_OWNER", abi.VHOST_SET_OWNER)
            features = ctypes.c_uint64()
            self._ioctl("VHOST_GET_FEATURES", abi.VHOST_GET_FEATURES, features)
            self.features = features.value
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, fd={self.fd})"

    def _ioctl(self, what: str, request: int, argument: object = 0) -> None:
        if self.fd < 0:
            raise VhostError(f"{self.name}: {self.path} is closed")
        try:
            if isinstance(argument, int):
                fcntl.ioctl(self.fd, request, argument)
            else:
                fcntl.ioctl(self.fd, request, argument, True)
        except OSError as error:
            raise VhostError(f"{self.name}: {what} failed: {_reason(error)}") from None

    def guest_features(self) -> int:
        return self.features & ~self.private_features

    def set_features(self, features: int) -> None:
        self._ioctl("VHOST_SET_FEATURES", abi.VHOST_SET_FEATURES, ctypes.c_uint64(features))

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        table = abi.memory_with(len(regions))()
        table.nregions = len(regions)
        for entry, region in zip(table.regions, regions, strict=True):
            entry.guest_phys_addr = region.guest_address
            entry.memory_size = region.size
            entry.userspace_addr = region.user_address
        self._ioctl("VHOST_SET_MEM_TABLE", abi.VHOST_SET_MEM_TABLE, table)

    def _vring_state(self, what: str, request: int, index: int, num: int) -> int:
        state = abi.VhostVringState(index, num)
        self._ioctl(what, request, state)
        return state.num

    def set_vring_num(self, index: int, num: int) -> None:
        self._vring_state("VHOST_SET_VRING_NUM", abi.VHOST_SET_VRING_NUM, index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self._vring_state("VHOST_SET_VRING_BASE", abi.VHOST_SET_VRING_BASE, index, base)

    def get_vring_base(self, index: int) -> int:
        return self._vring_state("VHOST_GET_VRING_BASE", abi.VHOST_GET_VRING_BASE, index, 0)

    def set_vring_addr(self, index: int, addresses: VringAddresses) -> None:
        address = abi.VhostVringAddr(
            index, 0, addresses.descriptor, addresses.used, addresses.available, 0
        )
        self._ioctl("VHOST_SET_VRING_ADDR", abi.VHOST_SET_VRING_ADDR, address)

    def _vring_file(self, what: str, request: int, index: int, fd: int) -> None:
        self._ioctl(what, request, abi.VhostVringFile(index, fd))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._vring_file("VHOST_SET_VRING_KICK", abi.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._vring_file("VHOST_SET_VRING_CALL", abi.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._vring_file("VHOST_SET_VRING_ERR", abi.VHOST_SET_VRING_ERR, index, fd)

    def reset(self) -> None:
        """Stopping the rings was the reset; what the device sets up next replaces the rest."""

    def read_config(self, size: int) -> bytes | None:
        """The kernel keeps no configuration space: the device builds its own."""
        return None

    def write_config(self, offset: int, data: bytes) -> None:
        """Nothing in the kernel to tell."""

    def fileno(self) -> int | None:
        """The kernel does not go away."""
        return None

    def check_connection(self) -> None:
        """The kernel does not go away."""

    def close(self) -> None:
        """Closing the file stops the rings and releases everything the kernel held."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KernelVhostVsock(KernelVhost):
    """/dev/vhost-vsock for the guest at context id `guest_cid` (rings 0 rx, 1 tx; the
    device's third queue, events, stays with the device)."""

    path = "/dev/vhost-vsock"
    vring_count = 2
    missing_hint = " (load vhost_vsock: modprobe vhost_vsock)"

    def __init__(self, guest_cid: int, name: str = "vhost-vsock", path: str | None = None):
        super().__init__(name, path)
        self.running = False
        self._ready: set[int] = set()
        try:
            what = f"VHOST_VSOCK_SET_GUEST_CID {guest_cid}"
            self._ioctl(what, abi.VHOST_VSOCK_SET_GUEST_CID, ctypes.c_uint64(guest_cid))
        except BaseException:
            self.close()
            raise
        self.guest_cid = guest_cid

    def _set_running(self, running: bool) -> None:
        flag = ctypes.c_int(int(running))
        self._ioctl(f"VHOST_VSOCK_SET_RUNNING {int(running)}", abi.VHOST_VSOCK_SET_RUNNING, flag)
        self.running = running

    def start(self, indexes: Sequence[int]) -> None:
        """vhost-vsock runs both rings or none: it starts when the last one is set up."""
        self._ready.update(indexes)
        if not self.running and self._ready >= set(range(self.vring_count)):
            self._set_running(True)

    def stop(self, indexes: Sequence[int]) -> None:
        self._ready.difference_update(indexes)
        if self.running:
            self._set_running(False)


class KernelVhostNet(KernelVhost):
    """/dev/vhost-net moving packets between its rings (0 rx, 1 tx) and the tap `tap_fd`
    (which the caller keeps and closes)."""

    path = "/dev/vhost-net"
    vring_count = 2
    private_features = KernelVhost.private_features | 1 << abi.VHOST_NET_F_VIRTIO_NET_HDR
    missing_hint = " (load vhost_net: modprobe vhost_net)"

    def __init__(self, tap_fd: int, name: str = "vhost-net", path: str | None = None):
        super().__init__(name, path)
        self.tap_fd = tap_fd

    def _set_backend(self, index: int, fd: int) -> None:
        self._vring_file("VHOST_NET_SET_BACKEND", abi.VHOST_NET_SET_BACKEND, index, fd)

    def start(self, indexes: Sequence[int]) -> None:
        for index in indexes:
            self._set_backend(index, self.tap_fd)

    def stop(self, indexes: Sequence[int]) -> None:
        for index in indexes:
            self._set_backend(index, abi.VHOST_FILE_UNBIND)

    def reset(self) -> None:
        """VHOST_RESET_OWNER drops the memory table, eventfds and ring state; the device
        sets everything up again at the next start, on a device owned anew."""
        self._ioctl("VHOST_RESET_OWNER", abi.VHOST_RESET_OWNER)
        self._ioctl("VHOST_SET_OWNER", abi.VHOST_SET_OWNER)
