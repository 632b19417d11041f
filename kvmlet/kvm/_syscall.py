"""Low-level ioctl helpers shared by Kvm, Vm and Vcpu.

`fcntl.ioctl` covers nearly everything, but it passes an integer argument as a C `int`: an
address such as the TSS at 0xfffbd000 overflows. `ioctl_ulong` passes it as a C
`unsigned long` through libc, as the kernel expects.
"""

from __future__ import annotations

import ctypes
import fcntl
import os

from kvmlet.errors import KvmletError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def ioctl_ulong(fd: int, request: int, value: int) -> int:
    """ioctl(fd, request, value) with `value` as an unsigned long; raises OSError on failure."""
    result = _libc.ioctl(fd, request, value)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def ioctl_int(fd: int, request: int, value: int = 0) -> int:
    """ioctl with a small integer argument (or none); returns the kernel's result."""
    return fcntl.ioctl(fd, request, value)


def ioctl_struct(fd: int, request: int, argument: ctypes.Structure) -> int:
    """ioctl passing a pointer to `argument`; the kernel may fill it in (read ioctls)."""
    return fcntl.ioctl(fd, request, argument, True)


def failure(what: str, error: OSError) -> KvmletError:
    """A one-line KvmletError for an ioctl that failed with `error`."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    return KvmletError(f"{what} failed: {reason.lower()}")
