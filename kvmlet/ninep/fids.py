"""Fids and the host objects behind them, safe to use from several request threads at once.

A `Node` is one object of the share as the server holds it: a file descriptor (O_PATH, or the
open descriptor of a file the fid created), its type and identity (device, inode), and, for
anything but a directory, the directory node it was found in and its name there. A directory
is reopened through its own descriptor (`.`); a file is reopened by name in its directory
(`openat2` beneath it, its identity checked afterwards), so the fid table follows renames the
guest makes (`moved`). Walks with no names share the node of the fid they clone.

A `Fid` is the guest's handle: its node, the descriptor `Tlopen`/`Tlcreate` opened, and how
many requests are using it. Descriptors are closed when nothing can use them any more: a
clunked fid when its last request finishes, a node when its last fid or child lets go. A
number is never closed while a request may still pass it to the kernel, so a reused number
cannot redirect a read or a write to another file. Nodes and fids change under one lock.
"""

from __future__ import annotations

import errno
import os
import stat
import threading


class Node:
    """One object of the share: descriptor, kind (S_IFMT bits), identity and where it lies."""

    __slots__ = ("fd", "identity", "kind", "name", "parent", "refs", "sealed")

    def __init__(
        self,
        fd: int,
        status: os.stat_result,
        parent: Node | None,
        name: bytes | None,
        sealed: bool,
    ):
        self.fd = fd
        self.kind = stat.S_IFMT(status.st_mode)
        self.identity = (status.st_dev, status.st_ino)
        self.parent = parent
        self.name = name
        self.sealed = sealed
        self.refs = 1

    def __repr__(self) -> str:
        return f"Node(fd={self.fd}, kind={self.kind:o}, name={self.name!r})"

    @property
    def is_directory(self) -> bool:
        return self.kind == stat.S_IFDIR


class Fid:
    """The server side of one guest fid."""

    __slots__ = ("clunked", "node", "open_flags", "opened", "readdir_lock", "retired", "users")

    def __init__(self, node: Node):
        self.node = node
        self.opened: int | None = None  # the descriptor Tlopen/Tlcreate opened
        self.open_flags = 0  # the host flags it was opened with
        self.readdir_lock: threading.Lock | None = None  # readdir seeks the shared descriptor
        self.retired: Node | None = None  # the directory node a Tlcreate replaced
        self.users = 0
        self.clunked = False

    @property
    def readable(self) -> bool:
        return self.opened is not None and self.open_flags & os.O_ACCMODE != os.O_WRONLY

    @property
    def writable(self) -> bool:
        return self.opened is not None and self.open_flags & os.O_ACCMODE != os.O_RDONLY


