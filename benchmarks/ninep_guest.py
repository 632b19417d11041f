"""9p seen from the guest, kvmlet against QEMU's virtio-9p; and `kvmlet sandbox -- true`.

Both monitors boot the same kernel (the default guest's vmlinux) with the same initramfs
(kvmlet's root-file-system one) and the host's / as a read-only 9p root under an overlay, plus
a read-write share of a scratch directory at /mnt/bench (9p: msize 512000, no guest cache). The
guest command, each phase timed by the guest's own clock (`date +%s%N`):

    write    dd 64 MiB of zeros into a file in 1 MiB writes, with fsync
    read     dd it back in 1 MiB reads (9p without cache: every read reaches the server)
    meta     create 1,000 empty files (shell redirections), stat them all (ls -l), unlink them
             all (rm): operations per second over the 3,000
    find     find over a tree of 10,000 entries (100 directories of 99 files) made on the host

Runs, interleaved per round (`--only` picks some):

    qemu_9p          QEMU 7.2, `-enable-kvm -M pc -cpu host -m 256M`, `-fsdev local`
                     (security_model=none) and virtio-9p-pci for both shares
    kvmlet_9p        kvmlet's 9p server (in this process) for both shares
    kvmlet_virtiofs  kvmlet with the scratch share served by its own virtiofsd
                     (/usr/lib/qemu/virtiofsd), the root still over 9p
    qemu_true        QEMU booting the same guest to run `true` through the same init (the way
                     `vng -- true` does: a 9p root, a command, power off), process start to exit
    kvmlet_true      kvmlet booting the same, in a process of its own, start to exit
    kvmlet_sandbox_true  `python3 -m kvmlet sandbox -- true`, process start to exit status

Each run prints a record on stderr as it ends (figures, wall time, how the guest stopped, and
for kvmlet the counters each phase moved: exits, the shares' requests and interrupts, CPU time
of the process and of its virtio threads); the medians and their ratios to QEMU's go to stdout
as JSON lines: {"case", "value", "ratio_to_qemu", "samples", "rounds"}. `--mib`, `--files`,
`--directories` and `--files-per-directory` shrink the work for debugging.

Where guest user space cannot run (our machines' software KVM) the script runs itself inside
the test box. Usage: python3 benchmarks/ninep_guest.py [--rounds 3] [--only RUN,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from box_relay import needs_test_box, run_in_test_box  # noqa: E402  (beside this script)

from kvmlet.guest import QuietProgress, ensure_default_guest  # noqa: E402
from kvmlet.guest.run_protocol import parse_exit_status, run_parameter  # noqa: E402
from kvmlet.machine.config import MachineConfig, ShareConfig  # noqa: E402
from kvmlet.machine.machine import Machine  # noqa: E402
from kvmlet.machine.shares import (  # noqa: E402
    GUEST_MOUNT_OPTIONS,
    ROOT_TAG,
    root_parameters,
    with_root_share,
)
from kvmlet.machine.vhost_config import FilesystemConfig  # noqa: E402

RUN_TIMEOUT = 900.0
"""Seconds one guest run may take (the test box's Python is 10-20x slower than the host's)."""
TAG = "bench"
NINEP_MOUNT = f"mount -t 9p -o {GUEST_MOUNT_OPTIONS} {TAG} /mnt/bench"
VIRTIOFS_MOUNT = f"mount -t virtiofs {TAG} /mnt/bench"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
RUNS = (
    "qemu_9p",
    "kvmlet_9p",
    "kvmlet_virtiofs",
    "qemu_true",
    "kvmlet_true",
    "kvmlet_sandbox_true",
)
RESULT = re.compile(rb"ninep-bench: (\w+) (\d+)")
KEPT_COUNTERS = ("vcpus.", "virtio.virtio-9p", "virtio.vhost-user-fs")
"""kvmlet's counters a run's record keeps per phase: exits, the shares' queues and servers."""


