"""The default guest's Kconfig fragment, its verification and the kernel cache key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmlet import guest
from kvmlet.errors import KvmletError
from kvmlet.guest import initramfs, kernel
from kvmlet.guest.kernel import (
    FRAGMENT_PATH,
    disabled_symbols,
    kernel_cache_key,
    missing_symbols,
    required_symbols,
)
from kvmlet.guest.progress import QuietProgress

# The symbol list of the boot issue (issue 4), every one of them =y in the built kernel.
ISSUE_SYMBOLS = [
    "64BIT",
    "PRINTK",
    "EARLY_PRINTK",
    "TTY",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "BLK_DEV_INITRD",
    "RD_GZIP",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "IA32_EMULATION",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "PROC_FS",
    "SYSFS",
    "SHMEM",
    "TMPFS",
    "PCI",
    "PCI_MSI",
    "VIRTIO",
    "VIRTIO_MENU",
    "VIRTIO_PCI",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "BLOCK",
    "BLK_DEV",
    "VIRTIO_BLK",
    "NET",
    "INET",
    "UNIX",
    "NETDEVICES",
    "NET_CORE",
    "VIRTIO_NET",
    "VIRTIO_CONSOLE",
    "HW_RANDOM",
    "HW_RANDOM_VIRTIO",
    "NET_9P",
    "NET_9P_VIRTIO",
    "NETWORK_FILESYSTEMS",
    "9P_FS",
    "EXT2_FS",
    "SERIO",
    "SERIO_I8042",
    "RTC_CLASS",
    "RTC_DRV_CMOS",
    "X86_MPPARSE",
    "HYPERVISOR_GUEST",
    "PARAVIRT",
    "KVM_GUEST",
    "VIRTIO_BALLOON",
    "VSOCKETS",
    "VIRTIO_VSOCKETS",
    "FUSE_FS",
    "VIRTIO_FS",
    "PVH",
    "PRINTK_TIME",
    "SMP",
    "KERNEL_LZ4",
]
# What the test box's L1 needs on top: KVM for AMD's SVM, and the system calls of CPython,
# pytest and QEMU.
BOX_SYMBOLS = [
    "VIRTUALIZATION",
    "KVM",
    "KVM_AMD",
    "HIGH_RES_TIMERS",
    "MULTIUSER",
    "FUTEX",
    "EPOLL",
    "EVENTFD",
    "SIGNALFD",
    "TIMERFD",
    "POSIX_TIMERS",
    "AIO",
    "FILE_LOCKING",
    "ADVISE_SYSCALLS",
    "UNIX98_PTYS",
    "FHANDLE",
]

FRAGMENT = FRAGMENT_PATH.read_text()


def test_fragment_enables_every_symbol_of_the_issue_and_the_box():
    enabled = set(required_symbols(FRAGMENT))
    assert [s for s in ISSUE_SYMBOLS + BOX_SYMBOLS if s not in enabled] == []


def test_fragment_turns_off_modules_and_core_dumps():
    assert {"MODULES", "ELF_CORE", "KERNEL_XZ"} <= set(disabled_symbols(FRAGMENT))
    assert not {"MODULES", "ELF_CORE"} & set(required_symbols(FRAGMENT))


def test_missing_symbols_names_unmet_and_wrongly_enabled_ones():
    fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"
    config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n"
    assert missing_symbols(config, fragment) == ["B", "C=n"]
    assert missing_symbols("CONFIG_A=y\nCONFIG_B=y\n", fragment) == []


def test_cache_key_follows_fragment_and_source_version():
    key = kernel_cache_key(FRAGMENT, "6.1.192-2")
    assert key == kernel_cache_key(FRAGMENT, "6.1.192-2")
    assert key != kernel_cache_key(FRAGMENT + "CONFIG_EXT4_FS=y\n", "6.1.192-2")
    assert key != kernel_cache_key(FRAGMENT, "6.1.193-1")


def test_cached_debian_build_is_returned_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "DEBIAN_SOURCE_TARBALL", Path(__file__))
    monkeypatch.setattr(kernel, "_debian_source_version", lambda: "test-version")
    output = tmp_path / "kernel" / kernel_cache_key(FRAGMENT, "test-version")
    output.mkdir(parents=True)
    for name in ("bzImage", "vmlinux", "config"):
        (output / name).write_text(name)
    monkeypatch.setattr(kernel, "_build", pytest.fail)
    build = kernel.ensure_kernel(None, QuietProgress())
    assert build.bzimage == output / "bzImage" and build.vmlinux.read_text() == "vmlinux"


def test_missing_debian_source_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "DEBIAN_SOURCE_TARBALL", tmp_path / "absent.tar.xz")
    with pytest.raises(KvmletError, match=r"apt-get install linux-source-6.1.*--source"):
        kernel.ensure_kernel(None, QuietProgress())


def test_source_that_is_not_a_kernel_tree_is_refused(tmp_path):
    with pytest.raises(KvmletError, match="not a Linux source tree"):
        kernel.ensure_kernel(tmp_path, QuietProgress())


def test_installing_what_is_missing_needs_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "DEBIAN_SOURCE_TARBALL", tmp_path / "absent.tar.xz")
    monkeypatch.setattr(kernel.os, "geteuid", lambda: 1000)
    with pytest.raises(KvmletError, match=r"takes root.*sudo apt-get install linux-source-6.1"):
        guest.ensure_default_guest(progress=QuietProgress(), install_source=True)


def test_everything_missing_for_a_build_is_named_in_one_line_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "DEBIAN_SOURCE_TARBALL", tmp_path / "absent.tar.xz")
    monkeypatch.setattr(kernel, "_LIBELF_HEADER", tmp_path / "gelf.h")
    monkeypatch.setattr(kernel.shutil, "which", lambda tool: None if tool in "flex xz" else tool)
    monkeypatch.setattr(initramfs, "BUSYBOX_PATH", tmp_path / "busybox")
    monkeypatch.setattr(kernel, "_build", pytest.fail)
    with pytest.raises(KvmletError) as raised:
        guest.ensure_default_guest(progress=QuietProgress())
    assert str(raised.value) == (
        "building the default guest needs Debian packages this host lacks: run `apt-get "
        "install linux-source-6.1 flex xz-utils libelf-dev busybox-static` (or pass --source DIR)"
    )


def test_a_cached_kernel_needs_no_build_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "DEBIAN_SOURCE_TARBALL", Path(__file__))
    monkeypatch.setattr(kernel, "_debian_source_version", lambda: "test-version")
    monkeypatch.setattr(kernel.shutil, "which", lambda tool: None)
    monkeypatch.setattr(kernel, "_LIBELF_HEADER", tmp_path / "gelf.h")
    everything = ["build-essential", "flex", "bison", "bc", "lz4", "perl", "xz-utils"]
    assert kernel.missing_packages(None) == [*everything, "libelf-dev"]
    output = tmp_path / "kernel" / kernel_cache_key(FRAGMENT, "test-version")
    output.mkdir(parents=True)
    for name in ("bzImage", "vmlinux", "config"):
        (output / name).write_text(name)
    assert kernel.missing_packages(None) == []


class RecordingProgress(QuietProgress):
    def __init__(self):
        self.previous = []

    def build_started(self, previous):
        self.previous.append(previous)


def fake_make(monkeypatch, step_times):
    """Replace make by a run that printed len(step_times) lines at those times."""

    class Runner:
        def __init__(self, *args):
            pass

        def make(self, *arguments, show_progress=False):
            return step_times

    monkeypatch.setattr(kernel, "_MakeRunner", Runner)
    monkeypatch.setattr(kernel, "_configure", lambda runner, object_dir: None)
    monkeypatch.setattr(kernel, "_verify_config", lambda config, fragment: None)
    monkeypatch.setattr(kernel, "_publish", lambda *args: None)


def test_a_full_build_leaves_its_step_profile_for_the_next_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path))
    object_dir = tmp_path / "build" / "obj"
    progress = RecordingProgress()
    fake_make(monkeypatch, [float(n) for n in range(1, 101)])
    kernel._build(tmp_path, object_dir, tmp_path / "out", FRAGMENT, progress)
    first = kernel._previous_profile()
    assert progress.previous == [None] and first.steps == 100 and first.seconds[-1] == 100
    (object_dir / "vmlinux").write_text("built")  # the next build only redoes what changed
    fake_make(monkeypatch, [1.0] * 30)
    kernel._build(tmp_path, object_dir, tmp_path / "out", FRAGMENT, progress)
    assert progress.previous == [None, None]  # no total: a rebuild is not a full build
    assert kernel._previous_profile() == first  # and it does not replace the profile
    (object_dir / "vmlinux").unlink()
    fake_make(monkeypatch, [float(n) for n in range(1, 81)])
    kernel._build(tmp_path, object_dir, tmp_path / "out", FRAGMENT, progress)
    assert progress.previous[-1] == first
    assert kernel._previous_profile().steps == 80
