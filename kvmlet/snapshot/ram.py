"""Guest RAM in a snapshot file: written without its zero pages, mapped back copy-on-write.

Saving a bank writes only the pages that hold something. Which pages might: for anonymous
RAM, those present or swapped out in this process (/proc/self/pagemap: a page the guest never
touched was never allocated and reads as zero); for a memfd, its data extents (SEEK_DATA, so
pages a vhost-user backend wrote count too); for a bank that is itself a restored snapshot,
the old file's data extents as well (pages not faulted in yet still hold its data). Within
those, 2 MiB chunks and then pages that compare equal to zeros are skipped. What is left is
written in runs; everything else stays a hole. Each 2 MiB chunk gets a CRC-32 of its bytes
as stored (holes read as zeros).

Restoring maps the bank's part of the file MAP_PRIVATE: nothing is read up front, a page is
read from the page cache the first time the guest (or KVM, or the monitor) touches it, and a
written page becomes the process's own copy, the file never changing. Shareable RAM (a memfd,
for a vhost-user backend, which must map the very pages the guest uses) cannot be a private
file mapping: `load_bank` copies the file's data extents into the memfd instead (SEEK_DATA,
SEEK_HOLE), eagerly, holes staying unallocated. No userfaultfd lazy loading: the private
mapping already loads lazily where it can.
"""

from __future__ import annotations

import array
import contextlib
import errno
import mmap
import os
import zlib
from collections.abc import Iterator

from kvmlet.errors import KvmletError
from kvmlet.memory import RamBank
from kvmlet.memory.guest_memory import MAP_NORESERVE

PAGE = mmap.PAGESIZE
CHUNK = 2 << 20
"""Granule of the zero test's first pass and of the checksums."""
ZERO_PAGE = bytes(PAGE)
ZERO_CHUNK = bytes(CHUNK)
PAGEMAP_PRESENT_OR_SWAPPED = 0xC0
"""Bits 63 and 62 of a pagemap entry, in its most significant byte."""
_NONZERO_TO_ONE = bytes([0] + [1] * 255)
_FLAGS_TO_ONE = bytes(1 if value & PAGEMAP_PRESENT_OR_SWAPPED else 0 for value in range(256))

Runs = list[tuple[int, int]]
"""Half-open byte ranges [start, end), sorted and disjoint."""


def _merge(runs: Runs) -> Runs:
    merged: Runs = []
    for start, end in sorted(runs):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _runs_of_ones(flags: bytes, unit: int) -> Runs:
    """Byte ranges (in `unit`s) where `flags` holds 1."""
    runs: Runs = []
    position = flags.find(1)
    while position >= 0:
        end = flags.find(0, position)
        if end < 0:
            end = len(flags)
        runs.append((position * unit, end * unit))
        position = flags.find(1, end)
    return runs


def resident_runs(bank: RamBank) -> Runs | None:
    """Byte ranges of the bank's mapping whose pages are present or swapped out here (from
    /proc/self/pagemap); None when the pagemap cannot be read."""
    pages = bank.size // PAGE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        entries = os.pread(fd, 8 * pages, bank.host_address() // PAGE * 8)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(entries) != 8 * pages:
        return None
    return _runs_of_ones(entries[7::8].translate(_FLAGS_TO_ONE), PAGE)


def data_runs(fd: int, start: int, end: int) -> Runs:
    """The data extents of file `fd` within [start, end) (SEEK_DATA/SEEK_HOLE; a file system
    without them reports everything as data)."""
    runs: Runs = []
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after `position`
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data, hole))
        position = hole
    return runs


def candidate_runs(bank: RamBank, backing: tuple[int, int] | None = None) -> Runs:
    """Ranges of the bank (offsets in it) that may hold non-zero bytes; `backing` is the
    (file, offset) a restored bank is mapped from."""
    if bank.fd is not None:
        runs = [
            (start - bank.fd_offset, end - bank.fd_offset)
            for start, end in data_runs(bank.fd, bank.fd_offset, bank.fd_offset + bank.size)
        ]
    else:
        resident = resident_runs(bank)
        runs = [(0, bank.size)] if resident is None else resident
    if backing is not None:
        fd, offset = backing
        runs += [(a - offset, b - offset) for a, b in data_runs(fd, offset, offset + bank.size)]
    return _merge([(max(0, a), min(bank.size, b)) for a, b in runs if a < b])


