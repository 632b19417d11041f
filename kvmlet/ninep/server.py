"""A 9P2000.L file server over one host directory: one request in, one reply out.

`Server.handle(readable, writable)` serves one T-message that lies in the `readable` buffers
and writes the R-message into the `writable` ones, returning its length: the shape of a virtio
chain (a transport hands it the chain's memoryviews; the tests hand it bytearrays). It is a
self-contained call, safe to make from several threads at once, so a slow file on one request
does not hold up the others; it never raises: anything wrong with a request becomes an Rlerror
with an errno (a malformed message EINVAL, an unknown type EOPNOTSUPP, a kvmlet bug EIO and a
log line), and a request whose reply buffers cannot hold even an Rlerror is not executed.

The session state is the negotiated msize (bounded by `max_msize`) and the fid table (bounded
by `max_fids`); Tversion starts a new session. Read-only shares answer EROFS to everything that
would change the share. Extended attributes are not supported (EOPNOTSUPP, which Linux takes as
"none"); neither are the 9P2000 and 9P2000.u operations Linux does not send in 9P2000.L mode.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Sequence

from kvmlet.errors import LazyLogger
from kvmlet.ninep import entries, files
from kvmlet.ninep.buffers import Scatter
from kvmlet.ninep.messages import (
    DATA_REPLY_HEADER_SIZE,
    IO_HEADER_SIZE,
    MAX_WALK_NAMES,
    NOFID,
    NOTAG,
    TWRITE_DATA_OFFSET,
    TWRITE_HEADER,
    VERSION_9P2000_L,
    VERSION_UNKNOWN,
    Rattach,
    Rclunk,
    Rflush,
    Rlerror,
    Rreaddir,
    Rversion,
    Rwalk,
    Tattach,
    Tauth,
    Tclunk,
    Tflush,
    Tfsync,
    Tgetattr,
    Tgetlock,
    Tlcreate,
    Tlink,
    Tlock,
    Tlopen,
    Tmkdir,
    Tmknod,
    Tread,
    Treaddir,
    Treadlink,
    Tremove,
    Trename,
    Trenameat,
    Tsetattr,
    Tstatfs,
    Tsymlink,
    Tunlinkat,
    Tversion,
    Twalk,
    Twrite,
    Txattrcreate,
    Txattrwalk,
    UnknownMessage,
    data_reply_header,
    decode_body,
    encode,
    error_reply,
)
from kvmlet.ninep.share import Share
from kvmlet.ninep.wire import HEADER, HEADER_SIZE, MalformedMessage

log = LazyLogger(__name__)

MAX_MSIZE = 1 << 20
MIN_MSIZE = 4096
"""Linux refuses less; Rgetattr, Rreadlink of PATH_MAX and a useful Rread need about that."""
ERROR_REPLY_SIZE = HEADER_SIZE + 4
FLUSH_WAIT = 5.0
"""How long a Tflush waits for the request it names (a server thread is never held longer)."""
LOGGED_INTERNAL_ERRORS = 10

_UNSUPPORTED = {Tauth.TYPE, Trename.TYPE, Txattrwalk.TYPE, Txattrcreate.TYPE}
_OPERATIONS = {
    Tstatfs.TYPE: entries.statfs,
    Tlopen.TYPE: files.lopen,
    Tlcreate.TYPE: files.lcreate,
    Tsymlink.TYPE: entries.symlink,
    Tmknod.TYPE: entries.mknod,
    Treadlink.TYPE: entries.readlink,
    Tgetattr.TYPE: entries.get_attributes,
    Tsetattr.TYPE: entries.set_attributes,
    Tfsync.TYPE: files.fsync,
    Tlock.TYPE: files.lock,
    Tgetlock.TYPE: files.getlock,
    Tlink.TYPE: entries.link,
    Tmkdir.TYPE: entries.mkdir,
    Trenameat.TYPE: entries.renameat,
    Tunlinkat.TYPE: entries.unlinkat,
}


class Server:
    """A 9P2000.L server for one host directory (one session: one guest mount)."""

    def __init__(
        self,
        path: str,
        read_only: bool = False,
        max_fids: int = 4096,
        max_msize: int = MAX_MSIZE,
    ):
        """Raises KvmletError when `path` cannot be shared (missing, not a directory, a kernel
        pseudo file system, a host without openat2)."""
        self.share = Share(path, read_only, max_fids)
        self.max_msize = max(MIN_MSIZE, max_msize)
        self.msize = 0  # negotiated by Tversion; 0 before
        self.requests = 0
        self.errors = 0
        self.internal_errors = 0
        self._lock = threading.Lock()
        self._tag_done = threading.Condition(self._lock)
        self._in_flight: dict[int, int] = {}  # tag -> requests with that tag being served
        self._flushes_waiting = 0

    def reset(self) -> None:
        """Forget the session (the transport was reset): every fid clunked, msize unset."""
        self.share.table.clear()
        with self._lock:
            self.msize = 0

    def close(self) -> None:
        self.reset()
        self.share.close()

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "internal_errors": self.internal_errors,
            "fids": len(self.share.table),
            "msize": self.msize,
        }

    # One request -----------------------------------------------------------------------------

    def handle(self, readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        """Serve the T-message in `readable`; the R-message goes into `writable`. Returns the
        reply's length (0 when the buffers cannot hold one)."""
        request, reply = Scatter(readable), Scatter(writable)
        self.requests += 1
        if readable and len(readable[0]) >= HEADER_SIZE:  # the usual case: one call, no copy
            size, type_number, tag = HEADER.unpack_from(readable[0])
        else:
            header = request.copy(0, HEADER_SIZE)
            if len(header) < HEADER_SIZE:
                return self._reply(reply, NOTAG, error_reply(NOTAG, errno.EINVAL))
            size, type_number, tag = HEADER.unpack(header)
        if reply.length < ERROR_REPLY_SIZE:
            return 0
        self._begin(tag)
        try:
            result = self._serve(type_number, tag, size, request, reply)
        except OSError as error:
            result = error_reply(tag, error.errno or errno.EIO)
        except UnknownMessage:
            result = error_reply(tag, errno.EOPNOTSUPP)
        except MalformedMessage:
            result = error_reply(tag, errno.EINVAL)
        except Exception:
            self._internal_error(type_number)
            result = error_reply(tag, errno.EIO)
        finally:
            self._end(tag)
        if type(result) is int:
            return result
        return self._reply(reply, tag, result)

    def _reply(self, reply: Scatter, tag: int, message: bytes) -> int:
        """Write the reply; one that does not fit the buffers or is not smaller than msize
        (Linux refuses those) becomes EMSGSIZE."""
        if len(message) > reply.length or len(message) >= (self.msize or self.max_msize):
            message = error_reply(tag, errno.EMSGSIZE)
            if len(message) > reply.length:
                return 0
        if message[4] == Rlerror.TYPE:
            self.errors += 1
        return reply.write(message)

    def _internal_error(self, type_number: int) -> None:
        with self._lock:
            self.internal_errors += 1
            count = self.internal_errors
        if count <= LOGGED_INTERNAL_ERRORS:
            log.exception("9p: request of type %d failed inside the server", type_number)

    def _serve(self, type_number: int, tag: int, size: int, request: Scatter, reply: Scatter):
        """The reply's bytes, or its length when it was written in place (Rread)."""
        if not HEADER_SIZE <= size <= request.length:
            raise MalformedMessage(f"size field {size} for {request.length} bytes of request")
        if size > (self.msize or self.max_msize):
            raise OSError(errno.EMSGSIZE, "request larger than msize")
        share = self.share
        if type_number == Twrite.TYPE:
            if size < TWRITE_DATA_OFFSET:
                raise MalformedMessage("Twrite shorter than its header")
            fid, offset, count = TWRITE_HEADER.unpack(request.copy(HEADER_SIZE, TWRITE_DATA_OFFSET))
            if TWRITE_DATA_OFFSET + count > size:
                raise MalformedMessage("Twrite data runs past the message")
            self._check_session()
            data = request.slices(TWRITE_DATA_OFFSET, TWRITE_DATA_OFFSET + count)
            return encode(files.write(share, Twrite(tag, fid, offset, data)))
        message = decode_body(type_number, tag, request.copy(HEADER_SIZE, size))
        if type_number == Tversion.TYPE:
            return encode(self._version(message))
        self._check_session()
        if type_number == Tread.TYPE:
            return files.read(share, message, reply, self._data_room(reply))
        if type_number == Treaddir.TYPE:
            data = files.readdir(share, message, self._data_room(reply))
            return data_reply_header(Rreaddir.TYPE, tag, len(data)) + data
        operation = _OPERATIONS.get(type_number)
        if operation is not None:
            return encode(operation(share, message))
        if type_number == Twalk.TYPE:
            return encode(self._walk(message))
        if type_number == Tclunk.TYPE:
            share.table.clunk(message.fid)
            return encode(Rclunk(tag))
        if type_number == Tattach.TYPE:
            return encode(self._attach(message))
        if type_number == Tflush.TYPE:
            return encode(self._flush(message))
        if type_number == Tremove.TYPE:  # a clunk even when the remove fails (9P2000)
            share.table.clunk(message.fid)
        if type_number in _UNSUPPORTED or type_number == Tremove.TYPE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        raise UnknownMessage(f"message type {type_number}")

    def _data_room(self, reply: Scatter) -> int:
        """The most data an Rread or Rreaddir may carry: what the reply buffers hold after its
        header, and no more than a client sizing its requests by msize expects."""
        msize = self.msize
        return min(reply.length - DATA_REPLY_HEADER_SIZE, msize - IO_HEADER_SIZE)

    def _check_session(self) -> None:
        if not self.msize:
            raise OSError(errno.EPROTO, "Tversion first")

    # Session operations ----------------------------------------------------------------------

    def _version(self, message) -> Rversion:
        """A new session at min(client's msize, ours); only 9P2000.L is spoken."""
        msize = min(message.msize, self.max_msize)
        version = message.version
        if version != VERSION_9P2000_L and not version.startswith(VERSION_9P2000_L + b"."):
            return Rversion(message.tag, msize, VERSION_UNKNOWN)
        if msize < MIN_MSIZE:
            raise OSError(errno.EINVAL, f"msize {msize} below {MIN_MSIZE}")
        self.reset()
        with self._lock:
            self.msize = msize
        return Rversion(message.tag, msize, VERSION_9P2000_L)

    def _attach(self, message) -> Rattach:
        """The root of the share (no authentication; aname, if given, must name the root)."""
        if message.afid != NOFID:
            raise OSError(errno.EINVAL, "no authentication")
        if message.aname not in (b"", b"/"):
            raise OSError(errno.ENOENT, "aname names no export")
        table, root = self.share.table, self.share.root
        table.install(message.fid, table.retain(root))
        return Rattach(message.tag, self.share.node_qid(root))

    def _walk(self, message) -> Rwalk:
        """Walk names one by one from fid into newfid; a walk that stops after the first name
        answers the qids it got and leaves newfid alone (9P)."""
        if len(message.names) > MAX_WALK_NAMES:
            raise OSError(errno.EINVAL, f"more than {MAX_WALK_NAMES} names")
        share, table = self.share, self.share.table
        with share.using(message.fid) as fid:
            replacing = fid if message.newfid == message.fid else None
            if replacing is None:
                table.check_free(message.newfid)
            node = table.retain(fid.node)
            qids = []
            try:
                for name in message.names:
                    try:
                        child = share.step(node, name)
                    except OSError:
                        if not qids:
                            raise
                        break
                    table.release(node)
                    node = child
                    qids.append(share.node_qid(node))
                if len(qids) == len(message.names):
                    walked, node = node, None
                    table.install(message.newfid, walked, replacing)
            finally:
                table.release(node)
        return Rwalk(message.tag, tuple(qids))

    def _flush(self, message) -> Rflush:
        """Answer once the request with `oldtag` has been answered (or FLUSH_WAIT passed):
        requests are short and never wait for locks, so none is interrupted."""
        deadline = time.monotonic() + FLUSH_WAIT
        own = 1 if message.oldtag == message.tag else 0
        with self._lock:
            self._flushes_waiting += 1
            try:
                while self._in_flight.get(message.oldtag, 0) > own:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._tag_done.wait(remaining)
            finally:
                self._flushes_waiting -= 1
        return Rflush(message.tag)

    def _begin(self, tag: int) -> None:
        with self._lock:
            self._in_flight[tag] = self._in_flight.get(tag, 0) + 1

    def _end(self, tag: int) -> None:
        with self._lock:
            left = self._in_flight[tag] - 1
            if left:
                self._in_flight[tag] = left
            else:
                del self._in_flight[tag]
            if self._flushes_waiting:
                self._tag_done.notify_all()
