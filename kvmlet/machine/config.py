"""What a user asks of a machine: kernel, memory, CPUs, disks, console; and the kernel
command line kvmlet builds from it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from kvmlet.errors import KvmletError
from kvmlet.machine.boot import BOOT_METHODS, BootMethod
from kvmlet.machine.memory_map import MiB

MAX_CPUS = 64
BOOT_CODE_ADDRESS = 0x10000
DEFAULT_MEMORY = 256 * MiB

BASE_KERNEL_PARAMETERS = (
    "reboot=k",  # reboot through the i8042: the monitor stops on its reset line
    "panic=-1",  # a panicking guest reboots at once, so the run ends instead of hanging
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=4",
)
"""kvmlet's own kernel parameters; `-p` adds to them (later parameters win in Linux)."""

FilePath = str | os.PathLike
"""A file name as `open()` takes it: `str` or `pathlib.Path` (kvmlet never needs pathlib's
methods, so the CLI passes strings and does not import it)."""
ConsoleKind = Literal["serial", "virtio"]
Transport = Literal["pci", "mmio"]


@dataclass(frozen=True)
class DiskConfig:
    """A raw disk image given to the guest as a virtio-blk device."""

    path: FilePath
    read_only: bool = False
    direct: bool = False


@dataclass(frozen=True)
class MachineConfig:
    """Everything that defines one run.

    `kernel=None` means kvmlet's default guest (see `kvmlet.api.with_default_guest`);
    `boot_code` instead of a kernel runs raw real-mode code from `BOOT_CODE_ADDRESS` (tests,
    benchmarks, firmware experiments).
    """

    kernel: FilePath | None = None
    boot_code: bytes | None = None
    initrd: FilePath | None = None
    params: str = ""
    memory: int = DEFAULT_MEMORY
    cpus: int = 1
    disks: tuple[DiskConfig, ...] = ()
    console: ConsoleKind = "serial"
    virtio_transport: Transport = "pci"
    rng: bool = True
    boot_method: BootMethod = "auto"
    host_profile: str = "auto"
    debug_io: bool = False
    extra_parameters: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= MAX_CPUS:
            raise KvmletError(f"--cpus must be between 1 and {MAX_CPUS}, not {self.cpus}")
        if self.console not in ("serial", "virtio"):
            raise KvmletError(f"unknown console {self.console!r}: use serial or virtio")
        if self.virtio_transport not in ("pci", "mmio"):
            raise KvmletError(f"unknown virtio transport {self.virtio_transport!r}: pci or mmio")
        if self.boot_method not in BOOT_METHODS:
            raise KvmletError(f"unknown boot method {self.boot_method!r}")
        for text in (self.params, *self.extra_parameters):
            _check_kernel_parameters(text)

    def kernel_command_line(self, device_parameters: list[str], profile_parameters: str) -> str:
        """kvmlet's parameters, then devices', the host profile's, and the user's last."""
        console = "console=hvc0" if self.console == "virtio" else "console=ttyS0"
        parts = [
            console,
            *BASE_KERNEL_PARAMETERS,
            *device_parameters,
            profile_parameters,
            *self.extra_parameters,
            self.params,
        ]
        return " ".join(part for part in parts if part)


def _check_kernel_parameters(text: str) -> None:
    """Kernel parameters are UTF-8 text without NUL (which would end the command line early);
    a byte that is not UTF-8 reaches us from argv as a lone surrogate."""
    try:
        text.encode()
    except UnicodeEncodeError as error:
        bad = text[error.start : error.end].encode(errors="surrogateescape")
        raise KvmletError(f"kernel parameters must be UTF-8 text, not {bad!r}") from None
    if "\0" in text:
        raise KvmletError("kernel parameters cannot contain a NUL character")
