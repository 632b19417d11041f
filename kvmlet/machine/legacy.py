"""The PC legacy devices a Linux guest expects, placed on the port I/O bus.

Four 16550A UARTs (COM1 carries the serial console), the i8042 (whose reset line stops the
machine), the CMOS RTC and the POST-code port. The PICs, the PIT, the IOAPIC and the local APICs
live in KVM (in-kernel irqchip and PIT); `reserve_in_kernel_devices` covers their ranges on the
bus (see kvmlet/devices/reserved.py). The PCI host bridge forwards only the layout's PCI
windows. On request, an isa-debug-exit port through which a test kernel ends the run with a
status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from kvmlet.boot.memory_map import IOAPIC_ADDRESS, LAPIC_ADDRESS, PCI_IO_WINDOW, MemoryMap
from kvmlet.bus import AccessSizes, AddressSpace, IoRegion
from kvmlet.bus.pci import PciHostBridge
from kvmlet.devices.debug_exit import REGION_SIZE as DEBUG_EXIT_SIZE
from kvmlet.devices.debug_exit import DebugExit
from kvmlet.devices.i8042 import REGION_SIZE as I8042_REGION_SIZE
from kvmlet.devices.i8042 import I8042Controller
from kvmlet.devices.irq import IrqLine
from kvmlet.devices.post import PostCodeSink
from kvmlet.devices.reserved import Reserved
from kvmlet.devices.rtc import CmosRtc
from kvmlet.devices.serial import LEGACY_SERIAL_PORTS, REGION_SIZE, Uart16550
from kvmlet.errors import KvmletError

I8042_PORT = 0x60
I8042_KEYBOARD_IRQ = 1
RTC_PORT = 0x70
POST_PORT = 0x80

IN_KERNEL_PRIORITY = 1
"""Above every other region: KVM answers these addresses before the bus could."""


class InKernelDevice(NamedTuple):
    """A range KVM serves itself: name, type, first port or address, size."""

    name: str
    type: str
    address: int
    size: int


IN_KERNEL_PORTS = (
    InKernelDevice("pic-master", "kvm-i8259", 0x20, 2),
    InKernelDevice("pit", "kvm-i8254", 0x40, 4),
    InKernelDevice("pit-speaker", "kvm-i8254-speaker", 0x61, 1),
    InKernelDevice("pic-slave", "kvm-i8259", 0xA0, 2),
    InKernelDevice("elcr", "kvm-i8259-elcr", 0x4D0, 2),
)
"""KVM_CREATE_IRQCHIP's PICs and ELCR, KVM_CREATE_PIT2's PIT and dummy speaker port."""

IN_KERNEL_MMIO = (
    InKernelDevice("ioapic", "kvm-ioapic", IOAPIC_ADDRESS, 0x100),
    InKernelDevice("lapic", "kvm-lapic", LAPIC_ADDRESS, 0x1000),
)
"""The in-kernel IOAPIC and the local APICs' page at its default base."""

_BYTE = AccessSizes(1, 1)
_ANY_WIDTH = AccessSizes(1, 4)
_AS_WRITTEN = AccessSizes(1, 4, unaligned=True)


class LegacyDevices:
    """The legacy devices of one machine, for the console wiring and the stats dump."""

    def __init__(
        self,
        uarts: list[Uart16550],
        i8042: I8042Controller,
        i8042_region: IoRegion,
        rtc: CmosRtc,
        post: PostCodeSink,
    ):
        self.uarts = uarts
        self.i8042 = i8042
        self._i8042_region = i8042_region
        self.rtc = rtc
        self.post = post

    def press_ctrl_alt_del(self) -> bool:
        """The host's shutdown request to the guest (see `I8042Controller.press_ctrl_alt_del`),
        under the lock the guest's accesses to the controller take."""
        with self._i8042_region.lock:
            return self.i8042.press_ctrl_alt_del()

    def describe(self) -> list[dict[str, object]]:
        """One entry per device: name, type and first port."""
        entries: list[dict[str, object]] = [
            {"name": port.name.lower(), "type": "uart-16550a", "port": port.base}
            for port in LEGACY_SERIAL_PORTS
        ]
        entries.append({"name": "i8042", "type": "i8042", "port": I8042_PORT})
        entries.append({"name": "cmos-rtc", "type": "mc146818-rtc", "port": RTC_PORT})
        entries += [
            {"name": device.name, "type": device.type, "port": device.address}
            for device in IN_KERNEL_PORTS
        ]
        entries += [
            {"name": device.name, "type": device.type, "mmio_base": device.address}
            for device in IN_KERNEL_MMIO
        ]
        return entries

    @property
    def console_uart(self) -> Uart16550:
        return self.uarts[0]

    def stats(self) -> dict[str, object]:
        return {
            "uarts": {
                port.name: {"tx_bytes": uart.transmitted_bytes, "rx_bytes": uart.received_bytes}
                for port, uart in zip(LEGACY_SERIAL_PORTS, self.uarts, strict=True)
            },
            "post_codes": self.post.writes,
        }


