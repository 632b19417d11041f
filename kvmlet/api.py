"""The public Python API in one place: build a configuration, run a machine, run a command.

import kvmlet
config = kvmlet.with_default_guest(kvmlet.MachineConfig(memory=512 << 20, cpus=2))
with kvmlet.Machine(config) as machine:
    machine.console.wait_for("kvmlet-guest: ready", timeout=30)
    machine.console.write("echo hello\\n")
    machine.console.wait_for("hello", timeout=10)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from kvmlet.machine.config import MachineConfig

if TYPE_CHECKING:
    from kvmlet.guest import Progress


def with_default_guest(
    config: MachineConfig | None = None, progress: Progress | None = None
) -> MachineConfig:
    """`config` with kvmlet's default guest kernel (ELF) and initramfs where it names no
    kernel; builds the default guest first if it is not cached (minutes, once)."""
    config = config or MachineConfig()
    if config.kernel is not None:
        return config
    from kvmlet.guest import ensure_default_guest  # the build machinery, only when needed

    guest = ensure_default_guest(progress=progress)
    return replace(config, kernel=guest.vmlinux, initrd=config.initrd or guest.initrd)
