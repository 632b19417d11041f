"""The shared directory: where every guest path is resolved, and nowhere else.

`Share` holds the root directory's descriptor and the fid table. A walk goes one name at a time
from a directory node (`step`): each name is checked to be one directory entry and opened with
`openat2` beneath that directory, following no symbolic link (a symlink becomes a node of its
own that can be read with readlink, never traversed: the guest resolves symlinks itself, in its
own namespace). `..` from the root stays at the root; from below it, the parent of a directory
inside the share is inside the share. Mount points of kernel pseudo file systems (/proc, /sys)
are sealed: they can be looked at, not entered or opened.

Files are opened (`reopen`) by name in their directory with the same rules and must still be
the file the fid was walked to; directories through their own descriptor. Qid paths combine a
small per-device index with the inode, so files on different mounts of a share never share one.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from kvmlet.errors import KvmletError
from kvmlet.ninep import host
from kvmlet.ninep.fids import Fid, FidTable, Node
from kvmlet.ninep.messages import QT_DIR, QT_FILE, QT_SYMLINK
from kvmlet.ninep.wire import Qid

_DEVICE_BITS = 15
_INODE_BITS = 48


class FidInUse:
    """A fid marked in use from `with` to its end (a class: cheaper than a generator)."""

    __slots__ = ("fid", "number", "table")

    def __init__(self, table: FidTable, number: int):
        self.table = table
        self.number = number

    def __enter__(self) -> Fid:
        self.fid = self.table.use(self.number)
        return self.fid

    def __exit__(self, *exc_info: object) -> None:
        self.table.done(self.fid)


def qid_type(mode: int) -> int:
    """The qid type bits of a file with this st_mode."""
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFDIR:
        return QT_DIR
    return QT_SYMLINK if kind == stat.S_IFLNK else QT_FILE


class Share:
    """One host directory given to a guest, read-only or not."""

    def __init__(self, path: str, read_only: bool = False, max_fids: int = 4096):
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise KvmletError(f"9p share {path}: {error.strerror}") from None
        try:
            sealed = host.sealed_filesystem(fd)
            if sealed is not None:
                raise KvmletError(f"9p share {path}: refusing to share a {sealed} file system")
            try:
                os.close(host.openat2(fd, b".", os.O_PATH))
            except OSError as error:
                raise KvmletError(
                    f"9p share {path}: openat2 unavailable ({error.strerror}); Linux 5.6 or "
                    "later is needed"
                ) from None
            self.root = Node(fd, os.fstat(fd), None, None, False)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self.read_only = read_only
        self.table = FidTable(max_fids)
        self.strip_set_id = os.geteuid() == 0
        self._devices: dict[int, int] = {}
        self._devices_lock = threading.Lock()

    def close(self) -> None:
        self.table.clear()
        self.table.release(self.root)

    # Identity --------------------------------------------------------------------------------

    def qid(self, status: os.stat_result) -> Qid:
        """The qid of a file: type from its mode, version 0, a path unique in the share."""
        return Qid(qid_type(status.st_mode), 0, self.qid_path(status.st_dev, status.st_ino))

    def node_qid(self, node: Node) -> Qid:
        return Qid(qid_type(node.kind), 0, self.qid_path(*node.identity))

    def qid_path(self, device: int, inode: int) -> int:
        index = self._devices.get(device)
        if index is None:
            with self._devices_lock:
                if len(self._devices) < 1 << _DEVICE_BITS:
                    index = self._devices.setdefault(device, len(self._devices))
        if index is not None and inode < 1 << _INODE_BITS:
            return index << _INODE_BITS | inode
        return 1 << 63 | hash((device, inode)) & ((1 << 63) - 1)

    # Fids ------------------------------------------------------------------------------------

    def using(self, number: int) -> FidInUse:
        """`with share.using(number) as fid:` the fid for the length of a request (EBADF when
        there is none)."""
        return FidInUse(self.table, number)

    def refuse_if_read_only(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only share")

    @staticmethod
    def directory(fid: Fid) -> Node:
        """The fid's node, which must be an enterable directory (ENOTDIR, EACCES)."""
        node = fid.node
        if not node.is_directory:
            raise OSError(errno.ENOTDIR, "not a directory")
        if node.sealed:
            raise OSError(errno.EACCES, "a kernel pseudo file system is not shared")
        return node

    # Resolution ------------------------------------------------------------------------------

    def step(self, node: Node, name: bytes) -> Node:
        """The node for entry `name` of directory `node` (a new reference for the caller)."""
        if not node.is_directory:
            raise OSError(errno.ENOTDIR, "not a directory")
        if name == b"..":
            if node.identity == self.root.identity:
                return self.table.retain(node)
            return self.adopt(host.open_parent(node.fd), None, None, node)
        host.check_name(name)
        if node.sealed:
            raise OSError(errno.EACCES, "a kernel pseudo file system is not shared")
        return self.adopt(host.open_beneath(node.fd, name, os.O_PATH), node, name, node)

    def adopt(self, fd: int, parent: Node | None, name: bytes | None, came_from: Node) -> Node:
        """A node for a descriptor just opened from `came_from`: sealed if it lies on a kernel
        pseudo file system (checked where the walk crosses onto another device: a mount
        point, or a file bind-mounted from elsewhere)."""
        try:
            status = os.fstat(fd)
            sealed = False
            if status.st_dev != came_from.identity[0]:
                sealed = host.sealed_filesystem(fd) is not None
        except BaseException:
            os.close(fd)
            raise
        return self.table.adopt(fd, status, parent, name, sealed)

    def reopen(self, node: Node, flags: int, truncate: bool = False) -> int:
        """A descriptor open with `flags` on the very object `node` is (ESTALE if its name now
        holds another one); only regular files and directories are opened."""
        if node.sealed:
            raise OSError(errno.EACCES, "a kernel pseudo file system is not shared")
        if node.is_directory:
            return host.open_beneath(node.fd, b".", flags | os.O_DIRECTORY)
        if node.kind == stat.S_IFLNK:
            raise OSError(errno.ELOOP, "a symbolic link is not opened")
        if node.kind != stat.S_IFREG:
            raise OSError(errno.ENXIO, "only regular files and directories are opened")
        for _ in range(3):  # a rename may move the file between reading its place and opening
            parent, name = self.table.place_of(node)
            try:
                fd = host.open_beneath(parent.fd, name, flags | os.O_NONBLOCK)
            except FileNotFoundError:
                if node.parent is parent and node.name == name:
                    raise
                continue
            finally:
                self.table.release(parent)
            try:
                status = os.fstat(fd)
                if (status.st_dev, status.st_ino) == node.identity:
                    host.clear_nonblocking(fd)
                    if truncate:
                        os.ftruncate(fd, 0)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if node.parent is parent and node.name == name:
                break
        raise OSError(errno.ESTALE, "another file now has that name")

    def creation_mode(self, mode: int, directory: bool = False) -> int:
        """The permission bits a guest asked for a new object: set-user/group-ID bits of a
        non-directory are dropped when the monitor runs as root (they would be root's)."""
        mode &= 0o7777
        if self.strip_set_id and not directory:
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return mode

    def settle_mode(self, fd: int, status: os.stat_result, mode: int) -> os.stat_result:
        """Give a new object exactly the mode the guest asked for (the guest applied its
        umask already; the monitor's must not apply twice)."""
        if stat.S_IMODE(status.st_mode) == mode:
            return status
        host.chmod(fd, mode)
        return os.fstat(fd)