@dataclass(frozen=True)
class Sizes:
    """What the guest command works on: the file, the metadata files, the find tree."""

    mib: int = 64
    files: int = 1000
    directories: int = 100
    files_per_directory: int = 99

    @property
    def tree_entries(self) -> int:
        return self.directories * (self.files_per_directory + 1) + 1


def guest_script(mount: str, sizes: Sizes) -> str:
    """The guest's command: mount the share, then each phase timed by the guest's clock."""
    return f"""\
set -e
now() {{ date +%s%N; }}
mkdir -p /mnt/bench
{mount}
cd /mnt/bench
echo "ninep-bench: ready 0"
t0=$(now); dd if=/dev/zero of=big bs=1M count={sizes.mib} conv=fsync 2>/dev/null; t1=$(now)
echo "ninep-bench: write $((t1 - t0))"
t0=$(now); dd if=big of=/dev/null bs=1M 2>/dev/null; t1=$(now)
echo "ninep-bench: read $((t1 - t0))"
rm big
mkdir meta && cd meta
t0=$(now)
i=0; while [ $i -lt {sizes.files} ]; do : > f$i; i=$((i + 1)); done
ls -l >/dev/null
rm -f f*
t1=$(now)
cd .. && rmdir meta
echo "ninep-bench: meta $((t1 - t0))"
t0=$(now); n=$(find tree | wc -l); t1=$(now)
echo "ninep-bench: find $((t1 - t0))"
echo "ninep-bench: entries $n"
"""


def make_tree(path: Path, sizes: Sizes) -> None:
    for directory in range(sizes.directories):
        folder = path / f"d{directory}"
        folder.mkdir(parents=True)
        for index in range(sizes.files_per_directory):
            (folder / f"f{index}").touch()


def kernel_parameters(command: str) -> str:
    return " ".join(
        [
            "console=ttyS0 reboot=k panic=-1 quiet",
            *root_parameters(ROOT_TAG),
            "kvmlet.rootfs=overlay",
            run_parameter(command),
        ]
    )


