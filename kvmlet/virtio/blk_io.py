"""Host-side I/O on a raw disk image for virtio-blk: open, lock, vectored I/O, fallocate.

`ImageIo` moves data between guest-memory views and the image with `os.preadv`/`os.pwritev`
(no copy), or between host iovecs of guest buffers (`GuestMemory.host_iovec`: no Python object
per buffer) and the image with one libc `preadv`/`pwritev` through ctypes. With `direct`, the
image is also opened with O_DIRECT: transfers whose file offset and length are aligned go
through it, through an aligned bounce buffer when a guest buffer is misaligned in memory; the
rare unaligned transfer goes through the ordinary descriptor (the kernel keeps the page cache
coherent with direct I/O on the same file).

Several threads use one image at once (positioned I/O only). The device closes it once no
request is in flight (`VirtioBlock.close`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from kvmlet.errors import KvmletError
from kvmlet.memory import HostIovec
from kvmlet.virtio.queue import slice_views

DIRECT_ALIGNMENT = 4096

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# The symbols already loaded into the process (libc among them): find_library("c") would run
# ldconfig in a subprocess at every start.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
for _vectored_call in (_libc.preadv, _libc.pwritev):
    _vectored_call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    _vectored_call.restype = ctypes.c_ssize_t
IOV_MAX = os.sysconf("SC_IOV_MAX")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os has only posix_fallocate); raises OSError."""
    if _libc.fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def probe_fallocate(path: str) -> tuple[bool, bool]:
    """Whether the image's file system can punch holes and zero ranges.

    Probed on an anonymous O_TMPFILE next to the image, so the image itself is untouched and
    nothing is left behind; (False, False) when that is impossible.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        return False, False
    try:
        os.pwrite(fd, b"\xff" * 3 * DIRECT_ALIGNMENT, 0)
        return (
            _supported(fd, FALLOC_FL_PUNCH_HOLE, 0),
            _supported(fd, FALLOC_FL_ZERO_RANGE, DIRECT_ALIGNMENT),
        )
    finally:
        os.close(fd)


def _supported(fd: int, mode: int, offset: int) -> bool:
    try:
        fallocate(fd, mode, offset, DIRECT_ALIGNMENT)
    except OSError:
        return False
    return True


def lock_image(fd: int, path: str, read_only: bool) -> None:
    """Take the image's flock (shared when read-only), or raise a one-line KvmletError."""
    operation = (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB
    try:
        fcntl.flock(fd, operation)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise KvmletError(f"disk image {path} is locked by another process") from None
        raise KvmletError(f"cannot lock disk image {path}: {error.strerror}") from None


def _host_address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class ImageIo:
    """An open, locked raw image: vectored reads and writes at byte offsets."""

    def __init__(self, fd: int, direct_fd: int | None, size: int):
        self.fd = fd
        self.direct_fd = direct_fd
        self.size = size

    @classmethod
    def open(cls, path: str, read_only: bool, direct: bool) -> ImageIo:
        """Open and lock `path`; a missing, unreadable or locked image is a KvmletError."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as error:
            raise KvmletError(f"cannot open disk image {path}: {error.strerror}") from None
        direct_fd = None
        try:
            lock_image(fd, path, read_only)
            if direct:
                try:
                    direct_fd = os.open(path, flags | os.O_DIRECT)
                except OSError as error:
                    raise KvmletError(
                        f"disk image {path}: direct I/O not possible: {error.strerror}"
                    ) from None
            return cls(fd, direct_fd, os.lseek(fd, 0, os.SEEK_END))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd, self.direct_fd = -1, None

    def _direct_fd_for(self, offset: int, length: int) -> int | None:
        if self.direct_fd is None or offset % DIRECT_ALIGNMENT or length % DIRECT_ALIGNMENT:
            return None
        return self.direct_fd

    @staticmethod
    def _aligned(views: list[memoryview]) -> bool:
        return all(
            not view
            or (len(view) % DIRECT_ALIGNMENT == 0 and _host_address(view) % DIRECT_ALIGNMENT == 0)
            for view in views
        )

    def read_into(self, views: list[memoryview], offset: int, length: int) -> int:
        """Fill `views` (`length` bytes) from the image at `offset`; returns `length`."""
        if not length:
            return 0
        fd = self._direct_fd_for(offset, length)
        if fd is None or self._aligned(views):
            _transfer(os.preadv, self.fd if fd is None else fd, views, offset, length)
            return length
        with mmap.mmap(-1, length) as bounce, memoryview(bounce) as window:
            _transfer(os.preadv, fd, [window], offset, length)
            position = 0
            for view in views:
                view[:] = window[position : position + len(view)]
                position += len(view)
        return length

    def write_from(self, views: list[memoryview], offset: int, length: int) -> None:
        """Write `views` (`length` bytes) at `offset`; returns once the kernel has all of it."""
        if not length:
            return
        fd = self._direct_fd_for(offset, length)
        if fd is None or self._aligned(views):
            _transfer(os.pwritev, self.fd if fd is None else fd, views, offset, length)
            return
        with mmap.mmap(-1, length) as bounce, memoryview(bounce) as window:
            window[:] = b"".join(views)
            _transfer(os.pwritev, fd, [window], offset, length)

    def read_iovec(self, iovec: HostIovec, offset: int, length: int) -> int:
        """Read the image at `offset` into host iovecs (`length` bytes in all) with one
        preadv; returns the bytes moved: short at the end of a shrunk file, and 0 when O_DIRECT
        would need a bounce buffer (the caller moves the rest through views)."""
        return self._vectored(_libc.preadv, iovec, offset, length)

    def write_iovec(self, iovec: HostIovec, offset: int, length: int) -> int:
        """Write host iovecs to the image at `offset` with one pwritev, as `read_iovec`."""
        return self._vectored(_libc.pwritev, iovec, offset, length)

    def _vectored(self, call, iovec: HostIovec, offset: int, length: int) -> int:
        fd = self._direct_fd_for(offset, length)
        if fd is not None and not iovec.page_aligned(DIRECT_ALIGNMENT):
            return 0
        if iovec.count > IOV_MAX or not length:
            return 0
        with iovec:
            while True:
                moved = call(self.fd if fd is None else fd, iovec.address(), iovec.count, offset)
                if moved >= 0:
                    return moved
                code = ctypes.get_errno()
                if code != errno.EINTR:
                    raise OSError(code, os.strerror(code))

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def identity(self) -> dict[str, int]:
        """What a snapshot records of the image (it is not copied): see `file_identity`."""
        return _identity(os.fstat(self.fd))

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        fallocate(self.fd, mode, offset, length)


def file_identity(path: str) -> dict[str, int]:
    """A cheap identity of an image file: size, modification time, device and inode. A write
    changes the modification time (to the kernel's clock tick: two writes within one tick may
    leave it as it was), a replaced file its inode. OSError when it cannot be looked at."""
    return _identity(os.stat(path))


def _identity(status: os.stat_result) -> dict[str, int]:
    return {
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "device": status.st_dev,
        "inode": status.st_ino,
    }


def _transfer(operation, fd: int, views: list[memoryview], offset: int, length: int) -> None:
    """Repeat preadv/pwritev until `length` bytes moved; a zero-byte step is an I/O error."""
    done = 0
    while done < length:
        pending = views if done == 0 else slice_views(views, done, length)
        moved = operation(fd, pending, offset + done)
        if moved <= 0:
            raise OSError(errno.EIO, "short transfer on the disk image")
        done += moved
