"""Restoring a snapshot: `Machine.restore(path)` and `kvmlet run --restore FILE`.

The file is opened and checked first (format/file.py: magic, version, checksums, length),
then its devices (`check_restorable`: none whose state lives outside kvmlet), then what it
asks of this host: the disks must be the images the snapshot saw (size,
modification time, inode; `force` overrides), this KVM must offer every CPU feature the
guest was shown, with the same vendor. The machine is then rebuilt from the saved
configuration the way `Machine(config)` builds one, with three differences (machine.py asks
this module at those points):

- guest RAM is the file's, mapped copy-on-write (snapshot/ram.py), unless the rebuilt
  machine needs shareable RAM (`shareable_memory`: a vhost-user backend maps guest RAM
  itself, and cannot map a private mapping of the file): then the file's data is copied
  into fresh memfds, its holes left unallocated, and each backend gets those memfds in
  SET_MEM_TABLE and its rings from the saved positions (SET_VRING_BASE) when its device's
  state is loaded (vhost/device.py);
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
from kvmlet.machine.vhost_config import shareable_memory
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


def restored_ram(fd: int, banks: list[dict[str, Any]], in_memfds: bool) -> GuestMemory:
    """Guest RAM from the snapshot file `fd`'s banks (checked): copied into fresh memfds
    (`in_memfds`; holes stay unallocated), or the file mapped copy-on-write."""
    if in_memfds:
        memory = GuestMemory.memfd([(bank["base"], bank["size"]) for bank in banks])
        try:
            for bank, saved in zip(memory, banks, strict=True):
                ram.load_bank(fd, saved["offset"], bank)
        except BaseException:
            memory.close()
            raise
        return memory
    mapped = []
    try:
        for bank in banks:
            mapped.append(ram.map_bank(fd, bank["offset"], bank["base"], bank["size"]))
    except BaseException:
        GuestMemory(mapped).close()
        raise
    return GuestMemory(mapped)


def check_restorable(config: MachineConfig) -> None:
    """KvmletError (one line), before anything is built or started, for devices whose state
    lives outside kvmlet (a snapshot refuses them too: vhost/device.py RING_STATE_ONLY)."""
    if config.filesystems:
        raise KvmletError(
            f"the snapshot has a virtiofs share ({config.filesystems[0].tag!r}): its FUSE "
            "session lives in virtiofsd and cannot be restored"
        )
    if config.vsock_cid is not None:
        raise KvmletError(
            "the snapshot has a vsock device: its connections live in the host kernel and "
            "cannot be restored"
        )


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
        # What the rebuilt machine needs decides, not what the snapshotted one had.
        memory = restored_ram(self.file.fd, banks, shareable_memory(machine.config))
        if not memory.shareable:
            backing = os.dup(self.file.fd)  # the machine's own: a later snapshot reads it
            machine._closers.append(lambda: os.close(backing))
            self.backings = {bank["base"]: (backing, bank["offset"]) for bank in banks}
        return memory

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
        check_restorable(config)
        with reading(path):
            check_disks(state["disks"], force)
        return config, Restoring(file, verify)
    except BaseException:
        file.close()
        raise