class FidTable:
    """The fids of one session, at most `limit` of them, and the nodes they hold."""

    def __init__(self, limit: int):
        self.limit = limit
        self.lock = threading.Lock()
        self._fids: dict[int, Fid] = {}
        # Non-directory nodes by (identity of their directory, name): renames move them.
        self._places: dict[tuple[tuple[int, int], bytes], list[Node]] = {}

    def __len__(self) -> int:
        return len(self._fids)

    # Nodes -------------------------------------------------------------------------------

    def adopt(
        self, fd: int, status: os.stat_result, parent: Node | None, name: bytes | None, sealed
    ) -> Node:
        """A node for a descriptor just opened (and owned from now on, one reference held by
        the caller); a non-directory keeps its directory node and name."""
        with self.lock:
            if stat.S_ISDIR(status.st_mode) or parent is None:
                return Node(fd, status, None, None, sealed)
            parent.refs += 1
            node = Node(fd, status, parent, name, sealed)
            self._places.setdefault((parent.identity, name), []).append(node)
            return node

    def retain(self, node: Node) -> Node:
        with self.lock:
            node.refs += 1
        return node

    def release(self, node: Node | None) -> None:
        if node is not None:
            with self.lock:
                self._release(node)

    def _release(self, node: Node) -> None:
        while node is not None:
            node.refs -= 1
            if node.refs:
                return
            os.close(node.fd)
            node.fd = -1
            parent = node.parent
            if parent is not None:
                self._unplace(node)
            node = parent

    def _unplace(self, node: Node) -> None:
        key = (node.parent.identity, node.name)
        nodes = self._places.get(key, [])
        if node in nodes:
            nodes.remove(node)
        if not nodes:
            self._places.pop(key, None)

    def place_of(self, node: Node) -> tuple[Node, bytes]:
        """The directory node (one reference for the caller) and name of a non-directory."""
        with self.lock:
            if node.parent is None or node.name is None:
                raise OSError(errno.EINVAL, "no directory entry known for this fid")
            node.parent.refs += 1
            return node.parent, node.name

    def moved(self, old_directory: Node, old_name: bytes, new_directory: Node, new_name: bytes):
        """The guest renamed old_directory/old_name to new_directory/new_name: nodes found under
        the old name are reopened under the new one from now on."""
        with self.lock:
            nodes = self._places.pop((old_directory.identity, old_name), [])
            if not nodes:
                return
            self._places.setdefault((new_directory.identity, new_name), []).extend(nodes)
            for node in nodes:
                new_directory.refs += 1
                old_parent = node.parent
                node.parent, node.name = new_directory, new_name
                self._release(old_parent)

    # Fids --------------------------------------------------------------------------------

    def use(self, number: int) -> Fid:
        """The fid `number`, marked in use until `done` (EBADF when there is none)."""
        with self.lock:
            fid = self._fids.get(number)
            if fid is None:
                raise OSError(errno.EBADF, f"no fid {number}")
            fid.users += 1
            return fid

    def done(self, fid: Fid) -> None:
        with self.lock:
            fid.users -= 1
            if fid.clunked and not fid.users:
                self._close(fid)

    def check_free(self, number: int) -> None:
        """Refuse early a new fid number that is taken (EINVAL) or over the limit (EMFILE)."""
        with self.lock:
            self._check_free(number)

    def _check_free(self, number: int) -> None:
        if number in self._fids:
            raise OSError(errno.EINVAL, f"fid {number} is in use")
        if len(self._fids) >= self.limit:
            raise OSError(errno.EMFILE, f"more than {self.limit} fids")

    def install(self, number: int, node: Node, replacing: Fid | None = None) -> Fid:
        """Make `number` a new fid holding `node` (the caller's reference passes to it);
        `replacing` is the fid already under that number when a walk reuses it."""
        with self.lock:
            current = self._fids.get(number)
            if current is None or current is not replacing:
                try:
                    self._check_free(number)
                except OSError:
                    self._release(node)
                    raise
            else:
                self._clunk(number)
            fid = self._fids[number] = Fid(node)
            return fid

    def set_opened(self, fid: Fid, fd: int, flags: int, node: Node | None = None) -> None:
        """Record the descriptor Tlopen or Tlcreate opened (and the new node Tlcreate made):
        once per fid, since another request may be using what the fid holds."""
        with self.lock:
            if fid.opened is not None or fid.clunked:
                os.close(fd)
                self._release(node)
                raise OSError(errno.EBADF, "fid already opened")
            fid.opened, fid.open_flags = fd, flags
            if node is not None:
                fid.retired, fid.node = fid.node, node
            if fid.node.is_directory:
                fid.readdir_lock = threading.Lock()

    def clunk(self, number: int) -> None:
        with self.lock:
            if number not in self._fids:
                raise OSError(errno.EBADF, f"no fid {number}")
            self._clunk(number)

    def _clunk(self, number: int) -> None:
        fid = self._fids.pop(number)
        fid.clunked = True
        if not fid.users:
            self._close(fid)

    def clear(self) -> None:
        """Clunk every fid (a new Tversion, a device reset, the server closing)."""
        with self.lock:
            for number in list(self._fids):
                self._clunk(number)

    def _close(self, fid: Fid) -> None:
        if fid.opened is not None:
            os.close(fid.opened)
            fid.opened = None
        for node in (fid.node, fid.retired):
            if node is not None:
                self._release(node)
        fid.node = fid.retired = None
