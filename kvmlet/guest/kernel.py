"""Builds kvmlet's default guest kernel from a Linux source tree and caches it.

Recipe (the way virtme-ng does it): `make tinyconfig`, merge the Kconfig fragment kept in the
project (kvmlet.config) with `scripts/kconfig/merge_config.sh`, `make olddefconfig`, then
`make -jN bzImage vmlinux` out of tree. Every `CONFIG_X=y` of the fragment must be `=y` in the
resulting .config and every `# CONFIG_X is not set` must be off: Kconfig silently drops symbols
whose dependencies are missing, so the build fails loudly naming them instead.

The source is Debian's `linux-source-6.1` tarball (extracted once into the cache) or a
developer's tree (`source=`). Outputs (bzImage, the vmlinux ELF for the PVH boot path, the
.config and the build log) land in `<cache>/kernel/<key>/`, where the key hashes the fragment,
the source version and the recipe: an unchanged fragment is instant, a changed one rebuilds
(incrementally, in the same object directory). A developer's tree is rebuilt with make on every
call, since its contents can change without its version changing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmlet.errors import KvmletError
from kvmlet.guest.progress import Progress

FRAGMENT_PATH = Path(__file__).with_name("kvmlet.config")
DEBIAN_SOURCE_PACKAGE = "linux-source-6.1"
DEBIAN_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_PACKAGES = ("build-essential", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "lz4")
_BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc", "lz4", "perl")
_LIBELF_HEADER = Path("/usr/include/gelf.h")

# Part of the cache key: change it whenever the steps below change what they produce.
BUILD_RECIPE = (
    "make ARCH=x86_64 tinyconfig",
    "scripts/kconfig/merge_config.sh -m .config kvmlet.config",
    "make ARCH=x86_64 olddefconfig",
    "make ARCH=x86_64 -jN bzImage vmlinux",
)

_ENABLED = re.compile(r"^CONFIG_(\w+)=y$", re.MULTILINE)
_DISABLED = re.compile(r"^# CONFIG_(\w+) is not set$", re.MULTILINE)
_MAKE_VERSION_FIELD = re.compile(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION) = (.*)$", re.M)
_MAKE_VERSION_FIELD_NAMES = ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION")


@dataclass(frozen=True)
class KernelBuild:
    """The cached outputs of one kernel build."""

    bzimage: Path
    vmlinux: Path
    config: Path


@dataclass(frozen=True)
class KernelSource:
    """Where the kernel source comes from and a string that identifies its contents."""

    version: str
    tree: Path | None = None  # a developer's tree; None means the Debian tarball

    @property
    def is_debian_package(self) -> bool:
        return self.tree is None


def cache_root() -> Path:
    """kvmlet's cache directory: $KVMLET_CACHE_DIR, else $XDG_CACHE_HOME/kvmlet, ~/.cache/kvmlet."""
    explicit = os.environ.get("KVMLET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvmlet"


def required_symbols(fragment_text: str) -> list[str]:
    """Symbols the fragment sets to y."""
    return _ENABLED.findall(fragment_text)


def disabled_symbols(fragment_text: str) -> list[str]:
    """Symbols the fragment turns off."""
    return _DISABLED.findall(fragment_text)


def missing_symbols(config_text: str, fragment_text: str) -> list[str]:
    """Fragment settings the final .config does not honour (`X` for =y, `X=n` for off)."""
    enabled = set(_ENABLED.findall(config_text))
    wrong = [name for name in required_symbols(fragment_text) if name not in enabled]
    wrong += [f"{name}=n" for name in disabled_symbols(fragment_text) if name in enabled]
    return wrong


def kernel_cache_key(fragment_text: str, source_version: str) -> str:
    """A short hash of everything that determines the built kernel."""
    digest = hashlib.sha256()
    for part in (*BUILD_RECIPE, source_version, fragment_text):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def ensure_kernel(
    source: Path | None, progress: Progress, *, install_source: bool = False
) -> KernelBuild:
    """The default guest kernel, built now if the cache does not hold it yet."""
    kernel_source = _resolve_source(source, progress, install_source=install_source)
    fragment_text = FRAGMENT_PATH.read_text()
    output_dir = cache_root() / "kernel" / kernel_cache_key(fragment_text, kernel_source.version)
    build = KernelBuild(output_dir / "bzImage", output_dir / "vmlinux", output_dir / "config")
    if kernel_source.is_debian_package and _is_complete(build):
        return build
    with _cache_lock():
        if kernel_source.is_debian_package and _is_complete(build):
            return build
        tree = kernel_source.tree or _extract_debian_source(kernel_source.version, progress)
        _check_build_tools()
        object_dir = cache_root() / "build" / _object_dir_name(kernel_source)
        _build(tree, object_dir, output_dir, fragment_text, progress)
    return build


def _is_complete(build: KernelBuild) -> bool:
    return all(path.is_file() for path in (build.bzimage, build.vmlinux, build.config))


@contextmanager
def _cache_lock() -> Iterator[None]:
    """Serialises builds between processes sharing the cache (CI jobs, several terminals)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _resolve_source(
    source: Path | None, progress: Progress, *, install_source: bool
) -> KernelSource:
    if source is not None:
        tree = source.expanduser().resolve()
        makefile = tree / "Makefile"
        if not makefile.is_file() or not (tree / "arch" / "x86").is_dir():
            raise KvmletError(f"{source} is not a Linux source tree (no Makefile or arch/x86)")
        fields = dict(_MAKE_VERSION_FIELD.findall(makefile.read_text(errors="replace")[:2000]))
        release = "{VERSION}.{PATCHLEVEL}.{SUBLEVEL}{EXTRAVERSION}".format_map(
            {name: fields.get(name, "").strip() for name in _MAKE_VERSION_FIELD_NAMES}
        )
        return KernelSource(version=f"tree:{tree}:{release}", tree=tree)
    if not DEBIAN_SOURCE_TARBALL.is_file():
        if not install_source:
            raise KvmletError(
                f"no Linux source to build the default guest: run `apt-get install "
                f"{DEBIAN_SOURCE_PACKAGE}` or pass --source DIR"
            )
        _apt_install((DEBIAN_SOURCE_PACKAGE, *BUILD_PACKAGES), progress)
    return KernelSource(version=_debian_source_version())


def _debian_source_version() -> str:
    """The package version, or the tarball's size and mtime where dpkg cannot tell."""
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", DEBIAN_SOURCE_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        result = None
    if result is not None and result.returncode == 0 and result.stdout.strip():
        return result.stdout.strip()
    info = DEBIAN_SOURCE_TARBALL.stat()
    return f"tarball-{info.st_size}-{int(info.st_mtime)}"


def _apt_install(packages: tuple[str, ...], progress: Progress) -> None:
    if os.geteuid() != 0:
        raise KvmletError(
            f"installing {DEBIAN_SOURCE_PACKAGE} needs root: run `sudo apt-get install "
            f"{' '.join(packages)}` or pass --source DIR"
        )
    progress.stage(f"installing {' '.join(packages)} with apt-get")
    result = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages], check=False
    )
    if result.returncode != 0 or not DEBIAN_SOURCE_TARBALL.is_file():
        raise KvmletError(f"apt-get install {DEBIAN_SOURCE_PACKAGE} failed (see its output above)")


