"""kvmlet: a lightweight Linux KVM virtual machine monitor in pure Python.

The public API: `MachineConfig`, `DiskConfig`, `NetConfig` and `DeviceConfig` describe a
machine (`FilesystemConfig` a host directory shared over virtiofs, `VhostUserDiskConfig` a disk
a vhost-user backend serves), `with_default_guest` adds kvmlet's own kernel and initramfs,
`Machine` runs it (and takes watchpoints: a callback returns `BREAK` to pause it), `sandbox`
runs one command in a throwaway machine; `GuestStop`/`StopReason` say how a guest ended;
`KvmletError` is every user-facing error (`GuestStoppedError`, one of them, carries the
`GuestStop` of a guest that stopped too soon).
Device models are written with `kvmlet.devices` (docs/devices.md). `connect` reaches a running
machine's control API (`kvmlet.api`), `serve` gives one to a `Machine` of your own.
The names load on first use, so `kvmlet --version` or a CLI error costs no import of the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "BREAK": "kvmlet.machine.watchpoints",
    "DeviceConfig": "kvmlet.machine.config",
    "DiskConfig": "kvmlet.virtio.blk_config",
    "FilesystemConfig": "kvmlet.machine.vhost_config",
    "VhostUserDiskConfig": "kvmlet.machine.vhost_config",
    "connect": "kvmlet.api.client",
    "serve": "kvmlet.api.server",
    "GuestStop": "kvmlet.vstate.vcpu_loop",
    "GuestStoppedError": "kvmlet.errors",
    "KvmletError": "kvmlet.errors",
    "Machine": "kvmlet.machine.machine",
    "MachineConfig": "kvmlet.machine.config",
    "NetConfig": "kvmlet.virtio.net.option",
    "SandboxResult": "kvmlet.sandboxing",
    "StopReason": "kvmlet.vstate.vcpu_loop",
    "sandbox": "kvmlet.sandboxing",
    "with_default_guest": "kvmlet.machine.config",
}

__all__ = [
    "BREAK",
    "DeviceConfig",
    "DiskConfig",
    "FilesystemConfig",
    "GuestStop",
    "GuestStoppedError",
    "KvmletError",
    "Machine",
    "MachineConfig",
    "NetConfig",
    "SandboxResult",
    "StopReason",
    "VhostUserDiskConfig",
    "__version__",
    "connect",
    "sandbox",
    "serve",
    "with_default_guest",
]

if TYPE_CHECKING:
    from kvmlet.api.client import connect
    from kvmlet.api.server import serve
    from kvmlet.errors import GuestStoppedError, KvmletError
    from kvmlet.machine.config import DeviceConfig, DiskConfig, MachineConfig, with_default_guest
    from kvmlet.machine.machine import Machine
    from kvmlet.machine.vhost_config import FilesystemConfig, VhostUserDiskConfig
    from kvmlet.machine.watchpoints import BREAK
    from kvmlet.sandboxing import SandboxResult, sandbox
    from kvmlet.virtio.net.option import NetConfig
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kvmlet' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
