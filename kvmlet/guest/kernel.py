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

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmlet.errors import KvmletError
from kvmlet.guest.cache import cache_lock, cache_root, format_bytes, rebuild_only_size
from kvmlet.guest.progress import Progress, StepProfile

FRAGMENT_PATH = Path(__file__).with_name("kvmlet.config")
DEBIAN_SOURCE_PACKAGE = "linux-source-6.1"
DEBIAN_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_PACKAGES = ("build-essential", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "lz4")
_TOOL_PACKAGES = {
    "make": "build-essential",
    "gcc": "build-essential",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "lz4": "lz4",
    "perl": "perl",
}
"""The commands a kernel build runs, and the Debian package of each."""
_LIBELF_HEADER = Path("/usr/include/gelf.h")
PROFILE_FILE = "kernel-build-profile.json"
"""In the cache: the step profile of the last full kernel build, for the next one's estimate."""

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


def missing_packages(source: Path | None) -> list[str]:
    """Debian packages a build of the default guest kernel needs and this host lacks; none
    when the kernel built from Debian's source is already cached (nothing is built then)."""
    if source is None and not DEBIAN_SOURCE_TARBALL.is_file():
        return [DEBIAN_SOURCE_PACKAGE, *_missing_tool_packages(extracting=True)]
    if source is None:
        version = _debian_source_version()
        if _is_complete(_debian_build(version)):
            return []
        return _missing_tool_packages(extracting=not _debian_tree(version).is_dir())
    return _missing_tool_packages(extracting=False)


def _missing_tool_packages(*, extracting: bool) -> list[str]:
    tools = dict(_TOOL_PACKAGES, **({"xz": "xz-utils"} if extracting else {}))
    packages = [package for tool, package in tools.items() if shutil.which(tool) is None]
    if not _LIBELF_HEADER.is_file():
        packages.append("libelf-dev")
    return list(dict.fromkeys(packages))


def ensure_kernel(source: Path | None, progress: Progress) -> KernelBuild:
    """The default guest kernel, built now if the cache does not hold it yet."""
    kernel_source = _resolve_source(source)
    fragment_text = FRAGMENT_PATH.read_text()
    output_dir = cache_root() / "kernel" / kernel_cache_key(fragment_text, kernel_source.version)
    build = KernelBuild(output_dir / "bzImage", output_dir / "vmlinux", output_dir / "config")
    if kernel_source.is_debian_package and _is_complete(build):
        return build
    with cache_lock():
        if kernel_source.is_debian_package and _is_complete(build):
            return build
        _check_build_tools()
        tree = kernel_source.tree or _extract_debian_source(kernel_source.version, progress)
        object_dir = cache_root() / "build" / _object_dir_name(kernel_source)
        _build(tree, object_dir, output_dir, fragment_text, progress)
        progress.stage(
            f"kept {format_bytes(rebuild_only_size())} of extracted source and build objects "
            f"in {cache_root()} for faster rebuilds; `kvmlet build-guest --clean` removes them"
        )
    return build


def current_kernel_dir() -> Path | None:
    """The cache entry of the default guest built from Debian's source with this fragment,
    or None when the source package is not installed (its version is then unknown)."""
    if not DEBIAN_SOURCE_TARBALL.is_file():
        return None
    return _debian_build(_debian_source_version()).bzimage.parent


def _debian_build(version: str) -> KernelBuild:
    key = kernel_cache_key(FRAGMENT_PATH.read_text(), version)
    output_dir = cache_root() / "kernel" / key
    return KernelBuild(output_dir / "bzImage", output_dir / "vmlinux", output_dir / "config")


def _is_complete(build: KernelBuild) -> bool:
    return all(path.is_file() for path in (build.bzimage, build.vmlinux, build.config))


def _resolve_source(source: Path | None) -> KernelSource:
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
        raise KvmletError(
            f"no Linux source to build the default guest: run `apt-get install "
            f"{DEBIAN_SOURCE_PACKAGE}` or pass --source DIR"
        )
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


