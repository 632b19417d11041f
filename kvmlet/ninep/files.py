"""9P2000.L operations on open files: lopen, lcreate, read, write, readdir, fsync, lock, getlock.

Each takes the share and the decoded request and returns the reply (read and readdir write
theirs straight into the guest's reply buffers). Data moves with preadv/pwritev between the
file and guest memory. Locks are open-file-description locks (F_OFD_SETLK) on the fid's open
descriptor: guest processes holding fids of their own conflict with each other as with host
processes, and the server never blocks on a lock (it answers LOCK_BLOCKED; Linux retries).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from kvmlet.ninep import host
from kvmlet.ninep.buffers import Scatter, read_into, write_from
from kvmlet.ninep.messages import (
    DATA_REPLY_HEADER_SIZE,
    L_ACCESS_MODE,
    L_APPEND,
    L_DIRECTORY,
    L_DSYNC,
    L_EXCL,
    L_SYNC,
    L_TRUNC,
    LOCK_BLOCKED,
    LOCK_SUCCESS,
    LOCK_TYPE_RDLCK,
    LOCK_TYPE_UNLCK,
    LOCK_TYPE_WRLCK,
    QT_DIR,
    QT_FILE,
    QT_SYMLINK,
    Rfsync,
    Rgetlock,
    Rlcreate,
    Rlock,
    Rlopen,
    Rread,
    Rwrite,
    data_reply_header,
)
from kvmlet.ninep.share import Share

MAX_OFFSET = (1 << 63) - 1
_FLAG_BITS = ((L_APPEND, os.O_APPEND), (L_DSYNC, os.O_DSYNC), (L_SYNC, os.O_SYNC))
_LOCK_TYPES = {
    LOCK_TYPE_RDLCK: fcntl.F_RDLCK,
    LOCK_TYPE_WRLCK: fcntl.F_WRLCK,
    LOCK_TYPE_UNLCK: fcntl.F_UNLCK,
}
_GUEST_LOCK_TYPES = {host_type: guest for guest, host_type in _LOCK_TYPES.items()}
_FLOCK = struct.Struct("<hh4xqqi4x")
"""struct flock (x86_64): type, whence, start, length, pid."""
_DIRENT = struct.Struct("<BIQQBH")
"""A readdir entry: qid (type, version, path), offset of the next entry, d_type, name length."""
_DT_DIR = 4
_DT_LNK = 10
_READDIR_BUFFER = (4096, 65536)


def _open_flags(flags: int) -> tuple[int, bool]:
    """Host open flags for 9P2000.L ones, and whether to truncate. Only the access mode and
    what changes how data is written pass; O_TRUNC is applied once the file is known to be the
    right one; creation, O_DIRECT, O_NOATIME, O_ASYNC and blocking modes are the server's."""
    access = flags & L_ACCESS_MODE
    if access == L_ACCESS_MODE:
        raise OSError(errno.EINVAL, "no access mode")
    host_flags = access
    for guest_bit, host_bit in _FLAG_BITS:
        if flags & guest_bit:
            host_flags |= host_bit
    return host_flags, bool(flags & L_TRUNC)


def _check_offset(offset: int) -> None:
    if offset > MAX_OFFSET:
        raise OSError(errno.EINVAL, "offset out of range")


def lopen(share: Share, message) -> Rlopen:
    flags, truncate = _open_flags(message.flags)
    writing = flags & os.O_ACCMODE != os.O_RDONLY or truncate
    if writing:
        share.refuse_if_read_only()
    with share.using(message.fid) as fid:
        node = fid.node
        if fid.opened is not None:
            raise OSError(errno.EBADF, "fid already opened")
        if node.is_directory and writing:
            raise OSError(errno.EISDIR, "a directory is opened read-only")
        if message.flags & L_DIRECTORY and not node.is_directory:
            raise OSError(errno.ENOTDIR, "not a directory")
        fd = share.reopen(node, flags, truncate)
        status = os.fstat(fd)
        share.table.set_opened(fid, fd, flags)
    return Rlopen(message.tag, share.qid(status), 0)


def lcreate(share: Share, message) -> Rlcreate:
    """Create (or, without L_EXCL, open an existing) regular file; the fid becomes the file."""
    share.refuse_if_read_only()
    host.check_name(message.name)
    flags, truncate = _open_flags(message.flags)
    mode = share.creation_mode(message.mode)
    with share.using(message.fid) as fid:
        if fid.opened is not None:
            raise OSError(errno.EBADF, "fid already opened")
        directory = share.directory(fid)
        name = message.name
        try:
            fd = host.open_beneath(directory.fd, name, flags | os.O_CREAT | os.O_EXCL, mode)
            created = True
        except FileExistsError:
            if message.flags & L_EXCL:
                raise
            # What exists may be a FIFO: open it without waiting for a writer, then refuse it.
            fd = host.open_beneath(directory.fd, name, flags | os.O_NONBLOCK)
            created = False
        try:
            status = os.fstat(fd)
            if stat.S_ISDIR(status.st_mode):
                raise OSError(errno.EISDIR, "a directory has that name")
            if not stat.S_ISREG(status.st_mode):
                raise OSError(errno.ENXIO, "only regular files are opened")
            if created:
                status = share.settle_mode(fd, status, mode)
            else:
                host.clear_nonblocking(fd)
                if truncate:
                    os.ftruncate(fd, 0)
            handle = os.dup(fd)
        except BaseException:
            os.close(fd)
            raise
        node = share.table.adopt(handle, status, directory, name, False)
        share.table.set_opened(fid, fd, flags, node)
    return Rlcreate(message.tag, share.qid(status), 0)