def attach_legacy_devices(
    io: AddressSpace,
    irq_line: Callable[[int], IrqLine],
    console_output: Callable[[bytes], None],
    on_reset: Callable[[], None],
    rtc_clock: Callable[[], float] = time.time,
) -> LegacyDevices:
    """Create the legacy devices and place them on `io`; COM1 writes to `console_output`,
    the RTC follows `rtc_clock` (UTC seconds)."""
    uarts = []
    with io.transaction():
        for index, port in enumerate(LEGACY_SERIAL_PORTS):
            output = console_output if index == 0 else _discard
            uart = Uart16550(irq_line(port.irq), output)
            region = IoRegion(
                port.name.lower(), REGION_SIZE, uart, valid=_BYTE, impl=_BYTE, lock=None
            )
            io.root.add_subregion(port.base, region)
            uarts.append(uart)
        i8042 = I8042Controller(on_reset, kbd_irq=irq_line(I8042_KEYBOARD_IRQ))
        # One region over 0x60-0x64: 0x61 (the PC speaker) is the in-kernel PIT's (reserved
        # above it); the device answers 0x62/0x63 with all-ones like an unassigned port.
        i8042_region = IoRegion("i8042", I8042_REGION_SIZE, i8042, impl=_BYTE)
        io.root.add_subregion(I8042_PORT, i8042_region)
        rtc = CmosRtc(rtc_clock)
        io.root.add_subregion(RTC_PORT, IoRegion("cmos-rtc", 2, rtc, impl=_BYTE))
        post = PostCodeSink()
        io.root.add_subregion(POST_PORT, IoRegion("post", 1, post, valid=_ANY_WIDTH))
    return LegacyDevices(uarts, i8042, i8042_region, rtc, post)


def reserve_in_kernel_devices(io: AddressSpace, mmio: AddressSpace) -> None:
    """Cover the ranges of KVM's in-kernel devices with `Reserved` regions, above the rest."""
    anything = AccessSizes(1, 8, unaligned=True)
    with io.transaction():
        for space, devices in ((io, IN_KERNEL_PORTS), (mmio, IN_KERNEL_MMIO)):
            for device in devices:
                region = IoRegion(
                    device.name, device.size, Reserved(), valid=anything, impl=anything, lock=None
                )
                space.root.add_subregion(device.address, region, IN_KERNEL_PRIORITY)


def attach_pci_host_bridge(
    io: AddressSpace, mmio: AddressSpace, memory_map: MemoryMap
) -> PciHostBridge:
    """The host bridge at 0xCF8, forwarding the PCI I/O window and `memory_map`'s MMIO ones."""
    return PciHostBridge(
        io,
        mmio,
        io_windows=[PCI_IO_WINDOW],
        memory_windows=memory_map.pci_memory_windows(),
    )


def _discard(data: bytes) -> None:
    """Output of the UARTs no console is attached to."""


def attach_debug_exit(io: AddressSpace, port: int, on_exit: Callable[[int, int], None]) -> None:
    """Place an isa-debug-exit port at `port` (4 ports wide, so an `outl` reaches it whole);
    `on_exit(value, status)` is called on each write. KvmletError if the ports are taken."""
    end = port + DEBUG_EXIT_SIZE
    for flat in io.view.assigned():
        if flat.start < end and port < flat.end:
            raise KvmletError(
                f"--debug-exit port {port:#x} overlaps {flat.region.name} at {flat.start:#x}"
            )
    region = IoRegion(
        "debug-exit", DEBUG_EXIT_SIZE, DebugExit(on_exit), valid=_AS_WRITTEN, impl=_AS_WRITTEN
    )
    io.root.add_subregion(port, region)