def _nonzero_runs(mapping: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs of non-zero pages within [start, end) (page-aligned), chunk by chunk."""
    chunk_start = start
    while chunk_start < end:
        chunk_end = min(end, (chunk_start // CHUNK + 1) * CHUNK)
        length = chunk_end - chunk_start
        if mapping[chunk_start:chunk_end] != ZERO_CHUNK[:length]:
            flags = bytes(
                0 if mapping[page : page + PAGE] == ZERO_PAGE else 1
                for page in range(chunk_start, chunk_end, PAGE)
            )
            for a, b in _runs_of_ones(flags, PAGE):
                yield chunk_start + a, chunk_start + b
        chunk_start = chunk_end


def save_bank(
    fd: int, file_offset: int, bank: RamBank, backing: tuple[int, int] | None = None
) -> tuple[bytes, int]:
    """Write a bank's non-zero pages at `file_offset` of `fd` (its zero pages left as holes);
    returns the chunk checksums (CRC-32 per 2 MiB, as array "I" bytes) and the bytes written."""
    mapping = bank.mapping
    chunks = -(-bank.size // CHUNK)
    zero_crc = zlib.crc32(ZERO_CHUNK)
    checksums = array.array("I", [zero_crc]) * chunks
    if bank.size % CHUNK:
        checksums[-1] = zlib.crc32(ZERO_CHUNK[: bank.size % CHUNK])
    written = 0
    touched: set[int] = set()
    view = memoryview(mapping)
    try:
        for start, end in candidate_runs(bank, backing):
            start, end = start // PAGE * PAGE, min(bank.size, -(-end // PAGE) * PAGE)
            for run_start, run_end in _nonzero_runs(mapping, start, end):
                _write_all(fd, view[run_start:run_end], file_offset + run_start)
                written += run_end - run_start
                touched.update(range(run_start // CHUNK, (run_end - 1) // CHUNK + 1))
        for chunk in touched:
            checksums[chunk] = zlib.crc32(view[chunk * CHUNK : min(bank.size, (chunk + 1) * CHUNK)])
    except OSError as error:
        raise KvmletError(f"cannot write guest RAM to the snapshot: {error.strerror}") from None
    finally:
        view.release()
    return checksums.tobytes(), written


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        count = os.pwrite(fd, data, offset)
        data = data[count:]
        offset += count


def map_bank(fd: int, file_offset: int, base: int, size: int) -> RamBank:
    """A bank of `size` bytes at guest-physical `base` backed copy-on-write by the file's
    bytes at `file_offset` (MAP_PRIVATE: the file never changes)."""
    try:
        mapping = mmap.mmap(
            fd,
            size,
            flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=file_offset,
        )
    except (OSError, ValueError) as error:
        raise KvmletError(f"cannot map guest RAM from the snapshot: {error}") from None
    return RamBank(base, size, mapping)


def load_bank(fd: int, file_offset: int, bank: RamBank) -> int:
    """Copy the file's data extents for `bank` into it (a memfd bank); returns the bytes
    read. Holes are skipped: the fresh bank reads zeros there."""
    loaded = 0
    view = memoryview(bank.mapping)
    try:
        for start, end in data_runs(fd, file_offset, file_offset + bank.size):
            target = view[start - file_offset : end - file_offset]
            while target:
                count = os.preadv(fd, [target], start)
                if count <= 0:
                    raise KvmletError("the snapshot's guest RAM ends early: the file is damaged")
                target = target[count:]
                start += count
                loaded += count
    finally:
        view.release()
    return loaded


def verify_bank(fd: int, file_offset: int, size: int, checksums: bytes) -> None:
    """Check every chunk of a bank against its CRC-32 (holes read as zeros: only chunks with
    data in the file are read); KvmletError naming the first damaged chunk."""
    expected = array.array("I")
    expected.frombytes(checksums)
    if len(expected) != -(-size // CHUNK):
        raise KvmletError("the snapshot's RAM checksums do not match its RAM layout")
    with_data = {
        chunk
        for start, end in data_runs(fd, file_offset, file_offset + size)
        for chunk in range((start - file_offset) // CHUNK, (end - 1 - file_offset) // CHUNK + 1)
    }
    for chunk, crc in enumerate(expected):
        length = min(CHUNK, size - chunk * CHUNK)
        if chunk in with_data:
            stored = os.pread(fd, length, file_offset + chunk * CHUNK)
            actual = zlib.crc32(stored.ljust(length, b"\0"))
        else:
            actual = zlib.crc32(ZERO_CHUNK[:length])
        if actual != crc:
            raise KvmletError(
                f"guest RAM at {chunk * CHUNK:#x}-{chunk * CHUNK + length - 1:#x} of a bank "
                "is damaged (checksum mismatch)"
            )


def release_mapping(mapping: mmap.mmap) -> None:
    """Unmap, unless something still views it (then it goes with its last view)."""
    with contextlib.suppress(BufferError):
        mapping.close()
