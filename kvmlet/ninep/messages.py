"""9P2000.L messages as typed values, and their encoding (sans-I/O: bytes in, values out).

Every message is `size[4] type[1] tag[2]` followed by a body whose fields depend on the type.
Each message type here is a named tuple whose first field is the tag and whose other fields
follow the body in order; its `FORMAT` gives the body's field letters (`kvmlet.ninep.wire`).
The layouts are those of the Linux 6.1 client (net/9p/client.c, protocol.c) and of the
9P2000.L descriptions in QEMU's and diod's documentation.

`decode_request(message)` turns the bytes of a T-message into its value, `encode(value)` turns
any message back into bytes; the server uses the first and the `encode` of R-messages, the
test client the other two directions. Twrite and Rread carry bulk data: the server moves that
data between guest buffers and files itself and only uses the fixed parts here
(`TWRITE_HEADER`, `data_reply_header`).
"""

from __future__ import annotations

import struct
from collections import namedtuple

from kvmlet.ninep.wire import HEADER, HEADER_SIZE, Layout, MalformedMessage

NOTAG = 0xFFFF
NOFID = 0xFFFF_FFFF
MAX_WALK_NAMES = 16
IO_HEADER_SIZE = 24
"""P9_IOHDRSZ: what a client leaves for the Tread/Twrite header when it sizes data by msize."""

# Qid types.
QT_DIR = 0x80
QT_SYMLINK = 0x02
QT_FILE = 0x00

# Tgetattr/Rgetattr: which fields are valid.
GETATTR_BASIC = 0x7FF

# Tsetattr: which fields to set.
SETATTR_MODE = 1 << 0
SETATTR_UID = 1 << 1
SETATTR_GID = 1 << 2
SETATTR_SIZE = 1 << 3
SETATTR_ATIME = 1 << 4
SETATTR_MTIME = 1 << 5
SETATTR_CTIME = 1 << 6
SETATTR_ATIME_SET = 1 << 7
SETATTR_MTIME_SET = 1 << 8

# Tlopen/Tlcreate flags (9P2000.L's own values, equal to x86 Linux's O_*).
L_RDONLY = 0o0
L_WRONLY = 0o1
L_RDWR = 0o2
L_ACCESS_MODE = 0o3
L_EXCL = 0o200
L_TRUNC = 0o1000
L_APPEND = 0o2000
L_DSYNC = 0o10000
L_DIRECTORY = 0o200000
L_SYNC = 0o4000000

# Tunlinkat flags.
AT_REMOVEDIR = 0x200

# Tlock/Tgetlock.
LOCK_TYPE_RDLCK = 0
LOCK_TYPE_WRLCK = 1
LOCK_TYPE_UNLCK = 2
LOCK_SUCCESS = 0
LOCK_BLOCKED = 1

VERSION_9P2000_L = b"9P2000.L"
VERSION_UNKNOWN = b"unknown"

_MESSAGES: dict[int, type] = {}


def _message(name: str, type_number: int, format: str, fields: str) -> type:
    """A message type: a named tuple (tag, *fields) that knows its type number and layout."""
    names = fields.split()
    if len(names) != len(format):
        raise ValueError(f"{name}: {len(names)} fields for format {format!r}")
    cls = type(name, (namedtuple(name, ["tag", *names]),), {"__slots__": ()})
    cls.TYPE = type_number
    cls.FORMAT = format
    cls.LAYOUT = Layout(format)
    _MESSAGES[type_number] = cls
    return cls


