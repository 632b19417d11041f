"""Guest RAM: host mappings of guest-physical ranges, with every access bounds-checked.

Guest RAM is one or more `RamBank`s, each a host mapping (MAP_NORESERVE, so a 4 GiB guest costs
nothing until it touches its pages) placed at a guest-physical base: anonymous memory, or a
memfd mapped shared (`GuestMemory.memfd`) that another process (a vhost-user backend) can map
too, given the bank's `fd` and `fd_offset`. All guest-controlled
addresses and lengths (descriptor tables, boot structures, DMA buffers) go through
`GuestMemory`, which refuses any access that is not wholly inside one bank with
`GuestMemoryError`: the monitor never touches host memory it did not give the guest.

`view()` hands out zero-copy `memoryview`s for loaders and virtqueues; `host_iovec()` turns
many buffers, bounds-checked in one pass, into host `struct iovec`s for a vectored system call
(pinning their bank while it runs); `host_address()` gives the address KVM needs for a memory
slot; `discard()` gives pages the guest gave up (a balloon) back to the host.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import itertools
import mmap
import operator
import os
import struct
import threading
from collections.abc import Iterator, Sequence

from kvmlet.errors import GuestMemoryError, KvmletError

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
"""Linux's flag (x86 value; Python's mmap module exports it only from 3.13): without it a large
guest counts against the host's overcommit limit in full before touching a page."""
GiB = 1 << 30
MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""A shared RAM file keeps its size for good: a process it was passed to cannot truncate it
under the monitor (a truncated page would be SIGBUS on the next access)."""

# From this many buffers on, one bounds check over all of them beats one check each (measured).
_MANY_BUFFERS = 8
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_FENCE = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier between this thread's guest-memory stores before it and its loads
    after it (the StoreLoad order x86 does not otherwise give, needed wherever a device
    publishes an index and then reads the driver's, as virtio's event index requires).

    Python has no fence of its own. Acquiring and releasing a lock are atomic read-modify-write
    instructions (glibc's semaphores, or CPython's own mutex from 3.13), which on x86 carry the
    `lock` prefix: every store issued before them is visible before any load issued after."""
    _FENCE.acquire()
    _FENCE.release()


class RamBank:
    """One contiguous guest-physical range backed by one host mapping.

    A shareable bank also has the file it maps: `fd` (a memfd the bank owns) and `fd_offset`,
    where the bank's first byte lies in it; an anonymous bank has `fd` None."""

    def __init__(
        self, base: int, size: int, mapping: mmap.mmap, fd: int | None = None, fd_offset: int = 0
    ):
        self.base = base
        self.size = size
        self.mapping = mapping
        self.fd = fd
        self.fd_offset = fd_offset

    def __repr__(self) -> str:
        shared = "" if self.fd is None else f", fd={self.fd}"
        return f"RamBank(base={self.base:#x}, size={self.size:#x}{shared})"

    @classmethod
    def anonymous(cls, base: int, size: int) -> RamBank:
        """A bank of fresh RAM; KvmletError (one line for the user) when the host refuses it."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        try:
            mapping = mmap.mmap(-1, size, flags=flags)
        except OSError as error:
            raise KvmletError(
                f"cannot map {size / GiB:g} GiB of guest RAM: {_reason(error)}"
            ) from None
        return cls(base, size, mapping)

    @classmethod
    def memfd(cls, base: int, size: int) -> RamBank:
        """A bank of fresh RAM in a sealed memfd, mapped shared, so that another process given
        `fd` maps the very same pages; KvmletError when the host refuses it."""
        try:
            fd = os.memfd_create(f"kvmlet-ram@{base:#x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as error:
            raise KvmletError(f"cannot create shareable guest RAM: {_reason(error)}") from None
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | MAP_NORESERVE)
        except OSError as error:
            os.close(fd)
            raise KvmletError(
                f"cannot map {size / GiB:g} GiB of shareable guest RAM: {_reason(error)}"
            ) from None
        return cls(base, size, mapping, fd)

    @property
    def shareable(self) -> bool:
        """Whether another process can map this bank (it has a file descriptor)."""
        return self.fd is not None

    @property
    def end(self) -> int:
        """One past the last guest-physical address of the bank."""
        return self.base + self.size

    def host_address(self) -> int:
        """Host virtual address of the bank's first byte (for KVM memory slots)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))

    def discard(self, offset: int, length: int) -> None:
        """Release the host pages behind [offset, offset+length) (page-aligned): the guest
        reads zeros there next time, and the monitor's RSS drops now. MADV_DONTNEED for
        private anonymous memory; MADV_REMOVE for a memfd bank, where DONTNEED would only
        unmap the pages and leave them in the file (and in every peer's mapping of it)."""
        advice = mmap.MADV_REMOVE if self.shareable else mmap.MADV_DONTNEED
        self.mapping.madvise(advice, offset, length)


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


