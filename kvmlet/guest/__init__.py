"""kvmlet's default guest: a minimal kernel and a busybox initramfs, built and cached.

`ensure_default_guest()` returns the cached kernel (bzImage and the vmlinux ELF), the initrd
and the kernel's .config, building whatever is missing first (a kernel build takes minutes; a
cached one is instant). `python3 -m kvmlet.guest` does the same from a shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmlet.errors import KvmletError
from kvmlet.guest import initramfs, kernel
from kvmlet.guest.cache import cache_root, clean
from kvmlet.guest.progress import ConsoleProgress, Progress, QuietProgress
from kvmlet.guest.run_protocol import READY_MARKER, parse_exit_status, run_parameter

__all__ = [
    "READY_MARKER",
    "ConsoleProgress",
    "DefaultGuest",
    "Progress",
    "QuietProgress",
    "clean_cache",
    "ensure_default_guest",
    "parse_exit_status",
    "run_parameter",
]


@dataclass(frozen=True)
class DefaultGuest:
    """Paths of the default guest's cached files."""

    bzimage: Path
    vmlinux: Path
    initrd: Path
    config: Path


def ensure_default_guest(
    source: Path | None = None,
    progress: Progress | None = None,
    *,
    install_source: bool = False,
) -> DefaultGuest:
    """Builds (or finds in the cache) the default guest kernel and initramfs.

    `source` is a Linux source tree to build from instead of Debian's linux-source-6.1;
    `progress` receives stage lines and make output (default: a ConsoleProgress on stderr);
    `install_source` lets kvmlet `apt-get install` whatever the build lacks, when root.
    Before anything is built, every Debian package the build needs is checked: what is missing
    is one KvmletError line naming them all; so is a failing build.
    """
    reporter = progress if progress is not None else ConsoleProgress()
    missing = [*kernel.missing_packages(source), *initramfs.missing_packages()]
    if missing and install_source:
        kernel.apt_install(missing, reporter)
    elif missing:
        alternative = " (or pass --source DIR)" if kernel.DEBIAN_SOURCE_PACKAGE in missing else ""
        raise KvmletError(
            f"building the default guest needs Debian packages this host lacks: run "
            f"`apt-get install {' '.join(missing)}`{alternative}"
        )
    built = kernel.ensure_kernel(source, reporter)
    initrd = initramfs.ensure_initramfs(reporter)
    return DefaultGuest(built.bzimage, built.vmlinux, initrd, built.config)


def clean_cache() -> tuple[list[tuple[Path, int]], list[Path]]:
    """Remove from the cache what only a rebuild needs (the extracted source, the build
    objects) and every kernel or initramfs but the current default guest's.

    Returns (what was removed with its size, what was kept)."""
    keep: list[Path] = []
    for folder, current in (
        ("kernel", kernel.current_kernel_dir()),
        ("initramfs", initramfs.current_dir()),
    ):  # where the current entry cannot be told (its inputs are gone), keep them all
        keep += [current] if current is not None else sorted((cache_root() / folder).glob("*"))
    removed = clean(keep)
    return removed, [path for path in keep if path.exists()]
