"""A message-level 9P2000.L client that plays the guest's side of `kvmlet.ninep.Server`.

It encodes T-messages with the server's own codec, hands them to `Server.handle` as buffers the
way a virtio chain would (optionally cut into several buffers, as Linux's scatter-gather lists
are), decodes the replies and keeps every reply's bytes (`replies`), so tests can check what
ever left the server. `call` raises `NinePError` for an Rlerror; `rpc` returns whatever came.
"""

from __future__ import annotations

import itertools
import struct

from kvmlet.ninep import messages as m
from kvmlet.ninep.messages import decode_response, encode

ROOT = 0
DEFAULT_MSIZE = 128 << 10
_DIRENT = struct.Struct("<BIQQBH")


class NinePError(Exception):
    """An Rlerror: the request failed with `errno`."""

    def __init__(self, errno: int):
        super().__init__(errno)
        self.errno = errno


def errno_of(call, *args, **kwargs) -> int:
    """The errno of the NinePError `call(*args, **kwargs)` must raise."""
    try:
        call(*args, **kwargs)
    except NinePError as error:
        return error.errno
    raise AssertionError(f"{getattr(call, '__name__', call)} succeeded")


def cut(data: bytes | bytearray, pieces: int) -> list[memoryview]:
    """`data` as `pieces` consecutive views of (about) equal size (none empty)."""
    view = memoryview(data)
    pieces = max(1, min(pieces, len(data)))
    bounds = [len(data) * index // pieces for index in range(pieces + 1)]
    return [view[low:high] for low, high in itertools.pairwise(bounds)]


class NinePClient:
    """One guest mount's worth of 9P over direct calls to a server."""

    def __init__(self, server, msize: int = DEFAULT_MSIZE, pieces: int = 1, first_fid: int = 1000):
        self.server = server
        self.msize = msize
        self.pieces = pieces
        self.replies: list[bytes] = []
        self._tags = itertools.count(1)
        self._fids = itertools.count(first_fid)

    def new_fid(self) -> int:
        return next(self._fids)

    # Transport ---------------------------------------------------------------------------

    def raw(self, request: bytes, capacity: int | None = None) -> bytes:
        """Send request bytes as they are; the reply bytes (`capacity` bytes of room)."""
        reply = bytearray(self.msize if capacity is None else capacity)
        length = self.server.handle(cut(request, self.pieces), cut(reply, self.pieces))
        assert 0 <= length <= len(reply)
        data = bytes(reply[:length])
        self.replies.append(data)
        return data

    def rpc(self, message, capacity: int | None = None):
        """Send `message` with a fresh tag; its decoded reply, with the same tag."""
        message = message._replace(tag=next(self._tags) & 0x7FFF)
        reply = decode_response(self.raw(encode(message), capacity))
        assert reply.tag == message.tag, (reply, message)
        return reply

    def call(self, message, capacity: int | None = None):
        """`rpc`, raising NinePError for an Rlerror and checking the reply type."""
        reply = self.rpc(message, capacity)
        if isinstance(reply, m.Rlerror):
            raise NinePError(reply.ecode)
        assert reply.TYPE == message.TYPE + 1, (reply, message)
        return reply

    # Session -----------------------------------------------------------------------------

    def version(self, msize: int | None = None, version: bytes = m.VERSION_9P2000_L):
        return self.call(m.Tversion(0, self.msize if msize is None else msize, version))

    def attach(self, fid: int = ROOT):
        return self.call(m.Tattach(0, fid, m.NOFID, b"root", b"", 0)).qid

    def mount(self) -> NinePClient:
        """Tversion and Tattach of the root as fid ROOT; returns self."""
        self.msize = self.version().msize
        self.attach()
        return self

    # Operations --------------------------------------------------------------------------

    def walk(self, fid: int, newfid: int, *names: bytes):
        return self.call(m.Twalk(0, fid, newfid, names)).qids

    def walk_new(self, *names: bytes, fid: int = ROOT) -> int:
        """A new fid for fid/names (all of them walked)."""
        newfid = self.new_fid()
        qids = self.walk(fid, newfid, *names)
        assert len(qids) == len(names), qids
        return newfid

    def clunk(self, fid: int) -> None:
        self.call(m.Tclunk(0, fid))

    def lopen(self, fid: int, flags: int = m.L_RDONLY):
        return self.call(m.Tlopen(0, fid, flags))

    def open(self, *names: bytes, flags: int = m.L_RDONLY) -> int:
        fid = self.walk_new(*names)
        self.lopen(fid, flags)
        return fid

    def lcreate(self, dirfid: int, name: bytes, flags: int = m.L_RDWR, mode: int = 0o644):
        return self.call(m.Tlcreate(0, dirfid, name, flags, mode, 0))

    def create(self, name: bytes, data: bytes = b"", *directory: bytes, mode: int = 0o644) -> int:
        """A new file directory/name holding `data`; returns its open fid."""
        fid = self.walk_new(*directory)
        self.lcreate(fid, name, m.L_RDWR, mode)
        if data:
            assert self.write(fid, 0, data) == len(data)
        return fid

    def read(self, fid: int, offset: int, count: int) -> bytes:
        return self.call(m.Tread(0, fid, offset, count)).data

    def read_all(self, fid: int, chunk: int = 8192) -> bytes:
        parts, offset = [], 0
        while data := self.read(fid, offset, chunk):
            parts.append(data)
            offset += len(data)
        return b"".join(parts)

    def write(self, fid: int, offset: int, data: bytes) -> int:
        return self.call(m.Twrite(0, fid, offset, data)).count

    def readdir(self, fid: int, count: int = 8192) -> list[tuple[bytes, int, int]]:
        """Every entry of an open directory fid, as (name, d_type, qid type)."""
        entries, offset = [], 0
        while True:
            data = self.call(m.Treaddir(0, fid, offset, count)).data
            if not data:
                return entries
            position = 0
            while position < len(data):
                qid_type, _, _, offset, d_type, length = _DIRENT.unpack_from(data, position)
                start = position + _DIRENT.size
                entries.append((data[start : start + length], d_type, qid_type))
                position = start + length

    def getattr(self, fid: int):
        return self.call(m.Tgetattr(0, fid, m.GETATTR_BASIC))

    def setattr(self, fid: int, valid: int, **fields):
        values = dict.fromkeys(m.Tsetattr._fields[3:], 0) | fields
        return self.call(m.Tsetattr(0, fid, valid, *values.values()))

    def mkdir(self, dirfid: int, name: bytes, mode: int = 0o755):
        return self.call(m.Tmkdir(0, dirfid, name, mode, 0)).qid

    def symlink(self, dirfid: int, name: bytes, target: bytes):
        return self.call(m.Tsymlink(0, dirfid, name, target, 0)).qid

    def readlink(self, fid: int) -> bytes:
        return self.call(m.Treadlink(0, fid)).target

    def unlink(self, dirfid: int, name: bytes, flags: int = 0) -> None:
        self.call(m.Tunlinkat(0, dirfid, name, flags))

    def rename(self, olddir: int, oldname: bytes, newdir: int, newname: bytes) -> None:
        self.call(m.Trenameat(0, olddir, oldname, newdir, newname))
