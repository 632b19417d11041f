"""9P2000.L operations on attributes and directory entries.

getattr, setattr, statfs, mkdir, mknod, symlink, readlink, link, renameat and unlinkat: each
takes the share and the decoded request and returns the reply. Names are single directory
entries (`host.check_name`), always relative to a directory descriptor the server holds; the
`*at` calls used here never follow a symbolic link in the last component, and attributes change
through the fid's own descriptor (AT_EMPTY_PATH), so no guest-made symlink is ever traversed.

The monitor's credentials apply: the guest's uid/gid arguments of the create operations are not
used (files belong to whoever runs kvmlet), and setattr's chown is what the host allows.
Character and block device nodes are refused: they would be the host's devices.
"""

from __future__ import annotations

import errno
import os
import stat

from kvmlet.ninep import host
from kvmlet.ninep.fids import Node
from kvmlet.ninep.messages import (
    AT_REMOVEDIR,
    GETATTR_BASIC,
    SETATTR_ATIME,
    SETATTR_ATIME_SET,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_SET,
    SETATTR_SIZE,
    SETATTR_UID,
    Rgetattr,
    Rlink,
    Rmkdir,
    Rmknod,
    Rreadlink,
    Rrenameat,
    Rsetattr,
    Rstatfs,
    Rsymlink,
    Runlinkat,
)
from kvmlet.ninep.share import Share

MAX_SIZE = (1 << 63) - 1
_NO_ID = 0xFFFF_FFFF
_U64 = (1 << 64) - 1
_SETS_SOMETHING = (
    SETATTR_MODE | SETATTR_UID | SETATTR_GID | SETATTR_SIZE | SETATTR_ATIME | SETATTR_MTIME
)


def _seconds_and_nanoseconds(nanoseconds: int) -> tuple[int, int]:
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    return seconds & _U64, rest


def get_attributes(share: Share, message) -> Rgetattr:
    """Tgetattr: every basic field, whatever the mask asked (the protocol allows more)."""
    with share.using(message.fid) as fid:
        status = os.fstat(fid.node.fd)
    return Rgetattr(
        message.tag,
        GETATTR_BASIC,
        share.qid(status),
        status.st_mode,
        status.st_uid,
        status.st_gid,
        status.st_nlink,
        status.st_rdev,
        status.st_size,
        status.st_blksize,
        status.st_blocks,
        *_seconds_and_nanoseconds(status.st_atime_ns),
        *_seconds_and_nanoseconds(status.st_mtime_ns),
        *_seconds_and_nanoseconds(status.st_ctime_ns),
        0,
        0,
        0,
        0,
    )


def _time(valid: int, changed: int, given: int, seconds: int, nanoseconds: int):
    if not valid & changed:
        return 0, host.UTIME_OMIT
    if not valid & given:
        return 0, host.UTIME_NOW
    if nanoseconds > 999_999_999:
        raise OSError(errno.EINVAL, "nanoseconds out of range")
    return seconds - (1 << 64) if seconds >> 63 else seconds, nanoseconds


def set_attributes(share: Share, message) -> Rsetattr:
    """Tsetattr: mode, owner, size, then times (a truncation must not undo set times)."""
    valid = message.valid
    if not valid & _SETS_SOMETHING:
        return Rsetattr(message.tag)
    share.refuse_if_read_only()
    with share.using(message.fid) as fid:
        node = fid.node
        if node.sealed:
            raise OSError(errno.EACCES, "a kernel pseudo file system is not shared")
        if valid & SETATTR_MODE:
            if node.kind == stat.S_IFLNK:
                raise OSError(errno.EOPNOTSUPP, "symbolic links have no mode of their own")
            host.chmod(node.fd, share.creation_mode(message.mode, node.is_directory))
        if valid & (SETATTR_UID | SETATTR_GID):
            uid = message.uid if valid & SETATTR_UID else _NO_ID
            gid = message.gid if valid & SETATTR_GID else _NO_ID
            host.chown(node.fd, uid, gid)
        if valid & SETATTR_SIZE:
            _truncate(share, fid, message.size)
        if valid & (SETATTR_ATIME | SETATTR_MTIME):
            atime = _time(
                valid, SETATTR_ATIME, SETATTR_ATIME_SET, message.atime_sec, message.atime_nsec
            )
            mtime = _time(
                valid, SETATTR_MTIME, SETATTR_MTIME_SET, message.mtime_sec, message.mtime_nsec
            )
            host.set_times(node.fd, atime, mtime)
    return Rsetattr(message.tag)


