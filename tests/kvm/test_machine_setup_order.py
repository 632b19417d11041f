"""How a machine sets up KVM and guest RAM, where the order or the advice costs set-up time.

It registers its RAM slots before it creates the in-kernel irqchip: both orders are valid KVM;
on the software KVM of our machines a memory slot added once the irqchip exists costs 5-10 ms
(KVM_SET_USER_MEMORY_REGION for 256 MiB), before it 0.2 ms. It asks for transparent huge pages
under guest RAM: loading a 9 MiB kernel then faults 2 MiB at a time.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvmlet.host.console import Console
from kvmlet.kvm import Vm
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.machine.virtio_devices import VirtioDevices
from kvmlet.vstate.vcpu_loop import StopReason

pytestmark = pytest.mark.kvm


def test_ram_slots_come_before_the_irqchip_and_the_guest_still_runs(monkeypatch):
    calls: list[str] = []

    def recorded(name: str):
        original = getattr(Vm, name)

        def record(self, *arguments, **keywords):
            calls.append(name)
            return original(self, *arguments, **keywords)

        return record

    for name in ("add_memory", "create_irqchip", "create_vcpu"):
        monkeypatch.setattr(Vm, name, recorded(name))
    # mov al, 0x2a ; out 0x80, al ; mov al, 0xfe ; out 0x64, al (an i8042 reset)
    code = bytes.fromhex("b02a e680 b0fe e664")
    config = MachineConfig(boot_code=code, host_profile="none", rng=False)
    with Machine(config) as machine:
        assert calls.index("create_irqchip") > calls.index("add_memory")
        assert calls.index("create_vcpu") > calls.index("create_irqchip")
        stop = machine.wait(timeout=10)
    assert stop.reason is StopReason.RESET
    assert machine.legacy.post.last_code == 0x2A


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that starts at `address` (from smaps)."""
    current = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) == address
            elif current and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping starts at {address:#x}")


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="no THP in this kernel"
)
def test_guest_ram_asks_for_transparent_huge_pages():
    config = MachineConfig(boot_code=bytes.fromhex("f4"), host_profile="none", rng=False)
    machine = Machine(config)
    try:
        assert all("hg" in vm_flags(bank.host_address()) for bank in machine.memory)
    finally:
        machine.close()


def test_the_vcpus_run_before_the_workers_and_the_console_threads_start(monkeypatch):
    """Each thread start waits for the new thread to be scheduled: the guest's first
    instruction must not wait for threads it does not need yet."""
    seen: dict[str, float | None] = {}

    def starting(name: str, owner):
        original = owner.start

        def start(self, *arguments):
            deadline = time.monotonic() + 5
            while machine.first_run_at is None and time.monotonic() < deadline:
                time.sleep(0.001)
            seen[name] = machine.first_run_at
            return original(self, *arguments)

        monkeypatch.setattr(owner, "start", start)

    starting("workers", VirtioDevices)
    starting("console", Console)
    config = MachineConfig(boot_code=bytes.fromhex("fa f4"), host_profile="none")
    echo = os.open(os.devnull, os.O_WRONLY)
    threads = len(threading.enumerate())
    machine = Machine(config, console_echo_fd=echo)
    try:
        assert len(threading.enumerate()) == threads, "a thread started with the build"
        machine.start()
        assert seen.keys() == {"workers", "console"}
        assert all(first_run is not None for first_run in seen.values()), seen
    finally:
        machine.close()
        os.close(echo)
