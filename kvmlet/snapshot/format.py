"""The snapshot file: a preamble, guest RAM, and the state document.

    offset 0      preamble (one page): magic "KVMLETSN", format version, flags, where the
                  RAM area and the state document lie, the state's CRC-32, the preamble's
                  own CRC-32
    offset 4096   guest RAM, bank after bank, each at a page-aligned offset: zero pages are
                  holes (never written), so the file takes the room the guest's data takes
    after RAM     the state document (codec.py): format and kvmlet versions, the host CPU,
                  the machine's configuration, disks, RAM layout with a CRC-32 per 2 MiB
                  chunk, vCPUs, VM and device states

The magic and the version never move, so any later kvmlet can say what a file is before it
reads the rest. Reading checks, each failure one line: the magic, the version (a newer
format is refused before anything else is read), the preamble's checksum, the file's length
(a truncated file is caught before its state is parsed), the state's checksum. RAM chunks are
checked only when asked (`verify`), since reading them all is what mapping the file avoids.

A file is written under a temporary name beside its destination and renamed over it once
complete and on disk: a machine restored from the old file keeps it mapped, and a reader
never sees half a snapshot.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from typing import Any

from kvmlet.errors import KvmletError
from kvmlet.snapshot import codec

MAGIC = b"KVMLETSN"
FORMAT_VERSION = 1
OLDEST_FORMAT = 1
PREAMBLE = struct.Struct("<8sIIQQQQI")
"""magic, format version, flags, RAM offset, RAM bytes, state offset, state bytes, state CRC;
then the CRC-32 of those bytes."""
_PREAMBLE_CHECKSUM = struct.Struct("<I")
PREAMBLE_SIZE = 4096
PAGE_SIZE = 4096


class SnapshotError(KvmletError):
    """A snapshot file that cannot be read (one line, naming the file)."""


def page_aligned(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


class SnapshotWriter:
    """A snapshot being written: RAM first (`bank_offset` says where each bank goes), then
    `finish(state)`, then `commit()` puts it in place; `abort()` removes what was written."""

    def __init__(self, path: str, bank_sizes: list[int]):
        self.path = os.path.abspath(path)
        directory = os.path.dirname(self.path)
        base = os.path.basename(self.path)
        self.temporary = os.path.join(directory, f".{base}.{os.getpid()}.partial")
        try:
            self.fd = os.open(
                self.temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
        except OSError as error:
            raise KvmletError(f"cannot write the snapshot {path}: {_reason(error)}") from None
        self.bank_offsets = []
        offset = PREAMBLE_SIZE
        for size in bank_sizes:
            self.bank_offsets.append(offset)
            offset += page_aligned(size)
        self.ram_size = offset - PREAMBLE_SIZE
        self.size = offset
        try:
            os.ftruncate(self.fd, offset)  # the RAM area: holes until written
        except OSError as error:
            self.abort()
            raise KvmletError(f"cannot write the snapshot {path}: {_reason(error)}") from None

    def finish(self, state: dict[str, Any]) -> int:
        """Write the state document and the preamble; returns the file's size."""
        document = codec.encode(state)
        fields = PREAMBLE.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            PREAMBLE_SIZE,
            self.ram_size,
            self.size,
            len(document),
            zlib.crc32(document),
        )
        preamble = fields + _PREAMBLE_CHECKSUM.pack(zlib.crc32(fields))
        try:
            _write_all(self.fd, document, self.size)
            _write_all(self.fd, preamble, 0)
        except OSError as error:
            raise KvmletError(f"cannot write the snapshot {self.path}: {_reason(error)}") from None
        self.size += len(document)
        return self.size

    def commit(self) -> None:
        """Flush the file to disk and rename it into place (its directory flushed too)."""
        try:
            os.fsync(self.fd)
            os.rename(self.temporary, self.path)
            directory = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as error:
            raise KvmletError(f"cannot write the snapshot {self.path}: {_reason(error)}") from None
        finally:
            self.close()

    def abort(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temporary)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


class SnapshotFile:
    """A snapshot opened for reading, its preamble and state checked; `state` is the
    decoded document, `fd` the open file (RAM is mapped from it)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise SnapshotError(f"cannot open the snapshot {path}: {_reason(error)}") from None
        try:
            self.state = self._read()
        except BaseException:
            self.close()
            raise

    def _fail(self, problem: str) -> SnapshotError:
        return SnapshotError(f"{self.path}: {problem}")

    def _read(self) -> dict[str, Any]:
        head = os.pread(self.fd, PREAMBLE.size + _PREAMBLE_CHECKSUM.size, 0)
        if len(head) < 12 or head[:8] != MAGIC:
            raise self._fail("not a kvmlet snapshot")
        (version,) = struct.unpack_from("<I", head, 8)
        if version > FORMAT_VERSION:
            raise self._fail(
                f"written in snapshot format {version} by a newer kvmlet; this one reads "
                f"formats {OLDEST_FORMAT} to {FORMAT_VERSION}"
            )
        if version < OLDEST_FORMAT:
            raise self._fail(f"snapshot format {version} is too old for this kvmlet")
        if len(head) < PREAMBLE.size + _PREAMBLE_CHECKSUM.size:
            raise self._fail("truncated (no whole header): the file is damaged")
        fields = head[: PREAMBLE.size]
        (checksum,) = _PREAMBLE_CHECKSUM.unpack_from(head, PREAMBLE.size)
        if zlib.crc32(fields) != checksum:
            raise self._fail("damaged header (checksum mismatch)")
        _, _, _, ram_offset, ram_size, state_offset, state_size, state_crc = PREAMBLE.unpack(fields)
        expected = state_offset + state_size
        actual = os.fstat(self.fd).st_size
        if actual < expected:
            raise self._fail(f"truncated: {actual} of its {expected} bytes are there")
        if actual > expected:
            raise self._fail(f"{actual - expected} bytes too many: the file is damaged")
        self.ram_offset, self.ram_size = ram_offset, ram_size
        document = os.pread(self.fd, state_size, state_offset)
        if len(document) != state_size or zlib.crc32(document) != state_crc:
            raise self._fail("damaged state (checksum mismatch)")
        try:
            state = codec.decode(document)
        except KvmletError as error:
            raise self._fail(str(error)) from None
        if not isinstance(state, dict) or state.get("format") != version:
            raise self._fail("damaged state (no format version in it)")
        return state

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