def flat_counters(stats: object, prefix: str = "") -> dict[str, float]:
    """kvmlet's statistics dump as {dotted.path: number}."""
    if isinstance(stats, dict):
        items = stats.items()
    elif isinstance(stats, list):
        items = enumerate(stats)
    else:
        return {prefix: stats} if isinstance(stats, int | float) else {}
    found: dict[str, float] = {}
    for key, value in items:
        found.update(flat_counters(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def kvmlet_snapshot(machine: Machine) -> dict[str, float]:
    """The machine's counters, the process's CPU time and its virtio threads' CPU time."""
    snapshot = {
        key: value
        for key, value in flat_counters(machine.stats()).items()
        if key.startswith(KEPT_COUNTERS) and not key.endswith(("fids", "msize"))
    }
    snapshot["cpu_s"] = time.process_time()
    clock_ticks = os.sysconf("SC_CLK_TCK")
    for thread in threading.enumerate():
        if thread.name.startswith("virtio") and thread.native_id is not None:
            with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            name = f"thread_cpu_s.{thread.name}"
            snapshot[name] = (
                snapshot.get(name, 0) + (int(fields[11]) + int(fields[12])) / clock_ticks
            )
    return snapshot


def phase_counters(machine: Machine, deadline: float) -> dict[str, dict[str, float]]:
    """Follows the console while the guest runs: at each phase's result line, what kvmlet's
    counters moved since the previous one (only the counters that moved)."""
    previous, seen, moved = kvmlet_snapshot(machine), 0, {}
    while machine.running and time.monotonic() < deadline:
        results = RESULT.findall(machine.console.transcript())
        for name, _ in results[seen:]:
            current = kvmlet_snapshot(machine)
            moved[name.decode()] = {
                key: round(value - previous.get(key, 0), 3)
                for key, value in current.items()
                if value != previous.get(key, 0)
            }
            previous = current
        seen = len(results)
        time.sleep(0.2)
    return moved


def run_kvmlet(guest, scratch: Path, command: str, virtiofs: bool = False) -> dict:
    started = time.monotonic()
    config = MachineConfig(
        kernel=guest.vmlinux,
        shares=() if virtiofs else (ShareConfig(scratch, TAG),),
        filesystems=(FilesystemConfig(TAG, source=scratch),) if virtiofs else (),
        virtiofsd=VIRTIOFSD if virtiofs else None,
        extra_parameters=("quiet", run_parameter(command)),
    )
    with Machine(with_root_share(config, "/")) as machine:
        counters = phase_counters(machine, started + RUN_TIMEOUT)
        stop = machine.wait(max(0.0, started + RUN_TIMEOUT - time.monotonic()))
        transcript = machine.console.transcript()
    return {
        "transcript": transcript,
        "wall_s": time.monotonic() - started,
        "stop": stop.reason.name,
        "counters": counters,
    }


def run_qemu(guest, scratch: Path | None, command: str) -> dict:
    fsdev = "local,security_model=none,multidevs=remap"
    qemu = [
        *("qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-cpu", "host", "-m", "256M"),
        *("-nographic", "-no-reboot", "-kernel", str(guest.vmlinux)),
        *("-initrd", str(guest.rootfs_initrd), "-append", kernel_parameters(command)),
        *("-fsdev", f"{fsdev},id=root,path=/,readonly=on"),
        *("-device", f"virtio-9p-pci,fsdev=root,mount_tag={ROOT_TAG}"),
    ]
    if scratch:
        qemu += ["-fsdev", f"{fsdev},id=bench,path={scratch}"]
        qemu += ["-device", f"virtio-9p-pci,fsdev=bench,mount_tag={TAG}"]
    started = time.monotonic()
    try:
        result = subprocess.run(
            qemu, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT, check=False
        )
        transcript, stop = result.stdout, f"exit {result.returncode}"
    except subprocess.TimeoutExpired as expired:
        transcript, stop = expired.stdout or b"", "TIMEOUT"
    return {"transcript": transcript, "wall_s": time.monotonic() - started, "stop": stop}


def phases(run: dict, variant: str, sizes: Sizes) -> dict[str, float]:
    """The phases' figures from a guest run's console; RuntimeError when the command failed."""
    transcript = run["transcript"]
    found = {name.decode(): int(value) for name, value in RESULT.findall(transcript)}
    if parse_exit_status(transcript) != 0 or found.get("entries") != sizes.tree_entries:
        raise RuntimeError(
            f"the guest command failed under {variant} ({run['stop']}, "
            f"{run['wall_s']:.0f} s):\n{transcript[-3000:]!r}"
        )
    return {
        "write_mibps": sizes.mib / (found["write"] / 1e9),
        "read_mibps": sizes.mib / (found["read"] / 1e9),
        "meta_ops_per_s": 3 * sizes.files / (found["meta"] / 1e9),
        "find_entries_per_s": sizes.tree_entries / (found["find"] / 1e9),
    }


def timed_run(what: str, command: list[str], **options) -> tuple[float, str]:
    """Run `command` to its exit, stdin closed and output captured; its wall seconds and
    standard output (RuntimeError naming `what` if it fails)."""
    started = time.monotonic()
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        **options,
    )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{what}: status {result.returncode}: {result.stderr!r}")
    return seconds, result.stdout


def sandbox_true() -> dict:
    seconds, _ = timed_run(
        "kvmlet sandbox -- true",
        [sys.executable, "-m", "kvmlet", "sandbox", "--", "true"],
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
    )
    return {"wall_s": seconds}


def kvmlet_true() -> dict:
    """`true` booted the way the QEMU peer boots it (same init, command and root share, none
    of the sandbox's agent, control share or working-directory share): a process of its own,
    start to exit, with the 9p requests the root share served."""
    seconds, output = timed_run(
        "kvmlet booting `true`", [sys.executable, str(Path(__file__).resolve()), "--boot-true"]
    )
    return {"wall_s": seconds, **json.loads(output)}


def boot_true() -> int:
    """The child of `kvmlet_true`."""
    guest = ensure_default_guest(progress=QuietProgress())
    config = MachineConfig(kernel=guest.vmlinux, extra_parameters=("quiet", run_parameter("true")))
    with Machine(with_root_share(config, "/")) as machine:
        machine.wait(RUN_TIMEOUT)
        counters = flat_counters(machine.stats())
        transcript = machine.console.transcript()
    if parse_exit_status(transcript) != 0:
        print(f"`true` failed under kvmlet: {transcript[-3000:]!r}", file=sys.stderr)
        return 1
    root = {key: value for key, value in counters.items() if key.startswith("virtio.virtio-9p")}
    emit({"root_share_requests": sum(v for k, v in root.items() if k.endswith("server.requests"))})
    return 0


def qemu_true(guest) -> dict:
    run = run_qemu(guest, None, "true")
    if parse_exit_status(run["transcript"]) != 0:
        raise RuntimeError(
            f"`true` failed under QEMU ({run['stop']}):\n{run['transcript'][-3000:]!r}"
        )
    return {"wall_s": run["wall_s"]}


def measure(args: argparse.Namespace) -> None:
    guest = ensure_default_guest(progress=QuietProgress())
    sizes = Sizes(args.mib, args.files, args.directories, args.files_per_directory)
    emit({"case": "environment", "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]})
    variants = {
        "qemu_9p": lambda scratch: run_qemu(guest, scratch, guest_script(NINEP_MOUNT, sizes)),
        "kvmlet_9p": lambda scratch: run_kvmlet(guest, scratch, guest_script(NINEP_MOUNT, sizes)),
        "kvmlet_virtiofs": lambda scratch: run_kvmlet(
            guest, scratch, guest_script(VIRTIOFS_MOUNT, sizes), virtiofs=True
        ),
    }
    boots = {
        "qemu_true": lambda: qemu_true(guest),
        "kvmlet_true": kvmlet_true,
        "kvmlet_sandbox_true": sandbox_true,
    }
    chosen = args.only.split(",") if args.only else [*variants, *boots]
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmlet-9p-bench-") as directory:
        scratch = Path(directory)
        make_tree(scratch / "tree", sizes)
        for round_number in range(args.rounds):
            for variant in chosen:
                if variant in boots:
                    run = boots[variant]()
                    figures = {"wall_s": run.pop("wall_s")}
                else:
                    run = variants[variant](scratch)
                    figures = phases(run, variant, sizes)
                for case, value in figures.items():
                    samples.setdefault((variant, case), []).append(value)
                run.pop("transcript", None)
                emit({"run": variant, "round": round_number, **figures, **run}, sys.stderr)
    report(samples, args.rounds)


def report(samples: dict[tuple[str, str], list[float]], rounds: int) -> None:
    """Medians, each against QEMU's median of the same case."""
    for (variant, case), values in samples.items():
        peer = samples.get(("qemu_true" if case == "wall_s" else "qemu_9p", case))
        value = statistics.median(values)
        emit(
            {
                "case": f"{variant}_{case}",
                "value": round(value, 3),
                "ratio_to_qemu": round(value / statistics.median(peer), 3) if peer else None,
                "samples": [round(sample, 3) for sample in values],
                "rounds": rounds,
            }
        )


def emit(record: dict, stream=sys.stdout) -> None:
    print(json.dumps(record), file=stream, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per monitor")
    parser.add_argument("--here", action="store_true", help="run on this host's KVM")
    parser.add_argument("--boot-true", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated runs: " + ", ".join(RUNS))
    parser.add_argument("--mib", type=int, default=64, help="size of the sequential file")
    parser.add_argument("--files", type=int, default=1000, help="files of the metadata phase")
    parser.add_argument("--directories", type=int, default=100, help="directories of the tree")
    parser.add_argument("--files-per-directory", type=int, default=99)
    args = parser.parse_args()
    if args.boot_true:
        return boot_true()
    if needs_test_box(args.here):
        return run_in_test_box(__file__, sys.argv[1:], timeout=1500)
    if shutil.which("qemu-system-x86_64") is None:
        print("ninep_guest: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 1
    started = time.monotonic()
    measure(args)
    print(f"ninep_guest: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
