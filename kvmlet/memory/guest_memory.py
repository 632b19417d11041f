"""Guest RAM: host mappings of guest-physical ranges, with every access bounds-checked.

Guest RAM is one or more `RamBank`s, each an anonymous `mmap` (MAP_NORESERVE, so a 4 GiB guest
costs nothing until it touches its pages) placed at a guest-physical base. All guest-controlled
addresses and lengths (descriptor tables, boot structures, DMA buffers) go through
`GuestMemory`, which refuses any access that is not wholly inside one bank with
`GuestMemoryError`: the monitor never touches host memory it did not give the guest.

`view()` hands out zero-copy `memoryview`s for loaders and virtqueues; `host_address()` gives
the address KVM needs for a memory slot.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NewType

from kvmlet.errors import GuestMemoryError

GuestAddress = NewType("GuestAddress", int)
"""A guest-physical address (static typing only: at run time it is a plain int)."""

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(eq=False)
class RamBank:
    """One contiguous guest-physical range backed by one host mapping."""

    base: int
    size: int
    mapping: mmap.mmap = field(repr=False)

    @classmethod
    def anonymous(cls, base: int, size: int) -> RamBank:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        return cls(base, size, mmap.mmap(-1, size, flags=flags))

    @property
    def end(self) -> int:
        """One past the last guest-physical address of the bank."""
        return self.base + self.size

    def host_address(self) -> int:
        """Host virtual address of the bank's first byte (for KVM memory slots)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))


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

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Guest RAM from (base, size) pairs, each backed by fresh anonymous memory."""
        return cls([RamBank.anonymous(base, size) for base, size in layout])

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

    def contains(self, address: int, length: int = 1) -> bool:
        """Whether [address, address+length) lies wholly inside one RAM bank."""
        try:
            self._locate(address, length)
        except GuestMemoryError:
            return False
        return True

    def _locate(self, address: int, length: int) -> tuple[memoryview, int]:
        if length < 0 or address < 0:
            raise GuestMemoryError(f"bad guest access: {length} bytes at {address:#x}")
        for bank, view in zip(self.banks, self._views, strict=True):
            offset = address - bank.base
            if offset >= 0 and offset + length <= bank.size:
                return view, offset
        raise GuestMemoryError(f"guest access outside RAM: {length} bytes at {address:#x}")

    def view(self, address: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM; raises GuestMemoryError when out of bounds."""
        base, size, low = self._low
        offset = address - base
        if offset >= 0 and length >= 0 and offset + length <= size:
            return low[offset : offset + length]
        view, offset = self._locate(address, length)
        return view[offset : offset + length]

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
