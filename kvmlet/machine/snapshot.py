"""Taking a snapshot of a running machine: `Machine.snapshot(path, then=...)`.

The machine is paused (the control API's pause: vCPUs outside KVM_RUN at an instruction
boundary, the queue worker idle, kvmclock frozen), the user's devices' jobs drained and the
disk images flushed; then the state is gathered (kvmlet/snapshot/format.py has the file):

- the header: format and kvmlet versions, the host's CPU (vendor, signature), kernel and host
  profile, the configuration to rebuild the machine from, the disks' identities, the user's
  devices as placed, the kernel command line;
- the VM (vstate/vm_state.py) and every vCPU (vstate/vcpu_state.py);
- every device, each saving itself: the wiring modules name their parts (`state_owners`)
  and kvmlet/snapshot/registry.py walks them;
- guest RAM, bank by bank, without its zero pages (kvmlet/snapshot/ram.py).

Then, as asked: "resume" lets the guest go on before the file is flushed to disk (the guest
waits for the copy into the page cache only), "pause" keeps it paused, "stop" stops it once
the file is safely in place. The file is renamed into place only when complete.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from kvmlet import __version__
from kvmlet.errors import KvmletError
from kvmlet.kvm.ioctls import KVM_API_VERSION
from kvmlet.snapshot import ram
from kvmlet.snapshot.format import FORMAT_VERSION, SnapshotWriter
from kvmlet.snapshot.registry import save_states
from kvmlet.vstate.cpu import supported_cpuid
from kvmlet.vstate.vcpu_loop import StopReason
from kvmlet.vstate.vcpu_state import cpu_signature, save_vcpu, vcpu_capabilities
from kvmlet.vstate.vm_state import save_vm

if TYPE_CHECKING:
    from kvmlet.machine.machine import Machine

THEN = ("resume", "pause", "stop")
"""What a machine does once its snapshot is taken."""
DRAIN_TIMEOUT = 5.0
"""Seconds the user's devices get to finish their jobs before a snapshot is refused."""


class SnapshotResult(NamedTuple):
    """What `Machine.snapshot` did: the file, its size and the RAM written into it, how long
    it took and how long the guest was held for it, and the machine's state afterwards."""

    path: str
    file_bytes: int
    ram_bytes: int
    seconds: float
    paused_seconds: float
    state: str


def state_owners(machine: Machine) -> dict[str, Any]:
    """Every part of the machine that saves its own state, by name."""
    owners: dict[str, Any] = dict(machine.legacy.state_owners())
    owners["pci"] = machine.pci
    owners.update(machine.virtio.state_owners())
    if machine._devices is not None:
        owners.update(machine._devices.state_owners())
    return owners


def machine_state(machine: Machine) -> dict[str, Any]:
    """The whole state document of a paused machine but its RAM layout."""
    kvm = machine.kvm
    capabilities = vcpu_capabilities(kvm)
    frozen = machine._frozen_clock
    devices = machine._devices
    return {
        "format": FORMAT_VERSION,
        "kvmlet": __version__,
        "created": time.time(),
        "host": {
            "cpu": cpu_signature(supported_cpuid(kvm)),
            "kernel": os.uname().release,
            "kvm_api": KVM_API_VERSION,
            "host_profile": machine.profile.name,
        },
        "machine": machine.config.to_document(),
        "cmdline": machine.cmdline,
        "disks": machine.virtio.disks(),
        "placed_devices": [] if devices is None else [placed.spec() for placed in devices],
        "vm": save_vm(machine.vm, None if frozen is None else frozen.nanoseconds),
        "vcpus": [save_vcpu(vcpu, capabilities) for vcpu in machine.vcpus],
        "devices": save_states(state_owners(machine)),
    }


def take_snapshot(machine: Machine, path: str, then: str = "resume") -> SnapshotResult:
    """See the module docstring. KvmletError (one line) when the machine is not running or
    paused, a part of it cannot be saved, or the file cannot be written; the machine is then
    left as it was (running, or paused if it was)."""
    if then not in THEN:
        raise KvmletError(f"after a snapshot the machine can {', '.join(THEN)}, not {then!r}")
    started = time.monotonic()
    was_paused = machine.paused_at is not None
    machine.pause()
    held = time.monotonic()
    writer = None
    try:
        if machine._devices is not None:
            machine._devices.drain(DRAIN_TIMEOUT)
        state = machine_state(machine)
        writer = SnapshotWriter(path, [bank.size for bank in machine.memory])
        banks, written = [], 0
        for bank, offset in zip(machine.memory, writer.bank_offsets, strict=True):
            checksums, count = ram.save_bank(
                writer.fd, offset, bank, machine.ram_backings.get(bank.base)
            )
            written += count
            banks.append({"base": bank.base, "size": bank.size, "offset": offset})
            banks[-1]["checksums"] = checksums
        state["ram"] = {"shareable": machine.memory.shareable, "banks": banks}
        size = writer.finish(state)
        if then == "stop":
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        if not was_paused:
            machine.resume()
        raise
    paused_seconds = time.monotonic() - held
    if then == "resume":
        machine.resume()
    elif then == "stop":
        machine.stop(StopReason.HOST_QUIT, "stopped after its snapshot")
    if then != "stop":
        try:
            writer.commit()
        except KvmletError:
            writer.abort()
            raise
    return SnapshotResult(
        writer.path,
        size,
        written,
        time.monotonic() - started,
        paused_seconds,
        "stopped" if then == "stop" else machine.state,
    )