Rlerror = _message("Rlerror", 7, "d", "ecode")
Tstatfs = _message("Tstatfs", 8, "d", "fid")
Rstatfs = _message(
    "Rstatfs", 9, "ddqqqqqqd", "type bsize blocks bfree bavail files ffree fsid namelen"
)
Tlopen = _message("Tlopen", 12, "dd", "fid flags")
Rlopen = _message("Rlopen", 13, "Qd", "qid iounit")
Tlcreate = _message("Tlcreate", 14, "dsddd", "fid name flags mode gid")
Rlcreate = _message("Rlcreate", 15, "Qd", "qid iounit")
Tsymlink = _message("Tsymlink", 16, "dssd", "fid name target gid")
Rsymlink = _message("Rsymlink", 17, "Q", "qid")
Tmknod = _message("Tmknod", 18, "dsdddd", "dfid name mode major minor gid")
Rmknod = _message("Rmknod", 19, "Q", "qid")
Trename = _message("Trename", 20, "dds", "fid dfid name")
Rrename = _message("Rrename", 21, "", "")
Treadlink = _message("Treadlink", 22, "d", "fid")
Rreadlink = _message("Rreadlink", 23, "s", "target")
Tgetattr = _message("Tgetattr", 24, "dq", "fid request_mask")
Rgetattr = _message(
    "Rgetattr",
    25,
    "qQdddqqqqqqqqqqqqqqq",
    "valid qid mode uid gid nlink rdev size blksize blocks atime_sec atime_nsec mtime_sec "
    "mtime_nsec ctime_sec ctime_nsec btime_sec btime_nsec gen data_version",
)
Tsetattr = _message(
    "Tsetattr",
    26,
    "dddddqqqqq",
    "fid valid mode uid gid size atime_sec atime_nsec mtime_sec mtime_nsec",
)
Rsetattr = _message("Rsetattr", 27, "", "")
Txattrwalk = _message("Txattrwalk", 30, "dds", "fid newfid name")
Rxattrwalk = _message("Rxattrwalk", 31, "q", "size")
Txattrcreate = _message("Txattrcreate", 32, "dsqd", "fid name size flags")
Rxattrcreate = _message("Rxattrcreate", 33, "", "")
Treaddir = _message("Treaddir", 40, "dqd", "fid offset count")
Rreaddir = _message("Rreaddir", 41, "D", "data")
Tfsync = _message("Tfsync", 50, "dd", "fid datasync")
Rfsync = _message("Rfsync", 51, "", "")
Tlock = _message("Tlock", 52, "dbdqqds", "fid type flags start length proc_id client_id")
Rlock = _message("Rlock", 53, "b", "status")
Tgetlock = _message("Tgetlock", 54, "dbqqds", "fid type start length proc_id client_id")
Rgetlock = _message("Rgetlock", 55, "bqqds", "type start length proc_id client_id")
Tlink = _message("Tlink", 70, "dds", "dfid fid name")
Rlink = _message("Rlink", 71, "", "")
Tmkdir = _message("Tmkdir", 72, "dsdd", "dfid name mode gid")
Rmkdir = _message("Rmkdir", 73, "Q", "qid")
Trenameat = _message("Trenameat", 74, "dsds", "olddirfid oldname newdirfid newname")
Rrenameat = _message("Rrenameat", 75, "", "")
Tunlinkat = _message("Tunlinkat", 76, "dsd", "dirfid name flags")
Runlinkat = _message("Runlinkat", 77, "", "")
Tversion = _message("Tversion", 100, "ds", "msize version")
Rversion = _message("Rversion", 101, "ds", "msize version")
Tauth = _message("Tauth", 102, "dssd", "afid uname aname n_uname")
Rauth = _message("Rauth", 103, "Q", "aqid")
Tattach = _message("Tattach", 104, "ddssd", "fid afid uname aname n_uname")
Rattach = _message("Rattach", 105, "Q", "qid")
Tflush = _message("Tflush", 108, "w", "oldtag")
Rflush = _message("Rflush", 109, "", "")
Twalk = _message("Twalk", 110, "ddW", "fid newfid names")
Rwalk = _message("Rwalk", 111, "R", "qids")
Tread = _message("Tread", 116, "dqd", "fid offset count")
Rread = _message("Rread", 117, "D", "data")
Twrite = _message("Twrite", 118, "dqD", "fid offset data")
Rwrite = _message("Rwrite", 119, "d", "count")
Tclunk = _message("Tclunk", 120, "d", "fid")
Rclunk = _message("Rclunk", 121, "", "")
Tremove = _message("Tremove", 122, "d", "fid")
Rremove = _message("Rremove", 123, "", "")

