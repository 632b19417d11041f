"""kvmlet's default guest: a minimal kernel and a busybox initramfs, built and cached.

`ensure_default_guest()` returns the cached kernel (bzImage and the vmlinux ELF), the initrd
and the kernel's .config, building whatever is missing first (a kernel build takes minutes; a
cached one is instant). `python3 -m kvmlet.guest` does the same from a shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmlet.guest.initramfs import ensure_initramfs
from kvmlet.guest.kernel import ensure_kernel
from kvmlet.guest.progress import ConsoleProgress, Progress, QuietProgress
from kvmlet.guest.run_protocol import READY_MARKER, parse_exit_status, run_parameter

__all__ = [
    "READY_MARKER",
    "ConsoleProgress",
    "DefaultGuest",
    "Progress",
    "QuietProgress",
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
    `install_source` lets kvmlet run `apt-get install linux-source-6.1` when root.
    Raises KvmletError with one clear line when the source or a tool is missing or the build
    fails.
    """
    reporter = progress if progress is not None else ConsoleProgress()
    kernel = ensure_kernel(source, reporter, install_source=install_source)
    initrd = ensure_initramfs(reporter)
    return DefaultGuest(kernel.bzimage, kernel.vmlinux, initrd, kernel.config)
