"""What a user asks of a machine: kernel, memory, CPUs, disks, console, devices of their own;
and the kernel command line kvmlet builds from it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from kvmlet.boot import BOOT_METHODS, BootMethod, BootModule
from kvmlet.boot.memory_map import PORT_IO_END, MiB
from kvmlet.errors import KvmletError
from kvmlet.virtio.blk_config import DiskConfig

if TYPE_CHECKING:
    from kvmlet.guest import Progress
    from kvmlet.machine.vhost_config import FilesystemConfig, MemoryBackend, VhostUserDiskConfig
    from kvmlet.virtio.net.option import NetConfig

MAX_CPUS = 64
BOOT_CODE_ADDRESS = 0x10000
DEFAULT_MEMORY = 256 * MiB

BASE_KERNEL_PARAMETERS = (
    "reboot=k",  # reboot through the i8042: the monitor stops on its reset line
    "panic=-1",  # a panicking guest reboots at once, so the run ends instead of hanging
    "acpi=off",  # kvmlet gives no ACPI tables (the MP table describes the CPUs and IRQs)
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
Placement = Literal["port", "mmio", "pci"]
PLACEMENTS: tuple[Placement, ...] = ("port", "mmio", "pci")


class DeviceConfig(NamedTuple):
    """A device model of the user's own, placed at a port range, an MMIO range or on PCI.

    `model` is the factory (called with a `DeviceContext` and `options` as keyword
    arguments) or its name, "module:Name" or "path/file.py:Name" (what a recording keeps).
    `address` is the first port or the physical address (port and mmio); `irq` the interrupt
    line of a port or MMIO device (None: it has none); `slot` the PCI slot (None: the first
    free one); `name` names its region and context (default: the factory's name)."""

    model: Callable[..., Any] | str
    at: Placement
    address: int | None = None
    irq: int | None = None
    slot: int | None = None
    name: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def port(cls, model, address: int, *, irq=None, name=None, **options: str) -> DeviceConfig:
        return cls(model, "port", address, irq, None, name, tuple(options.items()))

    @classmethod
    def mmio(cls, model, address: int, *, irq=None, name=None, **options: str) -> DeviceConfig:
        return cls(model, "mmio", address, irq, None, name, tuple(options.items()))

    @classmethod
    def pci(cls, model, *, slot=None, name=None, **options: str) -> DeviceConfig:
        return cls(model, "pci", None, None, slot, name, tuple(options.items()))

    def check(self) -> None:
        """KvmletError (one line) for a placement that cannot be right."""
        if self.at not in PLACEMENTS:
            raise KvmletError(f"device placement {self.at!r}: use port, mmio or pci")
        if self.at != "pci" and self.address is None:
            raise KvmletError(f"a {self.at} device needs an address ({self.at}=ADDRESS)")
        if self.at == "port" and not 0 <= self.address < PORT_IO_END:
            raise KvmletError(f"port {self.address:#x} is beyond the 64 KiB port space")
        if self.at == "mmio" and not 0 <= self.address < 1 << 52:
            raise KvmletError(f"MMIO address {self.address:#x} is beyond physical memory")
        if self.at == "pci" and (self.irq is not None or self.address is not None):
            raise KvmletError("a PCI device gets its address and interrupt from the bus")
        if self.slot is not None and not 1 <= self.slot < 32:
            raise KvmletError(f"PCI slot {self.slot} is not 1-31 (slot 0 is the host bridge)")


def parse_device_option(text: str) -> DeviceConfig:
    """`--device MODEL,port=ADDR[,irq=N]`, `MODEL,mmio=ADDR[,irq=N]` or `MODEL,pci[=SLOT]`,
    with `name=NAME` and any `key=value` options for the model."""
    model, *words = text.split(",")
    if not model or ":" not in model:
        raise KvmletError(f"--device {text!r}: start with the model, module:Name or file.py:Name")
    at: Placement | None = None
    numbers: dict[str, int | None] = {"address": None, "irq": None, "slot": None}
    name = None
    options = []
    for word in words:
        key, has_value, value = word.partition("=")
        if key in PLACEMENTS:
            if at is not None:
                raise KvmletError(f"--device {text!r}: give one of port=, mmio= or pci")
            at = key  # type: ignore[assignment]
            if key == "pci":
                numbers["slot"] = _number(value, text) if has_value else None
            else:
                numbers["address"] = _number(value, text)
        elif key == "irq":
            numbers["irq"] = _number(value, text)
        elif key == "name" and value:
            name = value
        elif has_value and key:
            options.append((key, value))
        else:
            raise KvmletError(f"--device {text!r}: {word!r} is not key=value")
    if at is None:
        raise KvmletError(f"--device {text!r}: say where it goes: port=, mmio= or pci")
    config = DeviceConfig(
        model, at, numbers["address"], numbers["irq"], numbers["slot"], name, tuple(options)
    )
    config.check()
    return config


def _number(value: str, text: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise KvmletError(f"--device {text!r}: {value!r} is not a number") from None


def parse_module_option(text: str) -> BootModule:
    """`--module FILE[,ARGUMENTS]`: a multiboot module and the arguments its string carries."""
    path, _, cmdline = text.partition(",")
    if not path:
        raise KvmletError(f"--module {text!r}: name a file")
    return BootModule(path, cmdline)


class ShareConfig(NamedTuple):
    """A host directory given to the guest over virtio-9p, which mounts it by `tag`
    (`mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR`). `server` instead of `path` is a
    9P server object of the caller's own (`handle`, `reset`, `close`, `stats`; see
    kvmlet.virtio.p9), as the sandbox's control channel is."""

    path: FilePath | None
    tag: str
    read_only: bool = False
    server: Any = None


@dataclass(frozen=True)
class MachineConfig:
    """Everything that defines one run.

    `kernel=None` means kvmlet's default guest (see `with_default_guest`);
    `boot_code` instead of a kernel runs raw real-mode code from `BOOT_CODE_ADDRESS` (tests,
    benchmarks, firmware experiments). `modules` go with a multiboot kernel; `devices` are
    the user's own device models; `debug_exit_port` places an isa-debug-exit port there;
    `record` writes every user-space access to that file (`kvmlet replay` reads it);
    `balloon` adds a virtio-balloon whose target the control API sets (`kvmlet balloon`);
    `boot_timer` places the boot-time marker port (devices/boot_timer.py): the guest's mark
    sets `Machine.boot_marked_after` and prints the time since the process started on stderr;
    `shares` are host directories over virtio-9p (kvmlet.machine.shares).
    `nets` are the guest's NICs (`NetConfig`, as `-n` gives them; none: no network, and a
    `none` entry stands alone); `name` is the machine's name, which a NIC's generated MAC
    derives from, so it stays the same from run to run (without a name it is random).
    `filesystems`, `vhost_user_disks` and `vsock_cid` are devices served outside Python, and
    `mem_backend` where guest RAM lives (vhost_config.py).
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
    balloon: bool = False
    boot_method: BootMethod = "auto"
    host_profile: str = "auto"
    debug_io: bool = False
    extra_parameters: tuple[str, ...] = field(default=())
    modules: tuple[BootModule, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    debug_exit_port: int | None = None
    record: FilePath | None = None
    boot_timer: bool = False
    shares: tuple[ShareConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    name: str | None = None
    mem_backend: MemoryBackend = "auto"
    filesystems: tuple[FilesystemConfig, ...] = ()
    vhost_user_disks: tuple[VhostUserDiskConfig, ...] = ()
    vsock_cid: int | None = None
    virtiofsd: FilePath | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= MAX_CPUS:
            raise KvmletError(f"--cpus must be between 1 and {MAX_CPUS}, not {self.cpus}")
        if self.console not in ("serial", "virtio"):
            raise KvmletError(f"unknown console {self.console!r}: use serial or virtio")
        if self.virtio_transport not in ("pci", "mmio"):
            raise KvmletError(f"unknown virtio transport {self.virtio_transport!r}: pci or mmio")
        if self.boot_method not in BOOT_METHODS:
            raise KvmletError(f"unknown boot method {self.boot_method!r}")
        if self.debug_exit_port is not None and not 0 <= self.debug_exit_port <= 0xFFFC:
            raise KvmletError(f"--debug-exit port {self.debug_exit_port:#x} is not 0-0xfffc")
        for device in self.devices:
            device.check()
        tags = [share.tag for share in self.shares]
        if len(set(tags)) != len(tags):
            raise KvmletError(f"9p mount tags must differ: {', '.join(tags)}")
        _check_nets(self.nets)
        for text in (self.params, *self.extra_parameters):
            _check_kernel_parameters(text)
        vhost = self.filesystems or self.vhost_user_disks or self.vsock_cid is not None
        if vhost or self.mem_backend != "auto":
            from kvmlet.machine.vhost_config import check_vhost_options

            check_vhost_options(self)

    def to_document(self) -> dict[str, Any]:
        """The configuration as a snapshot keeps it (plain values; file names absolute). The
        user's devices are not in it: a snapshot keeps every placed device, hot-added ones
        too (machine/snapshot.py); nor are the run's options (`debug_io`, `record`). The
        devices served outside Python are, by their backends' sockets: a restore connects
        again to the backend listening there (vhost_config.py)."""

        def path(name: FilePath | None) -> str | None:
            return None if name is None else os.path.abspath(os.fspath(name))

        return {
            "kernel": path(self.kernel),
            "boot_code": self.boot_code,
            "initrd": path(self.initrd),
            "params": self.params,
            "memory": self.memory,
            "cpus": self.cpus,
            "disks": [
                {"path": path(disk.path), "read_only": disk.read_only, "direct": disk.direct}
                for disk in self.disks
            ],
            "console": self.console,
            "virtio_transport": self.virtio_transport,
            "rng": self.rng,
            "balloon": self.balloon,
            "boot_method": self.boot_method,
            "host_profile": self.host_profile,
            "extra_parameters": list(self.extra_parameters),
            "modules": [[path(module.path), module.cmdline] for module in self.modules],
            "debug_exit_port": self.debug_exit_port,
            "mem_backend": self.mem_backend,
            "vhost_user_disks": [
                {"socket": path(disk.socket), "read_only": disk.read_only}
                for disk in self.vhost_user_disks
            ],
            "filesystems": [
                {
                    "tag": share.tag,
                    "source": path(share.source),
                    "read_only": share.read_only,
                    "socket": path(share.socket),
                }
                for share in self.filesystems
            ],
            "vsock_cid": self.vsock_cid,
            "virtiofsd": path(self.virtiofsd),
        }

    @classmethod
    def from_document(cls, document: dict[str, Any], **changes: Any) -> MachineConfig:
        """The configuration `to_document` wrote, with `changes` (the run's own options)."""
        fields = dict(document)
        fields["disks"] = tuple(DiskConfig(**disk) for disk in document["disks"])
        fields["modules"] = tuple(BootModule(*module) for module in document["modules"])
        fields["extra_parameters"] = tuple(document["extra_parameters"])
        if document.get("vhost_user_disks") or document.get("filesystems"):
            from kvmlet.machine.vhost_config import FilesystemConfig, VhostUserDiskConfig

            fields["vhost_user_disks"] = tuple(
                VhostUserDiskConfig(**disk) for disk in document["vhost_user_disks"]
            )
            fields["filesystems"] = tuple(
                FilesystemConfig(**share) for share in document["filesystems"]
            )
        else:  # none, or a file from before they were kept
            fields.pop("vhost_user_disks", None)
            fields.pop("filesystems", None)
        fields.update(changes)
        return cls(**fields)

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

    def multiboot_command_line(self) -> str:
        """A multiboot kernel's command line: its file name, then `params` (as GRUB and
        QEMU give it; kvmlet's Linux parameters mean nothing to it)."""
        return f"{os.fspath(self.kernel)} {self.params}".rstrip()


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


def _check_nets(nets: tuple[NetConfig, ...]) -> None:
    if not nets:
        return
    from kvmlet.virtio.net.option import NetConfig  # the network stack, only for a network

    for net in nets:
        if not isinstance(net, NetConfig):
            raise KvmletError(f"a network is a NetConfig (as -n gives it), not {net!r}")
    if len(nets) > 1 and any(net.mode == "none" for net in nets):
        raise KvmletError("network mode none (no NIC) cannot go with other networks")


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
