"""kvmlet: a lightweight Linux KVM virtual machine monitor in pure Python.

The public API: `MachineConfig` and `DiskConfig` describe a machine, `with_default_guest` adds
kvmlet's own kernel and initramfs, `Machine` runs it, `sandbox` runs one command in a throwaway
machine; `GuestStop`/`StopReason` say how a guest ended; `KvmletError` is every user-facing error.
"""

__version__ = "0.1.0"

from kvmlet.api import with_default_guest
from kvmlet.errors import KvmletError
from kvmlet.machine.config import DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.machine.vcpu_loop import GuestStop, StopReason
from kvmlet.sandbox import SandboxResult, sandbox

__all__ = [
    "DiskConfig",
    "GuestStop",
    "KvmletError",
    "Machine",
    "MachineConfig",
    "SandboxResult",
    "StopReason",
    "__version__",
    "sandbox",
    "with_default_guest",
]