def _extract_debian_source(version: str, progress: Progress) -> Path:
    """Unpacks the Debian tarball once per package version; returns the tree."""
    target = cache_root() / "source" / version
    tree = target / "linux-source-6.1"
    if tree.is_dir():
        return tree
    progress.stage(f"extracting {DEBIAN_SOURCE_TARBALL} (once per source version)")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    result = subprocess.run(
        ["tar", "-xf", str(DEBIAN_SOURCE_TARBALL), "-C", str(partial)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not (partial / "linux-source-6.1").is_dir():
        raise KvmletError(f"could not extract {DEBIAN_SOURCE_TARBALL}: {result.stderr.strip()}")
    partial.rename(target)
    return tree


def _check_build_tools() -> None:
    missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
    if not _LIBELF_HEADER.is_file():
        missing.append("libelf headers")
    if missing:
        raise KvmletError(
            f"missing kernel build tools ({', '.join(missing)}): run `apt-get install "
            f"{' '.join(BUILD_PACKAGES)}`"
        )


def _object_dir_name(source: KernelSource) -> str:
    if source.tree is None:
        return f"obj-{source.version}"
    return "obj-tree-" + hashlib.sha256(str(source.tree).encode()).hexdigest()[:12]


def _build(
    tree: Path, object_dir: Path, output_dir: Path, fragment_text: str, progress: Progress
) -> None:
    object_dir.mkdir(parents=True, exist_ok=True)
    log_path = object_dir.with_name(object_dir.name + ".log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        runner = _MakeRunner(tree, object_dir, log, log_path, progress)
        progress.stage(f"configuring the kernel (tinyconfig + {FRAGMENT_PATH.name})")
        _configure(runner, object_dir)
        _verify_config(object_dir / ".config", fragment_text)  # before minutes of compiling
        jobs = os.cpu_count() or 1
        progress.stage(f"compiling the kernel with make -j{jobs} (log: {log_path})")
        runner.make(f"-j{jobs}", "bzImage", "vmlinux", show_progress=True)
        _verify_config(object_dir / ".config", fragment_text)  # what was actually built
        progress.build_finished()
    seconds = time.monotonic() - started
    _publish(object_dir, output_dir, log_path, fragment_text, seconds)
    progress.stage(f"kernel built in {seconds:.0f} s: {output_dir}")


def _verify_config(config: Path, fragment_text: str) -> None:
    missing = missing_symbols(config.read_text(), fragment_text)
    if missing:
        raise KvmletError(
            f"kernel configuration lacks {', '.join(missing)} (unmet dependencies?): see {config}"
        )


def _configure(runner: _MakeRunner, object_dir: Path) -> None:
    """Regenerates .config; keeps its timestamp when unchanged so make rebuilds nothing."""
    config = object_dir / ".config"
    previous = config.read_bytes() if config.is_file() else None
    previous_stat = config.stat() if config.is_file() else None
    runner.make("tinyconfig")
    runner.run(
        [
            "scripts/kconfig/merge_config.sh",
            "-m",
            "-O",
            str(object_dir),
            str(config),
            str(FRAGMENT_PATH),
        ]
    )
    runner.make("olddefconfig")
    if previous is not None and previous_stat is not None and config.read_bytes() == previous:
        os.utime(config, ns=(previous_stat.st_atime_ns, previous_stat.st_mtime_ns))


def _publish(
    object_dir: Path, output_dir: Path, log_path: Path, fragment_text: str, seconds: float
) -> None:
    """Copies the outputs into the cache atomically (a half-written entry never looks valid)."""
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(object_dir / "arch" / "x86" / "boot" / "bzImage", staging / "bzImage")
    shutil.copyfile(object_dir / "vmlinux", staging / "vmlinux")
    shutil.copyfile(object_dir / ".config", staging / "config")
    shutil.copyfile(log_path, staging / "build.log")
    (staging / "kvmlet.config").write_text(fragment_text)
    (staging / "build.json").write_text(json.dumps({"build_seconds": round(seconds, 1)}) + "\n")
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)


class _MakeRunner:
    """Runs make and helper scripts in the source tree, logging everything to one file."""

    def __init__(self, tree: Path, object_dir: Path, log, log_path: Path, progress: Progress):
        self._tree = tree
        self._object_dir = object_dir
        self._log = log
        self._log_path = log_path
        self._progress = progress
        self._environment = {
            **os.environ,
            "LC_ALL": "C",
            "ARCH": "x86_64",
            "KBUILD_BUILD_USER": "kvmlet",
            "KBUILD_BUILD_HOST": "kvmlet",
        }

    def make(self, *arguments: str, show_progress: bool = False) -> None:
        command = ["make", f"O={self._object_dir}", "ARCH=x86_64", *arguments]
        self.run(command, show_progress=show_progress)

    def run(self, command: list[str], *, show_progress: bool = False) -> None:
        self._log.write(f"$ {' '.join(command)}\n")
        self._log.flush()
        process = subprocess.Popen(
            command,
            cwd=self._tree,
            env=self._environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert process.stdout is not None
        for line in process.stdout:
            self._log.write(line)
            if show_progress:
                self._progress.build_output(line)
        status = process.wait()
        self._log.flush()
        if status != 0:
            self._progress.build_finished()
            raise KvmletError(
                f"kernel build step `{' '.join(command[:4])}` failed (exit {status}): "
                f"see {self._log_path}"
            )
