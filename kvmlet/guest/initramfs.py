"""Packs the default guest's initramfs: Debian's static busybox, its applet links, /init and
the few files init uses (`GUEST_FILES`: udhcpc's event script).

The archive is a newc cpio written in pure Python (kvmlet.guest.cpio), so no root is needed for
/dev/console. Every applet busybox lists with `--list-full` becomes a symlink in the archive,
so the guest spends no time installing them at boot. It is left uncompressed: under an
instruction-emulating KVM the kernel spent 43 s gunzipping it, against a copy that costs nothing
on any host (the kernel keeps RD_GZIP for users' own initrds). The result is cached under
`<cache>/initramfs/<key>/initrd.cpio`, keyed by the busybox binary, the init script, the
other files and this recipe.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
from pathlib import Path

from kvmlet.errors import KvmletError
from kvmlet.guest.cache import cache_root
from kvmlet.guest.cpio import CpioWriter
from kvmlet.guest.progress import Progress

BUSYBOX_PATH = Path("/bin/busybox")
INIT_SCRIPT_PATH = Path(__file__).with_name("init.sh")
GUEST_FILES = {"etc/udhcpc/default.script": Path(__file__).with_name("udhcpc.script")}
"""Files of the guest's root (executable) beside /init, and where kvmlet keeps them."""
# Part of the cache key: change it whenever pack_initramfs changes what it writes.
RECIPE_VERSION = "initramfs-2"  # 2: uncompressed
_DIRECTORIES = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "etc", "proc", "sys")
_DIRECTORIES += ("tmp", "run", "root", "mnt", "etc/udhcpc")
_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3


def is_static_elf(image: bytes) -> bool:
    """True for a 64-bit little-endian ELF executable that asks for no program interpreter."""
    if len(image) < 64 or image[:4] != _ELF_MAGIC or image[4] != 2 or image[5] != 1:
        return False
    program_headers, _, _, _, entry_size, count = struct.unpack_from("<QQIHHH", image, 0x20)
    if entry_size < 4:
        return False
    for index in range(count):
        offset = program_headers + index * entry_size
        if offset + entry_size > len(image):
            return False
        if struct.unpack_from("<I", image, offset)[0] == _PT_INTERP:
            return False
    return True


def busybox_applet_paths(busybox: Path) -> list[str]:
    """Where busybox wants its applets (`usr/bin/awk`, `sbin/reboot`, ...), from the binary."""
    result = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KvmletError(f"{busybox} --list-full failed: {result.stderr.strip()}")
    return sorted({line.strip().strip("/") for line in result.stdout.splitlines() if line.strip()})


def pack_initramfs(
    busybox_image: bytes,
    applet_paths: list[str],
    init_script: str,
    files: dict[str, bytes] | None = None,
) -> bytes:
    """The newc archive of the default guest's root file system; `files` are executables
    by their path in it (their directories among the archive's)."""
    archive = io.BytesIO()
    writer = CpioWriter(archive)
    for directory in _DIRECTORIES:
        writer.add_directory(directory, 0o1777 if directory == "tmp" else 0o755)
    writer.add_char_device("dev/console", 5, 1, 0o600)
    writer.add_file("bin/busybox", busybox_image, 0o755)
    writer.add_file("init", init_script.encode(), 0o755)
    files = files or {}
    for path, data in sorted(files.items()):
        writer.add_file(path, data, 0o755)
    taken = {"bin/busybox", "init", "dev/console", *_DIRECTORIES, *files}
    for applet in applet_paths:
        parent = applet.rpartition("/")[0]
        if applet in taken or (parent and parent not in _DIRECTORIES):
            continue
        writer.add_symlink(applet, "/bin/busybox")
        taken.add(applet)
    writer.finish()
    return archive.getvalue()


def initramfs_cache_key(
    busybox_image: bytes, init_script: str, files: dict[str, bytes] | None = None
) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION.encode(), busybox_image, init_script.encode()):
        digest.update(hashlib.sha256(part).digest())
    for path, data in sorted((files or {}).items()):
        digest.update(hashlib.sha256(path.encode() + b"\0" + data).digest())
    return digest.hexdigest()[:16]


def guest_files() -> dict[str, bytes]:
    """`GUEST_FILES` as `pack_initramfs` takes them."""
    return {path: source.read_bytes() for path, source in GUEST_FILES.items()}


def missing_packages(busybox: Path | None = None) -> list[str]:
    """Debian packages the initramfs needs and this host lacks (a static busybox)."""
    busybox = busybox or BUSYBOX_PATH
    try:
        with open(busybox, "rb") as file:
            static = is_static_elf(file.read(1 << 16))
    except OSError:
        static = False
    return [] if static else ["busybox-static"]


def current_dir(busybox: Path | None = None) -> Path | None:
    """The cache entry of the initramfs packed from this host's busybox, None without one."""
    busybox = busybox or BUSYBOX_PATH
    if missing_packages(busybox):
        return None
    key = initramfs_cache_key(busybox.read_bytes(), INIT_SCRIPT_PATH.read_text(), guest_files())
    return cache_root() / "initramfs" / key


def ensure_initramfs(progress: Progress, busybox: Path = BUSYBOX_PATH) -> Path:
    """The default guest's initrd, packed now if the cache does not hold it yet."""
    if not busybox.is_file():
        raise KvmletError(
            f"no {busybox} for the default guest: run `apt-get install busybox-static`"
        )
    busybox_image = busybox.read_bytes()
    if not is_static_elf(busybox_image):
        raise KvmletError(
            f"{busybox} is not a static x86-64 binary: run `apt-get install busybox-static`"
        )
    init_script = INIT_SCRIPT_PATH.read_text()
    files = guest_files()
    output = cache_root() / "initramfs" / initramfs_cache_key(busybox_image, init_script, files)
    initrd = output / "initrd.cpio"
    if initrd.is_file():
        return initrd
    progress.stage(f"packing the initramfs (busybox from {busybox})")
    image = pack_initramfs(busybox_image, busybox_applet_paths(busybox), init_script, files)
    output.mkdir(parents=True, exist_ok=True)
    staging = initrd.with_name(f"initrd.cpio.{os.getpid()}.partial")
    staging.write_bytes(image)
    staging.rename(initrd)
    return initrd
