"""Declaring a device's registers: offsets, widths, plain values or callbacks, guest write rules.

A `RegisterBlock` is a device model's register window (a `DeviceOps`: the bus calls its `read`
and `write`). Each `Register` has a name, an offset, a width (1, 2, 4 or 8 bytes) and a stored
value, and says what a guest write may do to it:

- `writable`: the bits a guest write changes (default: every bit but the W1C ones);
  `read_only=True` makes it 0;
- `w1c`: write-1-to-clear bits (a status register's "done" or "error" bits);
- `on_write(value)`: called after the stored value is updated, with the value the guest wrote
  (for a write to part of the register, the other bytes are the register's current value);
- `on_read()`: the value a guest read returns, computed when read (the stored value is then
  only what the device sets).

Accesses of any width and alignment are served byte by byte where they do not match one
register exactly (a byte read of a 4-byte register, a dword write across two word registers),
so a partial write never rewrites, and never clears W1C bits in, the bytes it did not touch.
Bytes no register covers read as zero and ignore writes. The device sets values with
`block["name"] = value`, `set_bits` and `clear_bits` (no guest write rules); the bus holds the
device's lock around `read`/`write`, so other threads take `context.lock` to change registers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kvmlet.bus import AccessSizes

_WIDTHS = (1, 2, 4, 8)


class Register:
    """One register of a `RegisterBlock`; see the module docstring for the rules."""

    __slots__ = ("mask", "name", "offset", "on_read", "on_write", "reset", "w1c", "width")

    def __init__(
        self,
        name: str,
        offset: int,
        width: int = 4,
        value: int = 0,
        *,
        writable: int | None = None,
        w1c: int = 0,
        read_only: bool = False,
        on_read: Callable[[], int] | None = None,
        on_write: Callable[[int], Any] | None = None,
    ):
        if width not in _WIDTHS:
            raise ValueError(f"register {name!r}: width {width} is not 1, 2, 4 or 8")
        if offset < 0 or offset % width:
            raise ValueError(f"register {name!r}: offset {offset:#x} is not {width}-aligned")
        full = (1 << (8 * width)) - 1
        self.name = name
        self.offset = offset
        self.width = width
        self.reset = value & full
        self.w1c = w1c & full
        if read_only:
            writable = 0
        self.mask = (full & ~self.w1c if writable is None else writable) & full
        self.on_read = on_read
        self.on_write = on_write

    def __repr__(self) -> str:
        return f"<Register {self.name} +{self.offset:#x}/{self.width}>"


class RegisterBlock:
    """A window of `size` bytes holding `registers`; a `DeviceOps` for an `IoRegion`.

    `valid` is what the guest may use: aligned accesses of 1 byte up to the widest register.
    `impl` lets the bus hand every access straight to the block, which splits it itself."""

    impl = AccessSizes(1, 8, unaligned=True)

    def __init__(self, size: int, registers: Iterable[Register]):
        self.size = size
        self.registers: dict[str, Register] = {}
        self.values: dict[str, int] = {}
        self._at: dict[int, Register] = {}
        self._owner: list[Register | None] = [None] * size
        for register in registers:
            self._add(register)
        widest = max((register.width for register in self.registers.values()), default=4)
        self.valid = AccessSizes(1, max(4, widest))

    def _add(self, register: Register) -> None:
        if register.name in self.registers:
            raise ValueError(f"two registers are named {register.name!r}")
        end = register.offset + register.width
        if end > self.size:
            raise ValueError(f"register {register.name!r} ends past the block's {self.size:#x}")
        clash = {other.name for other in self._owner[register.offset : end] if other}
        if clash:
            raise ValueError(f"register {register.name!r} overlaps {', '.join(sorted(clash))}")
        self.registers[register.name] = register
        self.values[register.name] = register.reset
        self._at[register.offset] = register
        self._owner[register.offset : end] = [register] * register.width

    # -- the device's side -------------------------------------------------------------------

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def __setitem__(self, name: str, value: int) -> None:
        register = self.registers[name]
        self.values[name] = value & ((1 << (8 * register.width)) - 1)

    def set_bits(self, name: str, bits: int) -> None:
        self[name] = self.values[name] | bits

    def clear_bits(self, name: str, bits: int) -> None:
        self[name] = self.values[name] & ~bits

    def reset(self) -> None:
        """Every register back to its reset value."""
        for name, register in self.registers.items():
            self.values[name] = register.reset

    def save_state(self) -> dict[str, int]:
        """Every register's stored value, by name."""
        return dict(self.values)

    def load_state(self, state: dict) -> None:
        """Stored values from `save_state` (no guest write rules, no callbacks)."""
        if set(state) != set(self.registers):
            raise ValueError(f"registers {sorted(state)} for a block of {sorted(self.registers)}")
        for name, value in state.items():
            self[name] = int(value)

    # -- the guest's side (the bus) ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        register = self._at.get(offset)
        if register is not None and register.width == size:
            return self._value_of(register)
        result = 0
        for register, first, count, position in self._pieces(offset, size):
            if register is not None:
                piece = self._value_of(register) >> (8 * first) & ((1 << (8 * count)) - 1)
                result |= piece << (8 * position)
        return result

    def write(self, offset: int, size: int, value: int) -> None:
        register = self._at.get(offset)
        if register is not None and register.width == size:
            self._store(register, value, (1 << (8 * size)) - 1)
            return
        for register, first, count, position in self._pieces(offset, size):
            if register is not None:
                piece = value >> (8 * position) & ((1 << (8 * count)) - 1)
                touched = ((1 << (8 * count)) - 1) << (8 * first)
                self._store(register, piece << (8 * first), touched)

    def _value_of(self, register: Register) -> int:
        if register.on_read is not None:
            return register.on_read() & ((1 << (8 * register.width)) - 1)
        return self.values[register.name]

    def _store(self, register: Register, value: int, touched: int) -> None:
        """Apply a guest write of `value` to the `touched` bits of `register`."""
        old = self.values[register.name]
        changeable = register.mask & touched
        new = (old & ~changeable) | (value & changeable)
        new &= ~(value & register.w1c)  # `value` has bits only in the touched bytes
        self.values[register.name] = new
        if register.on_write is not None:
            register.on_write((old & ~touched) | (value & touched))

    def _pieces(self, offset: int, size: int):
        """(register or None, first byte in it, byte count, byte position in the access)."""
        position = 0
        while position < size:
            address = offset + position
            register = self._owner[address] if 0 <= address < self.size else None
            if register is None:
                yield None, 0, 1, position
                position += 1
                continue
            first = address - register.offset
            count = min(register.width - first, size - position)
            yield register, first, count, position
            position += count
