"""A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs.

Written in pure Python so that an initramfs can be packed without root and without external
tools: a device node such as /dev/console (char 5:1) is just a header in the archive, so no
`mknod` is needed. The output is deterministic (fixed owner, fixed timestamps, inode numbers in
order of addition), which keeps the cache key of a packed initramfs stable.

Format (Documentation/driver-api/early-userspace/buffer-format.rst): each entry is a 110-byte
ASCII header ("070701" and thirteen 8-digit hex fields), the NUL-terminated name padded to a
4-byte boundary, then the data padded to a 4-byte boundary; the archive ends with an entry
named "TRAILER!!!".
"""

from __future__ import annotations

import stat
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
HEADER_SIZE = 110
_FIELD_MAX = 0xFFFFFFFF


def _padding(length: int) -> bytes:
    """NUL bytes that bring `length` up to the next multiple of four."""
    return b"\0" * (-length % 4)


class CpioWriter:
    """Appends entries to a newc archive on a binary stream; `finish()` writes the trailer."""

    def __init__(self, stream: BinaryIO, *, mtime: int = 0) -> None:
        self._stream = stream
        self._mtime = mtime
        self._next_inode = 1
        self._names: set[str] = set()
        self._finished = False

    def add_directory(self, path: str, mode: int = 0o755) -> None:
        self._add(path, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer entry; the archive is complete after this."""
        self._write_entry(TRAILER_NAME, 0, b"", inode=0, nlink=1, rdev=(0, 0))
        self._finished = True

    def _add(
        self, path: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._finished:
            raise ValueError("cpio archive already finished")
        name = path.strip("/")
        if not name or name == TRAILER_NAME or "\0" in name:
            raise ValueError(f"invalid cpio entry name: {path!r}")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry: {name!r}")
        self._names.add(name)
        self._write_entry(name, mode, data, inode=self._next_inode, nlink=nlink, rdev=rdev)
        self._next_inode += 1

    def _write_entry(
        self, name: str, mode: int, data: bytes, *, inode: int, nlink: int, rdev: tuple[int, int]
    ) -> None:
        encoded_name = name.encode() + b"\0"
        fields = (
            inode,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            self._mtime,
            len(data),
            0,  # devmajor: the device holding the file (meaningless here)
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded_name),
            0,  # check: unused by newc
        )
        if any(not 0 <= value <= _FIELD_MAX for value in fields):
            raise ValueError(f"cpio header field out of range for {name!r}")
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        self._stream.write(header + encoded_name + _padding(HEADER_SIZE + len(encoded_name)))
        self._stream.write(data + _padding(len(data)))
