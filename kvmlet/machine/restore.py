"""Restoring a snapshot: `Machine.restore(path)` and `kvmlet run --restore FILE`.

The file is opened and checked first (format/file.py: magic, version, checksums, length),
then what it asks of this host: the disks must be the images the snapshot saw (size,
modification time, inode; `force` overrides), this KVM must offer every CPU feature the
guest was shown, with the same vendor. The machine is then rebuilt from the saved
configuration the way `Machine(config)` builds one, with three differences (machine.py asks
this module at those points):

- guest RAM is the file's, mapped copy-on-write (snapshot/ram.py), or copied into memfds when
  the snapshot's RAM was shareable (a vhost-user backend maps it);
- no kernel is loaded, no vCPU is set up for a boot;
- once built, `apply` re-adds the user's devices as they were placed, writes the VM's chips,
  loads every device's state (the registry), then every vCPU's, and keeps the frozen kvmclock
  for `start()` to put back, so the guest's clock goes on from the snapshot.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kvmlet.errors import KvmletError
from kvmlet.machine.config import DeviceConfig, MachineConfig
from kvmlet.machine.snapshot import state_owners
from kvmlet.memory import GuestMemory
from kvmlet.snapshot import ram
from kvmlet.snapshot.format import SnapshotFile
from kvmlet.snapshot.registry import load_states
from kvmlet.virtio.blk_io import file_identity
from kvmlet.vstate.clock import FrozenClock
from kvmlet.vstate.cpu import build_cpuid, supported_cpuid
from kvmlet.vstate.vcpu_state import (
    check_cpu_compatible,
    cpuid_entries,
    restore_vcpu,
    vcpu_capabilities,
)
from kvmlet.vstate.vm_state import restore_vm

if TYPE_CHECKING:
    from kvmlet.machine.machine import Machine


IDENTITY = ("size", "mtime_ns", "inode", "device")


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Where the state document is read: a value that is missing or of the wrong kind is a
    damaged file (its checksum held: made by hand, or by a kvmlet of another format)."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise KvmletError(
            f"{path}: its state does not fit this kvmlet ({type(error).__name__}: {error})"
        ) from None


def check_disks(disks: list[dict[str, Any]], force: bool) -> None:
    """KvmletError unless every disk is the image the snapshot saw (or `force`)."""
    for disk in disks:
        path = disk["path"]
        try:
            now = file_identity(path)
        except OSError as error:
            raise KvmletError(f"the snapshot's disk {path}: {error.strerror}") from None
        changed = [
            name for name in ("size", "mtime_ns", "inode", "device") if now[name] != disk[name]
        ]
        if changed and not force:
            raise KvmletError(
                f"the snapshot's disk {path} changed since it was taken ({', '.join(changed)}"
                "): the guest's view of it would not match; --force restores anyway"
            )


class Restoring:
    """A snapshot file being restored into the machine being built from it."""

    def __init__(self, file: SnapshotFile, verify: bool):
        self.file = file
        self.state = file.state
        self.verify = verify
        self.backings: dict[int, tuple[int, int]] = {}

    @property
    def cmdline(self) -> str:
        with reading(self.file.path):
            return str(self.state["cmdline"])

    def memory(self, machine: Machine) -> GuestMemory:
        """Guest RAM from the file, once this host is known to run the guest."""
        with reading(self.file.path):
            return self._memory(machine)

    def _memory(self, machine: Machine) -> GuestMemory:
        self._check_cpu(machine)
        banks = self.state["ram"]["banks"]
        layout = machine.memory_map.ram_banks()
        if [(bank["base"], bank["size"]) for bank in banks] != layout:
            raise KvmletError(f"{self.file.path}: its RAM layout does not fit its memory size")
        area = (self.file.ram_offset, self.file.ram_offset + self.file.ram_size)
        for bank in banks:
            if bank["offset"] % ram.PAGE or not (
                area[0] <= bank["offset"] and bank["offset"] + bank["size"] <= area[1]
            ):
                raise KvmletError(f"{self.file.path}: damaged RAM layout")
            if self.verify:
                try:
                    ram.verify_bank(self.file.fd, bank["offset"], bank["size"], bank["checksums"])
                except KvmletError as error:
                    raise KvmletError(f"{self.file.path}: {error}") from None
        if self.state["ram"]["shareable"]:
            memory = GuestMemory.memfd(layout)
            try:
                for bank, saved in zip(memory, banks, strict=True):
                    ram.load_bank(self.file.fd, saved["offset"], bank)
            except BaseException:
                memory.close()
                raise
            return memory
        mapped = []
        backing = os.dup(self.file.fd)  # the machine's own: a later snapshot reads its extents
        machine._closers.append(lambda: os.close(backing))
        try:
            for bank in banks:
                mapped.append(
                    ram.map_bank(self.file.fd, bank["offset"], bank["base"], bank["size"])
                )
                self.backings[bank["base"]] = (backing, bank["offset"])
        except BaseException:
            GuestMemory(mapped).close()
            raise
        return GuestMemory(mapped)

    def _check_cpu(self, machine: Machine) -> None:
        saved = cpuid_entries(self.state["vcpus"][0]["cpuid"])
        offered = build_cpuid(
            supported_cpuid(machine.kvm), 0, machine.config.cpus, machine.profile.cpuid_masks
        )
        try:
            check_cpu_compatible(saved, offered)
        except KvmletError as error:
            raise KvmletError(f"{self.file.path}: {error}") from None

    def apply(self, machine: Machine) -> None:
        """Everything but RAM, into the machine just built (its vCPUs not started)."""
        with reading(self.file.path):
            self._apply(machine)

    def _apply(self, machine: Machine) -> None:
        state = self.state
        for spec in state["placed_devices"]:
            machine.add_device(_device_config(spec))
        restore_vm(machine.vm, state["vm"])
        load_states(state_owners(machine), state["devices"])
        capabilities = vcpu_capabilities(machine.kvm)
        saved_vcpus = state["vcpus"]
        if len(saved_vcpus) != len(machine.vcpus):
            raise KvmletError(f"{self.file.path}: it has {len(saved_vcpus)} vCPUs' states")
        for vcpu, saved in zip(machine.vcpus, saved_vcpus, strict=True):
            restore_vcpu(vcpu, saved, capabilities)
        clock = state["vm"]["clock"]
        machine._restored_clock = None if clock is None else FrozenClock(int(clock), True)

    def close(self) -> None:
        self.file.close()


def _device_config(spec: dict[str, Any]) -> DeviceConfig:
    return DeviceConfig(
        spec["model"],
        spec["at"],
        spec["address"],
        spec["irq"],
        spec["slot"],
        spec["name"],
        tuple(spec["options"].items()),
    )


def open_snapshot(
    path: str, *, force: bool = False, verify: bool = False, **changes: Any
) -> tuple[MachineConfig, Restoring]:
    """The configuration to rebuild and what to restore into it; `changes` are the run's own
    options (debug_io, host_profile...). KvmletError (one line) for a file that cannot be
    read or disks that changed."""
    file = SnapshotFile(path)
    try:
        state = file.state
        with reading(path):
            config = MachineConfig.from_document(state["machine"], **changes)
            check_disks(state["disks"], force)
        return config, Restoring(file, verify)
    except BaseException:
        file.close()
        raise