def apt_install(packages: list[str], progress: Progress) -> None:
    """`apt-get install PACKAGES` (root only), or a KvmletError saying what to run."""
    if os.geteuid() != 0:
        raise KvmletError(
            f"installing what the default guest needs takes root: run `sudo apt-get install "
            f"{' '.join(packages)}`"
        )
    progress.stage(f"installing {' '.join(packages)} with apt-get")
    result = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages], check=False
    )
    if result.returncode != 0:
        raise KvmletError(f"apt-get install {' '.join(packages)} failed (see its output above)")


def _debian_tree(version: str) -> Path:
    return cache_root() / "source" / version / "linux-source-6.1"


def _extract_debian_source(version: str, progress: Progress) -> Path:
    """Unpacks the Debian tarball once per package version; returns the tree."""
    tree = _debian_tree(version)
    target = tree.parent
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
    missing = _missing_tool_packages(extracting=False)
    if missing:
        raise KvmletError(f"missing kernel build tools: run `apt-get install {' '.join(missing)}`")


def _object_dir_name(source: KernelSource) -> str:
    if source.tree is None:
        return f"obj-{source.version}"
    return "obj-tree-" + hashlib.sha256(str(source.tree).encode()).hexdigest()[:12]


def _build(
    tree: Path, object_dir: Path, output_dir: Path, fragment_text: str, progress: Progress
) -> None:
    full_build = not (object_dir / "vmlinux").is_file()  # else make redoes only what changed
    object_dir.mkdir(parents=True, exist_ok=True)
    log_path = object_dir.with_name(object_dir.name + ".log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        runner = _MakeRunner(tree, object_dir, log, log_path, progress)
        progress.stage(f"configuring the kernel (tinyconfig + {FRAGMENT_PATH.name})")
        _configure(runner, object_dir)
        _verify_config(object_dir / ".config", fragment_text)  # before minutes of compiling
        jobs = os.cpu_count() or 1
        kind = "" if full_build else " (again: only what changed)"
        progress.stage(f"compiling the kernel{kind} with make -j{jobs} (log: {log_path})")
        progress.build_started(_previous_profile() if full_build else None)
        step_times = runner.make(f"-j{jobs}", "bzImage", "vmlinux", show_progress=True)
        _verify_config(object_dir / ".config", fragment_text)  # what was actually built
        progress.build_finished()
    seconds = time.monotonic() - started
    profile = StepProfile.record(step_times) if full_build else None
    if profile is not None:
        (cache_root() / PROFILE_FILE).write_text(json.dumps(profile.to_json()) + "\n")
    _publish(object_dir, output_dir, log_path, fragment_text, seconds)
    progress.stage(f"kernel built in {seconds:.0f} s: {output_dir}")


def _previous_profile() -> StepProfile | None:
    try:
        return StepProfile.from_json(json.loads((cache_root() / PROFILE_FILE).read_text()))
    except (OSError, ValueError):
        return None


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

    def make(self, *arguments: str, show_progress: bool = False) -> list[float]:
        command = ["make", f"O={self._object_dir}", "ARCH=x86_64", *arguments]
        return self.run(command, show_progress=show_progress)

    def run(self, command: list[str], *, show_progress: bool = False) -> list[float]:
        """Run `command`; with `show_progress`, pass its lines on and return when each came
        (seconds since the start)."""
        self._log.write(f"$ {' '.join(command)}\n")
        self._log.flush()
        started = time.monotonic()
        step_times: list[float] = []
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
                step_times.append(time.monotonic() - started)
                self._progress.build_output(line)
        status = process.wait()
        self._log.flush()
        if status != 0:
            self._progress.build_finished()
            raise KvmletError(
                f"kernel build step `{' '.join(command[:4])}` failed (exit {status}): "
                f"see {self._log_path}"
            )
        return step_times
