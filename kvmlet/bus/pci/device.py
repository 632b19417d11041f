"""`PciDevice`: a PCI function's type-0 header, BARs, capabilities and their mapping.

Device models (virtio-pci, the host bridge) subclass or compose it. The guest programs the
header through the host bridge; this class keeps BAR registers honest (size masks, type bits),
and whenever a BAR register or the command register's I/O or memory enable changes, it moves,
shows or hides the BAR's region in the bus's I/O or memory container, in one transaction.
Devices hear about command changes through `command_changed` and about writes to their
capability bytes through the capability's `on_write` callback.

`lock` (re-entrant) guards the header: guest configuration accesses hold it, and so should a
device thread changing header bytes (e.g. through `set_interrupt_status`).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from kvmlet.bus import transactions
from kvmlet.bus.pci import config_space as cfg
from kvmlet.bus.pci.config_space import ConfigSpace
from kvmlet.bus.region import Region

if TYPE_CHECKING:
    from kvmlet.bus.pci.bus import PciBus

CapabilityWriteHook = Callable[[int, int, int], None]
"""on_write(offset from the capability's first byte, size, value) after the bytes are stored."""


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


class PciBar:
    """One base address register and the region it decodes to. `mapped_at` is the address
    the region decodes at (None while decoding is off or no valid address is programmed);
    `placed` turns true once the region has been added to the bus."""

    __slots__ = ("index", "kind", "mapped_at", "placed", "prefetchable", "region", "size")

    def __init__(
        self, index: int, kind: BarKind, size: int, region: Region, prefetchable: bool = False
    ):
        self.index = index
        self.kind = kind
        self.size = size
        self.region = region
        self.prefetchable = prefetchable
        self.mapped_at: int | None = None
        self.placed = False

    @property
    def register(self) -> int:
        return cfg.BAR0 + 4 * self.index

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


class PciCapability(NamedTuple):
    cap_id: int
    offset: int
    length: int
    on_write: CapabilityWriteHook | None


class PciDevice:
    """A PCI function with a type-0 configuration header."""

    def __init__(
        self,
        name: str,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ):
        """`class_code` is (base class << 16) | (subclass << 8) | programming interface;
        `interrupt_pin` is 0 (none) or 1-4 for INTA#-INTD#."""
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt pin {interrupt_pin} is not 0-4")
        self.name = name
        self.config = ConfigSpace()
        self.bars: list[PciBar | None] = [None] * cfg.BAR_COUNT
        self.capabilities: list[PciCapability] = []
        self.bus: PciBus | None = None
        self.lock = threading.RLock()
        config = self.config
        config.set(cfg.VENDOR_ID, 2, vendor_id)
        config.set(cfg.DEVICE_ID, 2, device_id)
        config.set(cfg.REVISION_ID, 1, revision)
        config.set(cfg.CLASS_PROG, 3, class_code)
        config.set(cfg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        config.set(cfg.SUBSYSTEM_ID, 2, subsystem_id)
        config.set(cfg.INTERRUPT_PIN, 1, interrupt_pin)
        config.set_writable(cfg.COMMAND, 2, cfg.COMMAND_WRITABLE)
        config.set_write_one_to_clear(cfg.STATUS, 2, cfg.STATUS_W1C)
        config.set_writable(cfg.CACHE_LINE_SIZE, 1, 0xFF)
        config.set_writable(cfg.LATENCY_TIMER, 1, 0xFF)
        config.set_writable(cfg.INTERRUPT_LINE, 1, 0xFF)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def command(self) -> int:
        return self.config.get(cfg.COMMAND, 2)

    def add_bar(
        self, index: int, kind: BarKind, size: int, region: Region, prefetchable: bool = False
    ) -> PciBar:
        """Declare BAR `index` (a 64-bit BAR also takes index + 1) decoding to `region`."""
        minimum = 4 if kind is BarKind.IO else 16
        if size < minimum or size & (size - 1):
            raise ValueError(f"{self.name}: BAR size {size:#x} is not a power of two >= {minimum}")
        last = index + (1 if kind is BarKind.MEM64 else 0)
        if not 0 <= index <= last < cfg.BAR_COUNT:
            raise ValueError(f"{self.name}: BAR index {index} out of range for {kind.value}")
        if any(self.bars[slot] is not None for slot in range(index, last + 1)) or (
            index > 0 and (previous := self.bars[index - 1]) and previous.kind is BarKind.MEM64
        ):
            raise ValueError(f"{self.name}: BAR {index} is already in use")
        if kind is BarKind.IO and prefetchable:
            raise ValueError(f"{self.name}: an I/O BAR cannot be prefetchable")
        bar = PciBar(index, kind, size, region, prefetchable)
        self.bars[index] = bar
        register = bar.register
        if kind is BarKind.IO:
            self.config.set(register, 4, 0x1)
            self.config.set_writable(register, 4, ~(size - 1) & 0xFFFF_FFFC)
        else:
            flags = (0x4 if kind is BarKind.MEM64 else 0) | (0x8 if prefetchable else 0)
            self.config.set(register, 4, flags)
            self.config.set_writable(register, 4, ~(size - 1) & 0xFFFF_FFF0)
            if kind is BarKind.MEM64:
                self.config.set_writable(register + 4, 4, (~(size - 1) >> 32) & 0xFFFF_FFFF)
        return bar

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        writable_mask: bytes | None = None,
        on_write: CapabilityWriteHook | None = None,
    ) -> int:
        """Append a capability (id, next pointer, then `body`) to the list; returns its offset.

        `writable_mask` (same length as `body`) says which body bits the guest may change;
        `on_write` hears of every guest write touching the capability."""
        if writable_mask is not None and len(writable_mask) != len(body):
            raise ValueError(f"{self.name}: capability mask and body differ in length")
        if self.capabilities:
            last = self.capabilities[-1]
            offset = (last.offset + last.length + 3) & ~3
        else:
            offset = cfg.FIRST_CAPABILITY
        length = 2 + len(body)
        if offset + length > cfg.CONFIG_SPACE_SIZE:
            raise ValueError(f"{self.name}: no room for a {length}-byte capability")
        config = self.config
        config.set(offset, 1, cap_id)
        config.set(offset + 1, 1, 0)
        config.set_bytes(offset + 2, body)
        if writable_mask is not None:
            config.set_writable_bytes(offset + 2, writable_mask)
        if self.capabilities:
            config.set(self.capabilities[-1].offset + 1, 1, offset)
        else:
            config.set(cfg.CAPABILITY_LIST, 1, offset)
            config.set(cfg.STATUS, 2, config.get(cfg.STATUS, 2) | cfg.STATUS_CAPABILITIES)
        self.capabilities.append(PciCapability(cap_id, offset, length, on_write))
        return offset

    def config_read(self, offset: int, size: int) -> int:
        """Guest configuration read (override to compute fields on the fly, then call this)."""
        with self.lock:
            return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Guest configuration write: apply the masks, then react to what changed."""
        with self.lock:
            self._config_write(offset, size, value)

    def set_interrupt_status(self, asserted: bool) -> None:
        """Reflect the device's INTx state in the status register's interrupt bit."""
        with self.lock:
            status = self.config.get(cfg.STATUS, 2) & ~cfg.STATUS_INTERRUPT
            self.config.set(cfg.STATUS, 2, status | (cfg.STATUS_INTERRUPT if asserted else 0))

    def _config_write(self, offset: int, size: int, value: int) -> None:
        old_command = self.command
        old_bars = self.config.data[cfg.BAR0 : cfg.BAR0 + 4 * cfg.BAR_COUNT]
        if not self.config.write(offset, size, value):
            return
        new_command = self.command
        if new_command != old_command:
            self.command_changed(old_command, new_command)
        if new_command != old_command or (
            self.config.data[cfg.BAR0 : cfg.BAR0 + 4 * cfg.BAR_COUNT] != old_bars
        ):
            self.update_mappings()
        end = offset + size
        for capability in self.capabilities:
            low = max(offset, capability.offset)
            high = min(end, capability.offset + capability.length)
            if low < high and capability.on_write is not None:
                part = (value >> (8 * (low - offset))) & ((1 << (8 * (high - low))) - 1)
                capability.on_write(low - capability.offset, high - low, part)

    def save_state(self) -> dict[str, object]:
        """The configuration space as the guest left it (BAR addresses, command, capability
        bytes; the write masks are the model's own and come with it), and which of its mapped
        BARs wins where the guest made them overlap (`bar_precedence`, winner first)."""
        with self.lock:
            mapped = [bar for bar in self.bars if bar is not None and bar.mapped_at is not None]
            mapped.sort(key=lambda bar: -bar.region.rank)
            return {
                "config": bytes(self.config.data),
                "bar_precedence": [bar.index for bar in mapped],
            }

    def load_state(self, state: dict) -> None:
        """Take a saved configuration space and map the BARs where it says (the region tree
        moves, the listeners follow: memory slots, ioeventfds)."""
        config = bytes(state["config"])
        if len(config) != cfg.CONFIG_SPACE_SIZE:
            raise ValueError(f"a configuration space of {len(config)} bytes")
        with self.lock:
            self.config.data[:] = config
            with transactions.transaction():
                self.update_mappings()
                self._restore_bar_precedence(state.get("bar_precedence", ()))

    def _restore_bar_precedence(self, precedence) -> None:
        """Rank the mapped BARs as saved: each one re-placed where it is, winner first, so
        every later one yields to it (an overlap the guest made resolves as it did)."""
        for index in precedence:
            bar = self.bars[index] if 0 <= index < len(self.bars) else None
            if bar is not None and bar.mapped_at is not None:
                bar.region.move(bar.mapped_at, yielding=True)

    def command_changed(self, old: int, new: int) -> None:
        """Hook: the guest changed the command register (bus master, INTx disable, ...)."""

    def bar_address(self, index: int) -> int:
        """The address the guest (or allocator) programmed into BAR `index`."""
        bar = self.bars[index]
        if bar is None:
            raise ValueError(f"{self.name}: no BAR {index}")
        low = self.config.get(bar.register, 4)
        if bar.kind is BarKind.IO:
            return low & 0xFFFF_FFFC
        address = low & 0xFFFF_FFF0
        if bar.kind is BarKind.MEM64:
            address |= self.config.get(bar.register + 4, 4) << 32
        return address

    def program_bar(self, index: int, address: int) -> None:
        """Set BAR `index` as firmware would (the allocator uses this), then remap."""
        bar = self.bars[index]
        if bar is None:
            raise ValueError(f"{self.name}: no BAR {index}")
        if address % bar.size:
            raise ValueError(f"{self.name}: BAR {index} address {address:#x} is misaligned")
        flags = self.config.get(bar.register, 4) & (0x3 if bar.is_io else 0xF)
        self.config.set(bar.register, 4, (address & 0xFFFF_FFFF) | flags)
        if bar.kind is BarKind.MEM64:
            self.config.set(bar.register + 4, 4, address >> 32)
        self.update_mappings()

    def set_command_bits(self, bits: int) -> None:
        """Set command bits as firmware would (e.g. enable decoding), then remap."""
        old = self.command
        new = old | (bits & cfg.COMMAND_WRITABLE)
        if new != old:
            self.config.set(cfg.COMMAND, 2, new)
            self.command_changed(old, new)
            self.update_mappings()

    def decoded_address(self, bar: PciBar) -> int | None:
        """Where `bar` decodes now: None when its decode is disabled, its address invalid, or
        outside the host bridge's windows."""
        command = self.command
        enabled = command & (cfg.COMMAND_IO if bar.is_io else cfg.COMMAND_MEMORY)
        if not enabled:
            return None
        address = self.bar_address(bar.index)
        end = address + bar.size
        if bar.kind is BarKind.IO:
            valid = end <= 1 << 16
        else:
            # The all-ones sizing pattern (a BAR ending at the top of its range) stays unmapped.
            valid = end < (1 << 32 if bar.kind is BarKind.MEM32 else 1 << 64)
        if address == 0 or not valid or not self.bus.forwards(bar.is_io, address, bar.size):
            return None
        return address

    def update_mappings(self) -> None:
        """Place, move or hide each BAR's region to match the header (one rebuild).

        A BAR mapped (or mapped again) where another device's BAR already decodes loses there,
        and the BAR already there keeps working, doorbells included: the guest made the overlap,
        and what it had before stays as it was."""
        if self.bus is None:
            return
        with transactions.transaction():
            for bar in self.bars:
                if bar is None:
                    continue
                address = self.decoded_address(bar)
                if address == bar.mapped_at:
                    continue
                if address is None:
                    bar.region.disable()
                elif not bar.placed:
                    container = self.bus.io_region if bar.is_io else self.bus.memory_region
                    priority = self.bus.bar_priority
                    container.add_subregion(address, bar.region, priority, yielding=True)
                    bar.placed = True
                else:
                    bar.region.move(address, yielding=True)
                    bar.region.enable()
                bar.mapped_at = address
