"""The host system calls the 9p server needs and Python's os module lacks (x86_64 Linux).

Every path the guest names is one component, resolved relative to a directory file descriptor
the server holds, with `openat2(2)`: RESOLVE_BENEATH (no `..` above the directory, no absolute
jump), RESOLVE_NO_SYMLINKS and O_NOFOLLOW (no symbolic link followed anywhere, the last
component included: a symlink is opened as itself with O_PATH, refused otherwise), and
RESOLVE_NO_MAGICLINKS (no /proc/PID/fd-style jump). Strings are never joined into paths.

The other calls act on file descriptors, including O_PATH ones: `fchmodat2` and `fchownat` and
`utimensat` with AT_EMPTY_PATH, `getdents64` (directory entries with the offsets 9P's readdir
resumes from), `fstatfs` (the file system type, for statfs and to refuse kernel pseudo file
systems).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Iterator

SYS_OPENAT2 = 437
SYS_GETDENTS64 = 217
SYS_FCHMODAT2 = 452
"""x86_64 system call numbers (openat2 since Linux 5.6, fchmodat2 since 6.6)."""

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
NAME_MAX = 255
PATH_MAX = 4096

SEALED_FILESYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0xDE5E81E4: "efivarfs",
    0xCAFE4A11: "bpf",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x62656570: "configfs",
    0x6165676C: "pstore",
    0x42494E4D: "binfmt_misc",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
}
"""Kernel interfaces that happen to look like files: a share never reaches into them (a guest
writing the monitor's own /proc/self/mem would own the monitor). Their mount points can be
looked at, as a guest mounting its own /proc on a shared root needs, but not entered."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32]
_libc.fchownat.argtypes += [ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]


_OPEN_HOW = struct.Struct("=QQQ")
"""struct open_how: flags, mode, resolve."""
_openat2_syscall = ctypes.CFUNCTYPE(
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    use_errno=True,
)(("syscall", _libc))
"""syscall(SYS_openat2, dirfd, path, how, size) with its argument types declared once: a call
then converts plain ints and bytes itself (a fid walk or a create makes one per name)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("seconds", ctypes.c_int64), ("nanoseconds", ctypes.c_long)]


class StatFs(ctypes.Structure):
    """struct statfs (x86_64)."""

    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_uint32 * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


def _raise_errno() -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


def check_name(name: bytes) -> None:
    """Refuse what cannot be a single directory entry: empty, `.`, `..`, a `/` or a NUL in it
    (EINVAL), or longer than NAME_MAX (ENAMETOOLONG)."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, f"invalid name {name[:64]!r}")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")


def openat2(dir_fd: int, name: bytes, flags: int, mode: int = 0, resolve: int = BENEATH) -> int:
    """openat2(2), close-on-exec (and, unless O_PATH, which takes no other flags, never
    making a terminal ours); raises OSError (ENOSYS on kernels before 5.6)."""
    flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY
    how = _OPEN_HOW.pack(flags, mode, resolve)
    while True:
        fd = _openat2_syscall(SYS_OPENAT2, dir_fd, name, how, _OPEN_HOW.size)
        if fd >= 0:
            return fd
        if ctypes.get_errno() != errno.EINTR:
            _raise_errno()


def open_beneath(dir_fd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """Open the entry `name` of the directory `dir_fd` without following any symbolic link;
    `name` must have passed `check_name` (or be `.` for the directory itself)."""
    return openat2(dir_fd, name, flags | os.O_NOFOLLOW, mode)


def clear_nonblocking(fd: int) -> None:
    """Make a descriptor opened with O_NONBLOCK (so that a FIFO swapped in could not block the
    open) blocking again."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def open_parent(dir_fd: int) -> int:
    """An O_PATH descriptor of the parent of directory `dir_fd` (the caller makes sure
    `dir_fd` is not the share's root: RESOLVE_BENEATH cannot express a step up)."""
    return openat2(
        dir_fd,
        b"..",
        os.O_PATH | os.O_DIRECTORY,
        resolve=RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    )


def fstatfs(fd: int) -> StatFs:
    result = StatFs()
    if _libc.fstatfs(fd, ctypes.byref(result)) != 0:
        _raise_errno()
    return result


def sealed_filesystem(fd: int) -> str | None:
    """The name of the kernel pseudo file system `fd` lies on, None for an ordinary one."""
    return SEALED_FILESYSTEMS.get(fstatfs(fd).f_type & 0xFFFF_FFFF)


def chmod(fd: int, mode: int) -> None:
    """Change the mode of what `fd` refers to (an O_PATH descriptor too, not a symlink).

    fchmodat2 with AT_EMPTY_PATH where the kernel has it (6.6); before that the only way to
    reach an O_PATH file's inode is its /proc/self/fd entry: our own descriptor, never a path
    from the guest.
    """
    while True:
        result = _libc.syscall(
            ctypes.c_long(SYS_FCHMODAT2),
            ctypes.c_long(fd),
            ctypes.c_char_p(b""),
            ctypes.c_long(mode),
            ctypes.c_long(AT_EMPTY_PATH),
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.ENOSYS:
            os.chmod(f"/proc/self/fd/{fd}", mode)
            return
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def chown(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", ...) with AT_EMPTY_PATH; -1 (0xFFFFFFFF) leaves an id as it is."""
    if _libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0:
        _raise_errno()


def set_times(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(fd, "", ...) with AT_EMPTY_PATH: (seconds, nanoseconds) or (0, UTIME_NOW) /
    (0, UTIME_OMIT) each."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0:
        _raise_errno()


_DIRENT = struct.Struct("<QqHB")


def read_directory(fd: int, offset: int, buffer_size: int) -> Iterator[tuple[int, int, int, bytes]]:
    """The entries of directory `fd` from the position `offset` (0 or an entry's d_off):
    (inode, next offset, d_type, name) each, read with getdents64 `buffer_size` bytes at a time.
    Moves the descriptor's position: callers serialise readers of one descriptor."""
    os.lseek(fd, offset, os.SEEK_SET)
    buffer = ctypes.create_string_buffer(buffer_size)
    while True:
        length = _libc.syscall(
            ctypes.c_long(SYS_GETDENTS64), ctypes.c_long(fd), buffer, ctypes.c_long(buffer_size)
        )
        if length < 0:
            if ctypes.get_errno() == errno.EINTR:
                continue
            _raise_errno()
        if length == 0:
            return
        raw = buffer.raw[:length]
        position = 0
        while position < length:
            inode, next_offset, record_length, d_type = _DIRENT.unpack_from(raw, position)
            name_end = raw.index(b"\0", position + _DIRENT.size, position + record_length)
            yield inode, next_offset, d_type, raw[position + _DIRENT.size : name_end]
            position += record_length