def _truncate(share: Share, fid, size: int) -> None:
    node = fid.node
    if node.is_directory:
        raise OSError(errno.EISDIR, "a directory has no size to set")
    if size > MAX_SIZE:
        raise OSError(errno.EINVAL, "size out of range")
    if fid.writable:
        os.ftruncate(fid.opened, size)
        return
    fd = share.reopen(node, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def statfs(share: Share, message) -> Rstatfs:
    with share.using(message.fid) as fid:
        fs = host.fstatfs(fid.node.fd)
    return Rstatfs(
        message.tag,
        fs.f_type & 0xFFFF_FFFF,
        fs.f_bsize & 0xFFFF_FFFF,
        fs.f_blocks,
        fs.f_bfree,
        fs.f_bavail,
        fs.f_files,
        fs.f_ffree,
        fs.f_fsid[0] | fs.f_fsid[1] << 32,
        fs.f_namelen & 0xFFFF_FFFF,
    )


def _created(share: Share, directory: Node, name: bytes, mode: int | None) -> os.stat_result:
    """The status of what was just created as `name`, given exactly `mode` (None: as is)."""
    fd = host.open_beneath(directory.fd, name, os.O_PATH)
    try:
        status = os.fstat(fd)
        if mode is None or stat.S_ISLNK(status.st_mode):
            return status
        return share.settle_mode(fd, status, mode)
    finally:
        os.close(fd)


def mkdir(share: Share, message) -> Rmkdir:
    share.refuse_if_read_only()
    host.check_name(message.name)
    mode = share.creation_mode(message.mode, directory=True)
    with share.using(message.dfid) as fid:
        directory = share.directory(fid)
        os.mkdir(message.name, mode, dir_fd=directory.fd)
        status = _created(share, directory, message.name, mode)
    return Rmkdir(message.tag, share.qid(status))


def mknod(share: Share, message) -> Rmknod:
    """Regular files, FIFOs and sockets; device nodes are EPERM (they would be the host's)."""
    share.refuse_if_read_only()
    host.check_name(message.name)
    kind = stat.S_IFMT(message.mode) or stat.S_IFREG
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        raise OSError(errno.EPERM, "device nodes are not created on the host")
    if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
        raise OSError(errno.EINVAL, f"cannot create file type {kind:o}")
    mode = share.creation_mode(message.mode)
    with share.using(message.dfid) as fid:
        directory = share.directory(fid)
        os.mknod(message.name, kind | mode, 0, dir_fd=directory.fd)
        status = _created(share, directory, message.name, mode)
    return Rmknod(message.tag, share.qid(status))


def symlink(share: Share, message) -> Rsymlink:
    """The target is stored as given: the guest resolves it, the server never does."""
    share.refuse_if_read_only()
    host.check_name(message.name)
    target = message.target
    if not target or b"\0" in target:
        raise OSError(errno.ENOENT if not target else errno.EINVAL, "invalid symlink target")
    if len(target) >= host.PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, "symlink target too long")
    with share.using(message.fid) as fid:
        directory = share.directory(fid)
        os.symlink(target, message.name, dir_fd=directory.fd)
        status = _created(share, directory, message.name, None)
    return Rsymlink(message.tag, share.qid(status))


def readlink(share: Share, message) -> Rreadlink:
    with share.using(message.fid) as fid:
        node = fid.node
        if node.kind != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symbolic link")
        target = os.readlink(b"", dir_fd=node.fd)
    return Rreadlink(message.tag, target)


def link(share: Share, message) -> Rlink:
    """Tlink: a new name in dfid for the file of fid (by its name, checked to be that file)."""
    share.refuse_if_read_only()
    host.check_name(message.name)
    with share.using(message.dfid) as directory_fid, share.using(message.fid) as fid:
        directory = share.directory(directory_fid)
        node = fid.node
        if node.is_directory:
            raise OSError(errno.EPERM, "directories have one name")
        parent, name = share.table.place_of(node)
        try:
            status = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            if (status.st_dev, status.st_ino) != node.identity:
                raise OSError(errno.ESTALE, "another file now has that name")
            os.link(
                name,
                message.name,
                src_dir_fd=parent.fd,
                dst_dir_fd=directory.fd,
                follow_symlinks=False,
            )
        finally:
            share.table.release(parent)
    return Rlink(message.tag)


def renameat(share: Share, message) -> Rrenameat:
    share.refuse_if_read_only()
    host.check_name(message.oldname)
    host.check_name(message.newname)
    with share.using(message.olddirfid) as old_fid, share.using(message.newdirfid) as new_fid:
        old_directory = share.directory(old_fid)
        new_directory = share.directory(new_fid)
        os.rename(
            message.oldname,
            message.newname,
            src_dir_fd=old_directory.fd,
            dst_dir_fd=new_directory.fd,
        )
        share.table.moved(old_directory, message.oldname, new_directory, message.newname)
    return Rrenameat(message.tag)


def unlinkat(share: Share, message) -> Runlinkat:
    share.refuse_if_read_only()
    host.check_name(message.name)
    if message.flags & ~AT_REMOVEDIR:
        raise OSError(errno.EINVAL, f"unlinkat flags {message.flags:#x}")
    with share.using(message.dirfid) as fid:
        directory = share.directory(fid)
        if message.flags & AT_REMOVEDIR:
            os.rmdir(message.name, dir_fd=directory.fd)
        else:
            os.unlink(message.name, dir_fd=directory.fd)
    return Runlinkat(message.tag)
