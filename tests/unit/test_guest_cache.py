"""The cache: where it is, and `kvmlet build-guest --clean`, which removes what only a rebuild
needs and stale guests, and keeps the current default guest and the build profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmlet import cli, guest
from kvmlet.guest import cache, initramfs, kernel


def test_the_cache_is_kvmlet_cache_dir_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("KVMLET_CACHE_DIR")
    assert cache.cache_root() == tmp_path / "xdg" / "kvmlet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "kvmlet"


def fill(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A cache with a current and a stale guest, the extracted source and the objects."""
    root = tmp_path / "cache"
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(root))
    fill(root / "source" / "6.1" / "linux-source-6.1" / "Makefile", 1000)
    fill(root / "build" / "obj-6.1" / "vmlinux", 300)
    fill(root / "build" / "obj-6.1.log", 20)
    for folder in ("kernel", "initramfs"):
        fill(root / folder / "current" / "image", 10)
        fill(root / folder / "stale" / "image", 7)
    fill(root / "kernel-build-profile.json", 2)
    monkeypatch.setattr(kernel, "current_kernel_dir", lambda: root / "kernel" / "current")
    monkeypatch.setattr(initramfs, "current_dir", lambda: root / "initramfs" / "current")
    return root


def test_clean_removes_the_source_objects_and_stale_guests_only(cached):
    removed, kept = guest.clean_cache()
    assert dict(removed) == {
        cached / "source": 1000,
        cached / "build": 320,
        cached / "kernel" / "stale": 7,
        cached / "initramfs" / "stale": 7,
    }
    assert kept == [cached / "kernel" / "current", cached / "initramfs" / "current"]
    left = sorted(str(path.relative_to(cached)) for path in cached.rglob("*") if path.is_file())
    assert left == [
        "build.lock",
        "initramfs/current/image",
        "kernel-build-profile.json",
        "kernel/current/image",
    ]
    assert guest.clean_cache() == ([], kept)  # twice is harmless


def test_without_the_source_package_every_kernel_is_kept(cached, monkeypatch):
    monkeypatch.setattr(kernel, "current_kernel_dir", lambda: None)
    removed, kept = guest.clean_cache()
    assert cached / "kernel" / "stale" in kept and cached / "kernel" / "current" in kept
    assert cached / "initramfs" / "stale" in dict(removed)


def test_build_guest_clean_says_what_it_removed_and_freed(cached, capsys):
    assert cli.main(["build-guest", "--clean"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"removed {cached / 'source'} (1.0 kB)" in lines
    assert f"kept    {cached / 'kernel' / 'current'}" in lines
    assert lines[-1] == "freed 1.3 kB"


def test_sizes_read_as_du_prints_them():
    assert [cache.format_bytes(n) for n in (512, 1_500, 212_000_000, 1_530_000_000)] == [
        "512 B",
        "1.5 kB",
        "212 MB",
        "1.5 GB",
    ]