class HostIovec:
    """Guest buffers as host `struct iovec`s (address, length), for preadv/pwritev through
    ctypes. `pin` is a view of the bank they lie in: while it is held, the bank cannot be
    unmapped under the system call; `with` releases it."""

    __slots__ = ("count", "pin", "words")

    def __init__(self, words: array.array, count: int, pin: memoryview):
        self.words = words
        self.count = count
        self.pin = pin

    def __repr__(self) -> str:
        return f"HostIovec({self.count} buffers)"

    def address(self) -> int:
        """Where the iovec array starts in host memory."""
        return self.words.buffer_info()[0]

    def part(self, start: int, stop: int) -> HostIovec:
        """Buffers [start, stop) as an iovec of their own, with a pin of its own."""
        return HostIovec(self.words[2 * start : 2 * stop], len(range(start, stop)), self.pin[:])

    def page_aligned(self, alignment: int) -> bool:
        """Whether every buffer starts and ends on an `alignment` boundary in host memory."""
        mask = alignment - 1
        return not any(word & mask for word in self.words)

    def __enter__(self) -> HostIovec:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pin.release()


class GuestMemory:
    """Bounds-checked access to guest RAM made of one or more banks."""

    def __init__(self, banks: list[RamBank]):
        ordered = sorted(banks, key=lambda bank: bank.base)
        for low, high in itertools.pairwise(ordered):
            if low.end > high.base:
                raise ValueError(f"RAM banks overlap at {high.base:#x}")
        self.banks = ordered
        self._views = [memoryview(bank.mapping) for bank in ordered]
        # The bank holding low RAM serves nearly every access (rings, buffers, boot data):
        # `view()` checks it inline before the general search.
        self._low = (ordered[0].base, ordered[0].size, self._views[0]) if ordered else (0, 0, b"")
        self._low_host_offset = ordered[0].host_address() - ordered[0].base if ordered else 0

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Guest RAM from (base, size) pairs, each backed by fresh anonymous memory."""
        return cls([RamBank.anonymous(base, size) for base, size in layout])

    @classmethod
    def memfd(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Guest RAM from (base, size) pairs, each bank in a memfd of its own (offset 0), so
        that a vhost-user backend can map it; otherwise the same as `anonymous`."""
        banks: list[RamBank] = []
        try:
            for base, size in layout:
                banks.append(RamBank.memfd(base, size))
        except BaseException:
            cls(banks).close()
            raise
        return cls(banks)

    def __iter__(self) -> Iterator[RamBank]:
        return iter(self.banks)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(bank.size for bank in self.banks)

    @property
    def end(self) -> int:
        """One past the highest guest-physical RAM address."""
        return self.banks[-1].end if self.banks else 0

    @property
    def shareable(self) -> bool:
        """Whether every bank can be mapped by another process."""
        return all(bank.shareable for bank in self.banks)

    def host_address(self, address: int, length: int) -> int:
        """Host virtual address of guest-physical `address`, whose `length` bytes must lie in
        one bank (GuestMemoryError otherwise): where this process, or a kernel or vhost-user
        backend given the memory table, finds them."""
        bank = self.banks[self._bank_index(address, length)]
        return bank.host_address() + address - bank.base

    def contains(self, address: int, length: int = 1) -> bool:
        """Whether [address, address+length) lies wholly inside one RAM bank."""
        try:
            self._locate(address, length)
        except GuestMemoryError:
            return False
        return True

    def _bank_index(self, address: int, length: int) -> int:
        """Which bank holds [address, address+length) whole; GuestMemoryError if none does."""
        if length < 0 or address < 0:
            raise GuestMemoryError(f"bad guest access: {length} bytes at {address:#x}")
        for index, bank in enumerate(self.banks):
            offset = address - bank.base
            if offset >= 0 and offset + length <= bank.size:
                return index
        raise GuestMemoryError(f"guest access outside RAM: {length} bytes at {address:#x}")

    def _locate(self, address: int, length: int) -> tuple[memoryview, int]:
        index = self._bank_index(address, length)
        return self._views[index], address - self.banks[index].base

    def view(self, address: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM; raises GuestMemoryError when out of bounds."""
        base, size, low = self._low
        offset = address - base
        if offset >= 0 and length >= 0 and offset + length <= size:
            return low[offset : offset + length]
        view, offset = self._locate(address, length)
        return view[offset : offset + length]

    def contains_all(self, addresses: Sequence[int], lengths: Sequence[int]) -> bool:
        """Whether every buffer (addresses[i], lengths[i]) lies inside the low-RAM bank.

        One check for the lot (lowest start, highest end) instead of one per buffer; False
        says only that some buffer is elsewhere (perhaps in another bank): check each one.
        """
        base, size, _ = self._low
        if not addresses:
            return True
        if len(addresses) != len(lengths) or min(addresses) < base or min(lengths) < 0:
            return False
        return max(map(operator.add, addresses, lengths)) <= base + size

    def views(self, addresses: Sequence[int], lengths: Sequence[int]) -> list[memoryview]:
        """Zero-copy views of many buffers (addresses[i], lengths[i]); raises GuestMemoryError
        when one is out of bounds. One bounds check for the lot when there are many buffers
        and `contains_all` holds (for a few, one check each is cheaper)."""
        if len(addresses) >= _MANY_BUFFERS:
            views = self.low_views(addresses, lengths)
            if views is not None:
                return views
        return [self.view(a, n) for a, n in zip(addresses, lengths, strict=True)]

    def low_views(
        self, addresses: Sequence[int], lengths: Sequence[int]
    ) -> list[memoryview] | None:
        """Zero-copy views of many buffers when `contains_all` holds (one bounds check for the
        lot); else None."""
        if not self.contains_all(addresses, lengths):
            return None
        base, _, low = self._low
        starts = list(map(operator.sub, addresses, itertools.repeat(base))) if base else addresses
        # Slices made by map in C, not a Python step per buffer (a 9p read brings ~100 pages).
        return list(map(low.__getitem__, map(slice, starts, map(operator.add, starts, lengths))))

    def host_iovec(self, addresses: Sequence[int], lengths: Sequence[int]) -> HostIovec | None:
        """The buffers as a `struct iovec` array for a vectored system call, when
        `contains_all` holds; else None. Built without a Python step per buffer."""
        if not self.contains_all(addresses, lengths):
            return None
        pin = self._low[2][:]
        words = [0] * (2 * len(addresses))
        words[0::2] = map(operator.add, addresses, itertools.repeat(self._low_host_offset))
        words[1::2] = lengths
        return HostIovec(array.array("Q", words), len(addresses), pin)

    def ask_for_huge_pages(self) -> None:
        """Ask for transparent huge pages under guest RAM (MADV_HUGEPAGE, as QEMU does).

        Where the host grants them, one page fault fills 2 MiB instead of 4 KiB (loading the
        kernel is faster: docs/performance.md) and KVM can map the guest with large pages. A
        host kernel without them refuses the advice; guest RAM then keeps small pages."""
        for bank in self.banks:
            with contextlib.suppress(OSError):
                bank.mapping.madvise(mmap.MADV_HUGEPAGE)

    def discard(self, address: int, length: int) -> None:
        """Give the host memory behind [address, address+length) back to the host (see
        `RamBank.discard`); GuestMemoryError when the range is not page-aligned or not wholly
        inside one bank."""
        if address % mmap.PAGESIZE or length % mmap.PAGESIZE:
            raise GuestMemoryError(f"discard of {length} bytes at {address:#x}: not page-aligned")
        for bank in self.banks:
            offset = address - bank.base
            if offset >= 0 and offset + length <= bank.size:
                if length:
                    bank.discard(offset, length)
                return
        raise GuestMemoryError(f"discard outside RAM: {length} bytes at {address:#x}")

    def read(self, address: int, length: int) -> bytes:
        view, offset = self._locate(address, length)
        return bytes(view[offset : offset + length])

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        view, offset = self._locate(address, len(data))
        view[offset : offset + len(data)] = data

    def fill(self, address: int, length: int, byte: int = 0) -> None:
        """Set `length` bytes at `address` to `byte`."""
        view, offset = self._locate(address, length)
        view[offset : offset + length] = bytes([byte]) * length

    def read_u8(self, address: int) -> int:
        view, offset = self._locate(address, 1)
        return view[offset]

    def read_u16(self, address: int) -> int:
        view, offset = self._locate(address, 2)
        return _U16.unpack_from(view, offset)[0]

    def read_u32(self, address: int) -> int:
        view, offset = self._locate(address, 4)
        return _U32.unpack_from(view, offset)[0]

    def read_u64(self, address: int) -> int:
        view, offset = self._locate(address, 8)
        return _U64.unpack_from(view, offset)[0]

    def write_u8(self, address: int, value: int) -> None:
        view, offset = self._locate(address, 1)
        view[offset] = value & 0xFF

    def write_u16(self, address: int, value: int) -> None:
        view, offset = self._locate(address, 2)
        _U16.pack_into(view, offset, value & 0xFFFF)

    def write_u32(self, address: int, value: int) -> None:
        view, offset = self._locate(address, 4)
        _U32.pack_into(view, offset, value & 0xFFFF_FFFF)

    def write_u64(self, address: int, value: int) -> None:
        view, offset = self._locate(address, 8)
        _U64.pack_into(view, offset, value & 0xFFFF_FFFF_FFFF_FFFF)

    def close(self) -> None:
        """Release the host mappings; one still viewed elsewhere (a bus region, a queue) is
        unmapped when its last view goes."""
        for view in self._views:
            view.release()
        for bank in self.banks:
            with contextlib.suppress(BufferError):
                bank.mapping.close()
            if bank.fd is not None:
                os.close(bank.fd)
                bank.fd = None
