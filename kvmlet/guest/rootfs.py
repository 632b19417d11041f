"""kvmlet's root-file-system initramfs: for guests whose root is a host directory (9p, virtiofs).

`kvmlet run --rootfs DIR` and `kvmlet sandbox` boot with this initramfs: Debian's static
busybox, the default guest's udhcpc script and `rootfs_init.sh` as /init, which checks the
kernel, mounts the share named by `root=` (read-only under a tmpfs overlay, or read-write),
sets up /proc, /sys, /dev, /tmp and /run and switches to it, brings the network up, then runs
a shell, a command or the sandbox agent. It is packed like
the default guest's initramfs (kvmlet.guest.initramfs) and cached beside it, keyed by busybox,
the script and this recipe; packing takes a fraction of a second.

The guest kernel needs, built in (not as modules: the initramfs carries none):

    CONFIG_VIRTIO_PCI (or CONFIG_VIRTIO_MMIO and CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES with
    --virtio-transport mmio), CONFIG_NET_9P, CONFIG_NET_9P_VIRTIO, CONFIG_9P_FS (for a 9p
    root, and for the sandbox's control share), CONFIG_VIRTIO_FS (for a virtiofs root),
    CONFIG_OVERLAY_FS (not for a read-write root), CONFIG_DEVTMPFS, CONFIG_TMPFS,
    CONFIG_BLK_DEV_INITRD, CONFIG_BINFMT_ELF, CONFIG_BINFMT_SCRIPT, CONFIG_PROC_FS,
    CONFIG_SYSFS, and a console: CONFIG_SERIAL_8250_CONSOLE (or CONFIG_VIRTIO_CONSOLE).

`explain_boot_failure(console)` turns what a kernel lacking them prints into one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvmlet.errors import KvmletError
from kvmlet.guest import initramfs
from kvmlet.guest.cache import cache_root
from kvmlet.guest.progress import Progress, QuietProgress

INIT_SCRIPT_PATH = Path(__file__).with_name("rootfs_init.sh")
RECIPE_VERSION = "rootfs-initramfs-1"
CACHE_FOLDER = "rootfs-initramfs"
INIT_FAILURE = re.compile(r"kvmlet-init: ([^\r\n]*)")
_KERNEL_FAILURES = (
    (
        r"VFS: Unable to mount root fs|Cannot open root device",
        "the guest kernel did not run kvmlet's initramfs: it needs CONFIG_BLK_DEV_INITRD",
    ),
    (
        r"Failed to execute /init \(error -8\)|Requested init /init failed \(error -8\)",
        "the guest kernel cannot run kvmlet's /init: it needs CONFIG_BINFMT_SCRIPT and "
        "CONFIG_BINFMT_ELF",
    ),
    (r"No working init found", "the guest kernel found no init it could run"),
)


def cache_key(busybox_image: bytes, init_script: str) -> str:
    recipe = RECIPE_VERSION + "\n" + init_script
    return initramfs.initramfs_cache_key(busybox_image, recipe, initramfs.guest_files())


def current_dir(busybox: Path | None = None) -> Path | None:
    """The cache entry packed from this host's busybox, None without a static busybox."""
    busybox = busybox or initramfs.BUSYBOX_PATH
    if initramfs.missing_packages(busybox):
        return None
    key = cache_key(busybox.read_bytes(), INIT_SCRIPT_PATH.read_text())
    return cache_root() / CACHE_FOLDER / key


def ensure_rootfs_initramfs(
    progress: Progress | None = None, busybox: Path = initramfs.BUSYBOX_PATH
) -> Path:
    """The root-file-system initrd, packed now if the cache does not hold it yet."""
    progress = progress or QuietProgress()
    if not busybox.is_file():
        raise KvmletError(f"no {busybox} for kvmlet's init: run `apt-get install busybox-static`")
    busybox_image = busybox.read_bytes()
    if not initramfs.is_static_elf(busybox_image):
        raise KvmletError(
            f"{busybox} is not a static x86-64 binary: run `apt-get install busybox-static`"
        )
    init_script = INIT_SCRIPT_PATH.read_text()
    output = cache_root() / CACHE_FOLDER / cache_key(busybox_image, init_script)
    initrd = output / "initrd.cpio"
    if initrd.is_file():
        return initrd
    progress.stage(f"packing the root-file-system initramfs (busybox from {busybox})")
    applets = initramfs.busybox_applet_paths(busybox)
    image = initramfs.pack_initramfs(busybox_image, applets, init_script, initramfs.guest_files())
    output.mkdir(parents=True, exist_ok=True)
    staging = initrd.with_name(f"initrd.cpio.{os.getpid()}.partial")
    staging.write_bytes(image)
    staging.rename(initrd)
    return initrd


def explain_boot_failure(console_text: str) -> str | None:
    """One line saying why a guest booted with this initramfs stopped before its command or
    shell ran, from what its init or its kernel printed; None when the console says nothing
    of the kind."""
    found = INIT_FAILURE.search(console_text)
    if found is not None:
        return found.group(1).strip()
    for pattern, explanation in _KERNEL_FAILURES:
        if re.search(pattern, console_text):
            return explanation
    if not console_text.strip():
        return (
            "the guest printed nothing on its console: does its kernel have "
            "CONFIG_SERIAL_8250_CONSOLE (or CONFIG_VIRTIO_CONSOLE with --console virtio)?"
        )
    return None