MESSAGE_TYPES = dict(_MESSAGES)
"""Every message type by its number."""
REQUEST_TYPES = {number: cls for number, cls in _MESSAGES.items() if cls.__name__[0] == "T"}
"""The T-messages by number: what a server decodes."""

TWRITE_HEADER = struct.Struct("<IQI")
"""Twrite's fid, offset and count, after the message header; the data follows them."""
TWRITE_DATA_OFFSET = HEADER_SIZE + TWRITE_HEADER.size
DATA_REPLY_HEADER_SIZE = HEADER_SIZE + 4
"""Rread/Rreaddir: the message header and the data count, then the data."""
_DATA_REPLY_HEADER = struct.Struct("<IBHI")


class UnknownMessage(MalformedMessage):
    """A message type this server does not implement (it answers EOPNOTSUPP)."""


def decode_header(message: bytes | memoryview) -> tuple[int, int, int]:
    """size, type and tag of a message's first seven bytes."""
    if len(message) < HEADER_SIZE:
        raise MalformedMessage("message shorter than its header")
    return HEADER.unpack_from(message)


def decode_body(type_number: int, tag: int, body: bytes | memoryview, table=REQUEST_TYPES):
    """The message of type `type_number` with this tag and body; MalformedMessage if the body
    does not hold the type's fields, UnknownMessage if the type is not in `table`."""
    cls = table.get(type_number)
    if cls is None:
        raise UnknownMessage(f"message type {type_number} not supported")
    return cls(tag, *cls.LAYOUT.unpack(body))


def decode_request(message: bytes | memoryview):
    """The T-message in `message` (whose size field must match its length)."""
    size, type_number, tag = decode_header(message)
    if size != len(message):
        raise MalformedMessage(f"size field {size} for a message of {len(message)} bytes")
    return decode_body(type_number, tag, memoryview(message)[HEADER_SIZE:])


def decode_response(message: bytes | memoryview):
    """The R-message in `message` (for clients and tests)."""
    size, type_number, tag = decode_header(message)
    if size > len(message):
        raise MalformedMessage(f"size field {size} for a message of {len(message)} bytes")
    cls = MESSAGE_TYPES.get(type_number)
    if cls is None or cls.__name__[0] != "R":
        raise UnknownMessage(f"{type_number} is not a response type")
    return decode_body(type_number, tag, memoryview(message)[HEADER_SIZE:size], MESSAGE_TYPES)


def encode(message) -> bytes:
    """The bytes of any message value (a ValueError when a field is out of range)."""
    layout = message.LAYOUT
    framed = layout.framed
    if framed is not None:
        values = message
        if layout.framed_qids:
            values = list(message)
            for index in layout.framed_qids:  # from the last: indexes stay right
                values[index : index + 1] = values[index]
        try:
            return framed.pack(framed.size, message.TYPE, *values)
        except struct.error as error:
            raise ValueError(f"{type(message).__name__}: {error}") from None
    body = message.LAYOUT.pack(message[1:])
    return HEADER.pack(HEADER_SIZE + len(body), message.TYPE, message.tag) + body


def data_reply_header(type_number: int, tag: int, count: int) -> bytes:
    """The fixed start of an Rread or Rreaddir carrying `count` bytes of data."""
    return _DATA_REPLY_HEADER.pack(DATA_REPLY_HEADER_SIZE + count, type_number, tag, count)


def error_reply(tag: int, errno: int) -> bytes:
    """An Rlerror: the request with this tag failed with `errno`."""
    return encode(Rlerror(tag, errno))
