"""9P wire primitives: little-endian fields described by format letters, as the spec writes them.

A message body is a sequence of fields, each named by one letter (the same letters Linux's
net/9p/protocol.c uses where they mean the same thing):

    b u8    w u16    d u32    q u64
    s string: u16 length + bytes (names stay bytes: Linux file names need not be UTF-8)
    Q qid: type u8, version u32, path u64 (13 bytes)
    W strings: u16 count + that many strings (Twalk's names)
    R qids: u16 count + that many qids (Rwalk)
    D data: u32 count + that many bytes (Rread, Rreaddir, Twrite)

`Layout` compiles a format once into runs of fixed-size fields (one `struct` call each) and
variable-size ones, then packs and unpacks bodies. Unpacking a hostile body never reads past its
end: a field that does not fit raises `MalformedMessage`.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

HEADER = struct.Struct("<IBH")
"""size[4] type[1] tag[2]: the start of every message (size counts the whole message)."""
HEADER_SIZE = HEADER.size

_FIXED = {"b": "B", "w": "H", "d": "I", "q": "Q", "Q": "BIQ"}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_QID = struct.Struct("<BIQ")


class MalformedMessage(ValueError):
    """A message whose bytes do not describe what its type says (guest-controlled)."""


class Qid(NamedTuple):
    """The server's identity of a file: type bits (P9_QT*), version, unique path."""

    type: int
    version: int
    path: int


class Layout:
    """A compiled format: `unpack(body)` -> field values, `pack(values)` -> body bytes."""

    __slots__ = ("flat", "format", "framed", "framed_qids", "steps")

    def __init__(self, format: str):
        self.format = format
        # A format of plain numbers only (the common case) is one struct for the whole body.
        # `framed` is the struct of any fixed-size format with the message header in front,
        # one call to encode a message (Rgetattr, Rlopen: qids included, spread into their
        # three numbers at `framed_qids`, the message's indexes of its qids, last first).
        fixed = all(letter in _FIXED for letter in format)
        self.flat = _run_struct(format) if fixed and "Q" not in format else None
        self.framed = (
            struct.Struct(HEADER.format + _run_struct(format).format[1:]) if fixed else None
        )
        self.framed_qids = tuple(index + 1 for index in _qid_indexes(format)) if fixed else ()
        # Each step is (struct, letters) for a run of fixed-size fields, one struct call for
        # the run, or (None, letter) for a variable-size field.
        steps: list[tuple[struct.Struct | None, str]] = []
        run = ""
        for letter in format:
            if letter in _FIXED:
                run += letter
                continue
            if letter not in "sWRD":
                raise ValueError(f"unknown 9P field letter {letter!r}")
            if run:
                steps.append((_run_struct(run), run))
                run = ""
            steps.append((None, letter))
        if run:
            steps.append((_run_struct(run), run))
        self.steps = tuple(steps)

    def unpack(self, body: bytes | memoryview, offset: int = 0) -> list[object] | tuple:
        """The field values of `body` from `offset` (qids as `Qid`); trailing bytes are ignored."""
        end = len(body)
        flat = self.flat
        if flat is not None:
            if offset + flat.size > end:
                raise MalformedMessage(f"{self.format}: body ends inside a field")
            return flat.unpack_from(body, offset)
        values: list[object] = []
        for fixed, letters in self.steps:
            if fixed is not None:
                if offset + fixed.size > end:
                    raise MalformedMessage(f"{self.format}: body ends inside a field")
                raw = fixed.unpack_from(body, offset)
                offset += fixed.size
                values.extend(_group_qids(raw, letters) if "Q" in letters else raw)
            elif letters == "s":
                text, offset = _string(body, offset, end)
                values.append(text)
            elif letters == "W":  # Twalk's names, in every walk: no call per name
                count, offset = _count(_U16, body, offset, end)
                names = []
                for _ in range(count):
                    if offset + 2 > end:
                        raise MalformedMessage("body ends inside a count")
                    start = offset + 2
                    offset = start + _U16.unpack_from(body, offset)[0]
                    if offset > end:
                        raise MalformedMessage("string runs past the end of the message")
                    names.append(bytes(body[start:offset]))
                values.append(tuple(names))
            elif letters == "R":
                count, offset = _count(_U16, body, offset, end)
                if offset + count * _QID.size > end:
                    raise MalformedMessage("qid list runs past the end of the message")
                qids = tuple(Qid(*_QID.unpack_from(body, offset + 13 * i)) for i in range(count))
                offset += count * _QID.size
                values.append(qids)
            else:  # "D"
                count, offset = _count(_U32, body, offset, end)
                if offset + count > end:
                    raise MalformedMessage("data runs past the end of the message")
                values.append(bytes(body[offset : offset + count]))
                offset += count
        return values

    def pack(self, values: tuple | list) -> bytes:
        """The body for `values` (one per field letter); a value out of range is a ValueError."""
        if self.flat is not None:
            try:
                return self.flat.pack(*values)
            except struct.error as error:
                raise ValueError(f"{self.format}: {error}") from None
        parts: list[bytes] = []
        position = 0
        try:
            for fixed, letters in self.steps:
                if fixed is not None:
                    flat = list(values[position : position + len(letters)])
                    position += len(letters)
                    for index in _qid_indexes(letters):  # from the last: indexes stay right
                        flat[index : index + 1] = flat[index]
                    parts.append(fixed.pack(*flat))
                    continue
                value = values[position]
                position += 1
                if letters == "s":
                    parts.append(_pack_string(value))
                elif letters == "W":
                    parts.append(_U16.pack(len(value)))
                    parts.extend(_pack_string(name) for name in value)
                elif letters == "R":
                    parts.append(_U16.pack(len(value)))
                    parts.extend(_QID.pack(*qid) for qid in value)
                else:  # "D"
                    parts.append(_U32.pack(len(value)))
                    parts.append(bytes(value))
        except struct.error as error:
            raise ValueError(f"{self.format}: {error}") from None
        return b"".join(parts)


@functools.cache
def _qid_indexes(letters: str) -> tuple[int, ...]:
    """Where the qids are in a run of fixed fields, last first."""
    return tuple(index for index in reversed(range(len(letters))) if letters[index] == "Q")


def _run_struct(letters: str) -> struct.Struct:
    return struct.Struct("<" + "".join(_FIXED[letter] for letter in letters))


def _group_qids(raw: tuple, letters: str) -> list[object]:
    """The values of a fixed run with each qid's three numbers gathered into a `Qid`."""
    values: list[object] = []
    index = 0
    for letter in letters:
        if letter == "Q":
            values.append(Qid(*raw[index : index + 3]))
            index += 3
        else:
            values.append(raw[index])
            index += 1
    return values


def _count(counter: struct.Struct, body, offset: int, end: int) -> tuple[int, int]:
    if offset + counter.size > end:
        raise MalformedMessage("body ends inside a count")
    return counter.unpack_from(body, offset)[0], offset + counter.size


def _string(body, offset: int, end: int) -> tuple[bytes, int]:
    length, offset = _count(_U16, body, offset, end)
    if offset + length > end:
        raise MalformedMessage("string runs past the end of the message")
    return bytes(body[offset : offset + length]), offset + length


def _pack_string(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("9P strings are at most 65,535 bytes")
    return _U16.pack(len(value)) + value
