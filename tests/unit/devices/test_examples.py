"""The devices of examples/, loaded as a user's command line loads them, in test contexts."""

from __future__ import annotations

import hashlib
import time
import zlib
from pathlib import Path

import pytest

from kvmlet.bus import mmio_space, port_io_space
from kvmlet.bus.pci import BarAllocator, PciHostBridge, PciWindow
from kvmlet.devices import DeviceContext, test_context
from kvmlet.devices.irq import RecordingIrqLine
from kvmlet.devices.loading import load_factory
from kvmlet.memory import GuestMemory

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def example(spec: str):
    return load_factory(f"{EXAMPLES}/{spec}")


# -- the mailbox (also docs/devices.md's) ------------------------------------------------------


def test_mailbox_crc_only_leaves_the_buffer_and_refuses_a_second_job_while_busy():
    context = DeviceContext("mailbox", GuestMemory.anonymous([(0, 1 << 16)]))
    mailbox = example("mailbox_device.py:Mailbox")(context)
    context.memory.write(0x100, b"abc")
    mailbox.write(0x04, 4, 0x100)
    mailbox.write(0x08, 4, 3)
    mailbox.write(0x0C, 4, 1)  # no worker thread yet: the job waits, BUSY
    mailbox.write(0x0C, 4, 2)  # refused while BUSY
    assert mailbox.read(0x10, 4) == 1 and mailbox.worker.submitted == 1
    context.start()
    assert mailbox.worker.drain()
    assert mailbox.read(0x10, 4) == 2 and mailbox.read(0x14, 4) == zlib.crc32(b"abc")
    assert context.memory.read(0x100, 3) == b"abc"
    context.close()


@pytest.mark.parametrize(("command", "length"), [(3, 4), (1, (1 << 20) + 1)])
def test_mailbox_refuses_unknown_commands_and_huge_buffers(command, length):
    context = test_context("mailbox")
    mailbox = example("mailbox_device.py:Mailbox")(context)
    mailbox.write(0x08, 4, length)
    mailbox.write(0x0C, 4, command)
    assert mailbox.read(0x10, 4) == 4 and context.irq.level  # ERROR


# -- the watchdog ------------------------------------------------------------------------------


def watchdog(timeout_ms: str, threaded: bool = False):
    if threaded:
        context = DeviceContext("watchdog", None, irq=RecordingIrqLine())
        context.start()
    else:
        context = test_context("watchdog")
    return example("watchdog.py:Watchdog")(context, timeout_ms=timeout_ms), context


def test_watchdog_expires_without_kicks_and_the_guest_clears_it():
    device, context = watchdog("20")
    started = time.monotonic()
    device.write(0x0, 4, 1)  # enable: the inline worker waits out the timeout right here
    assert time.monotonic() - started >= 0.02
    assert device.read(0xC, 2) == 1 and device.read(0xE, 2) == 1 and context.irq.level
    device.write(0xC, 2, 1)
    assert device.read(0xC, 2) == 0 and not context.irq.level


def test_watchdog_kicked_in_time_never_expires_and_disabled_never_fires():
    device, context = watchdog("150", threaded=True)
    device.write(0x0, 4, 1)
    for _ in range(6):
        time.sleep(0.05)
        device.write(0x8, 4, 0)  # kick
    assert device.read(0xE, 2) == 0
    device.write(0x0, 4, 0)  # disable
    time.sleep(0.25)
    assert device.read(0xE, 2) == 0 and context.irq.history == []
    device.write(0x0, 4, 1)
    time.sleep(0.3)
    assert device.read(0xE, 2) == 1 and context.irq.history == [True]
    context.close()


# -- the PCI digest ----------------------------------------------------------------------------


def test_pci_digest_hashes_guest_memory_and_interrupts():
    context = test_context("pcidigest")
    device = example("pci_digest.py:PciDigest")(context)
    io, mmio = port_io_space(), mmio_space()
    PciHostBridge(io, mmio).attach(device, slot=1)
    windows = PciWindow("io", 0x1000, 0x100), PciWindow("m", 0xC000_0000, 1 << 20)
    BarAllocator(*windows).assign(device)
    bar = device.bar_address(0)
    context.memory.write(0x2000, b"digest me")
    mmio.write(bar + 0x00, 8, 0x2000)
    mmio.write(bar + 0x08, 4, 9)
    mmio.write(bar + 0x10, 8, 0x3000)
    mmio.write(bar + 0x0C, 4, 1)
    assert mmio.read(bar + 0x18, 4) == 2
    assert context.memory.read(0x3000, 32) == hashlib.sha256(b"digest me").digest()
    assert context.irq.level
    mmio.write(bar + 0x18, 4, 2)
    assert not context.irq.level
    mmio.write(bar + 0x10, 8, 0xFFFF_FFF0)  # a digest address outside RAM: ERROR
    mmio.write(bar + 0x0C, 4, 1)
    assert mmio.read(bar + 0x18, 4) == 4