def read(share: Share, message, reply: Scatter, room: int) -> int:
    """Tread: preadv straight into the reply buffers after the Rread header; returns the
    reply's length. `room` is the most data the reply may carry."""
    _check_offset(message.offset)
    count = min(message.count, room, MAX_OFFSET - message.offset)
    with share.using(message.fid) as fid:
        if fid.node.is_directory:
            raise OSError(errno.EISDIR, "Treaddir reads directories")
        if not fid.readable:
            raise OSError(errno.EBADF, "fid not open for reading")
        views = reply.slices(DATA_REPLY_HEADER_SIZE, DATA_REPLY_HEADER_SIZE + count)
        moved = read_into(fid.opened, views, message.offset, count)
    reply.write(data_reply_header(Rread.TYPE, message.tag, moved))
    return DATA_REPLY_HEADER_SIZE + moved


def write(share: Share, message) -> Rwrite:
    """Twrite: pwritev straight from the request's buffers (`message.data`, memoryviews)."""
    data = message.data
    length = sum(map(len, data))
    share.refuse_if_read_only()
    _check_offset(message.offset + length)
    with share.using(message.fid) as fid:
        if not fid.writable:
            raise OSError(errno.EBADF, "fid not open for writing")
        return Rwrite(message.tag, write_from(fid.opened, data, message.offset, length))


def readdir(share: Share, message, room: int) -> bytes:
    """Treaddir: the body of the Rreaddir (entries from `message.offset`, as many as fit)."""
    _check_offset(message.offset)
    count = min(message.count, room)
    entries: list[bytes] = []
    used = 0
    with share.using(message.fid) as fid:
        if fid.opened is None:
            raise OSError(errno.EBADF, "fid not open")
        if fid.readdir_lock is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        device = fid.node.identity[0]
        low, high = _READDIR_BUFFER
        with fid.readdir_lock:
            for inode, next_offset, d_type, name in host.read_directory(
                fid.opened, message.offset, max(low, min(count, high))
            ):
                size = _DIRENT.size + len(name)
                if used + size > count:
                    if not entries:
                        raise OSError(errno.EINVAL, "count too small for the next entry")
                    break
                kind = QT_DIR if d_type == _DT_DIR else QT_SYMLINK if d_type == _DT_LNK else QT_FILE
                path = share.qid_path(device, inode)
                entries.append(_DIRENT.pack(kind, 0, path, next_offset, d_type, len(name)) + name)
                used += size
    return b"".join(entries)


def fsync(share: Share, message) -> Rfsync:
    with share.using(message.fid) as fid:
        if fid.opened is None:
            raise OSError(errno.EBADF, "fid not open")
        (os.fdatasync if message.datasync else os.fsync)(fid.opened)
    return Rfsync(message.tag)


def _flock(message) -> bytes:
    kind = _LOCK_TYPES.get(message.type)
    if kind is None:
        raise OSError(errno.EINVAL, f"lock type {message.type}")
    if message.start > MAX_OFFSET or message.length > MAX_OFFSET:
        raise OSError(errno.EINVAL, "lock range out of bounds")
    return _FLOCK.pack(kind, os.SEEK_SET, message.start, message.length, 0)


def lock(share: Share, message) -> Rlock:
    """Tlock: take or drop a byte-range lock without waiting for it."""
    request = _flock(message)
    with share.using(message.fid) as fid:
        if fid.opened is None:
            raise OSError(errno.EBADF, "fid not open")
        try:
            fcntl.fcntl(fid.opened, fcntl.F_OFD_SETLK, request)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return Rlock(message.tag, LOCK_BLOCKED)
            raise
    return Rlock(message.tag, LOCK_SUCCESS)


def getlock(share: Share, message) -> Rgetlock:
    """Tgetlock: the first lock that would conflict with the one described, or UNLCK."""
    request = _flock(message)
    with share.using(message.fid) as fid:
        if fid.opened is None:
            raise OSError(errno.EBADF, "fid not open")
        result = fcntl.fcntl(fid.opened, fcntl.F_OFD_GETLK, request)
    kind, _, start, length, _ = _FLOCK.unpack(result)
    if kind == fcntl.F_UNLCK:
        return Rgetlock(message.tag, LOCK_TYPE_UNLCK, message.start, message.length, 0, b"")
    return Rgetlock(message.tag, _GUEST_LOCK_TYPES[kind], start, length, 0, b"")
