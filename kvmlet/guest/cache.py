"""kvmlet's cache directory: where it is, what it holds, what it costs, and cleaning it.

    <cache>/kernel/<key>/       the default guest kernel (bzImage, vmlinux, config, build.log),
                                one directory per configuration (~20 MB each)
    <cache>/initramfs/<key>/    the busybox initramfs (~2 MB)
    <cache>/source/<version>/   Debian's linux-source-6.1, extracted (~1.5 GB): rebuilds only
    <cache>/build/obj-<...>/    make's object directory and its log (~0.2-0.3 GB): rebuilds only
    <cache>/kernel-build-profile.json   step count and timing of the last full kernel build
    <cache>/build.lock          serialises builds (and cleaning) between processes

`<cache>` is $KVMLET_CACHE_DIR, else $XDG_CACHE_HOME/kvmlet, else ~/.cache/kvmlet. Everything
in it can be rebuilt; `clean()` keeps only the given entries (the current default guest).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

REBUILD_ONLY = ("source", "build")
"""Cache folders that only a rebuild of the kernel needs."""
ENTRY_FOLDERS = ("kernel", "initramfs")
"""Cache folders with one built entry per key."""


def cache_root() -> Path:
    """kvmlet's cache directory: $KVMLET_CACHE_DIR, else $XDG_CACHE_HOME/kvmlet, ~/.cache/kvmlet."""
    explicit = os.environ.get("KVMLET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvmlet"


@contextmanager
def cache_lock() -> Iterator[None]:
    """Serialises builds between processes sharing the cache (CI jobs, several terminals)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def tree_size(path: Path) -> int:
    """Bytes of the regular files under `path` (symbolic links not followed; 0 if absent)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def format_bytes(size: int) -> str:
    """`1.5 GB`, `212 MB`, `12 kB`: decimal units, as `du -h --si` prints them."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size} B"


def rebuild_only_size() -> int:
    """Bytes the cache spends on files only a rebuild needs (extracted source, objects)."""
    return sum(tree_size(cache_root() / folder) for folder in REBUILD_ONLY)


def clean(keep: Iterable[Path]) -> list[tuple[Path, int]]:
    """Remove everything only a rebuild needs and every built entry not in `keep`.

    Returns what was removed, with its size. Takes the build lock, so a build running in
    another process finishes first."""
    kept = {Path(path) for path in keep}
    root = cache_root()
    if not root.is_dir():
        return []
    removed = []
    with cache_lock():
        candidates = [root / folder for folder in REBUILD_ONLY]
        for folder in ENTRY_FOLDERS:
            if (root / folder).is_dir():
                candidates += sorted((root / folder).iterdir())
        for path in candidates:
            if path in kept or not path.exists():
                continue
            size = tree_size(path) if path.is_dir() else path.stat().st_size
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append((path, size))
    return removed
