"""9p seen from the guest, kvmlet against QEMU's virtio-9p; and `kvmlet sandbox -- true`.

Both monitors boot the same kernel (the default guest's vmlinux) with the same initramfs
(kvmlet's root-file-system one) and the host's / as a read-only 9p root under an overlay, plus
a read-write 9p share of a scratch directory at /mnt/bench (msize 512000, no guest cache). The
guest command, timed by the guest's own clock (`date +%s%N`):

    write    dd 64 MiB of zeros into a file in 1 MiB writes, with fsync
    read     dd it back in 1 MiB reads (9p without cache: every read reaches the server)
    meta     create 1,000 empty files (shell redirections), stat them all (ls -l), unlink them
             all (rm): operations per second over the 3,000
    find     find over a tree of 10,000 entries (100 directories of 99 files) made on the host

QEMU 7.2: `qemu-system-x86_64 -enable-kvm -M pc -cpu host -m 256M -fsdev local,...,
security_model=none -device virtio-9p-pci,...` for both shares. Interleaved rounds (QEMU,
kvmlet), medians.

The sandbox case is the wall time of `python3 -m kvmlet sandbox -- true` (process start to
exit status), against QEMU booting the same guest to run `true` through the same init (the way
`vng -- true` does: a 9p root, a command, power off), process start to exit.

Where guest user space cannot run (our machines' software KVM) the script runs itself inside
the test box. Prints JSON lines: {"case", "value", "unit", "ratio_to_qemu", "samples", ...}.
Usage: python3 benchmarks/ninep_guest.py [--rounds 3]
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
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

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
from kvmlet.vstate.host_profile import detect  # noqa: E402

BOOT_TIMEOUT = 300.0
TAG = "bench"
FILES = 1000
TREE_DIRECTORIES, TREE_FILES = 100, 99
GUEST_SCRIPT = f"""\
set -e
now() {{ date +%s%N; }}
mkdir -p /mnt/bench
mount -t 9p -o {GUEST_MOUNT_OPTIONS} {TAG} /mnt/bench
cd /mnt/bench
t0=$(now); dd if=/dev/zero of=big bs=1M count=64 conv=fsync 2>/dev/null; t1=$(now)
echo "ninep-bench: write $((t1 - t0))"
t0=$(now); dd if=big of=/dev/null bs=1M 2>/dev/null; t1=$(now)
echo "ninep-bench: read $((t1 - t0))"
rm big
mkdir meta && cd meta
t0=$(now)
i=0; while [ $i -lt {FILES} ]; do : > f$i; i=$((i + 1)); done
ls -l >/dev/null
rm -f f*
t1=$(now)
cd .. && rmdir meta
echo "ninep-bench: meta $((t1 - t0))"
t0=$(now); n=$(find tree | wc -l); t1=$(now)
echo "ninep-bench: find $((t1 - t0)) $n"
"""
CASES = ("write_mibps", "read_mibps", "meta_ops_per_s", "find_entries_per_s", "true_wall_s")
RESULT = re.compile(rb"ninep-bench: (\w+) (\d+)")


def make_tree(path: Path) -> None:
    for directory in range(TREE_DIRECTORIES):
        folder = path / f"d{directory}"
        folder.mkdir(parents=True)
        for index in range(TREE_FILES):
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


def run_kvmlet(guest, scratch: Path, command: str) -> tuple[bytes, float]:
    started = time.monotonic()
    config = MachineConfig(
        kernel=guest.vmlinux,
        shares=(ShareConfig(scratch, TAG),) if scratch else (),
        extra_parameters=("quiet", run_parameter(command)),
    )
    with Machine(with_root_share(config, "/")) as machine:
        machine.wait(BOOT_TIMEOUT)
        transcript = machine.console.transcript()
    return transcript, time.monotonic() - started


def run_qemu(guest, scratch: Path | None, command: str) -> tuple[bytes, float]:
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
    result = subprocess.run(
        qemu, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT, check=False
    )
    return result.stdout, time.monotonic() - started


def phases(transcript: bytes, monitor: str) -> dict[str, float]:
    if parse_exit_status(transcript) != 0:
        raise RuntimeError(f"the guest command failed under {monitor}:\n{transcript[-3000:]!r}")
    found = {name.decode(): int(value) / 1e9 for name, value in RESULT.findall(transcript)}
    return {
        "write_mibps": 64 / found["write"],
        "read_mibps": 64 / found["read"],
        "meta_ops_per_s": 3 * FILES / found["meta"],
        "find_entries_per_s": (TREE_DIRECTORIES * (TREE_FILES + 1) + 1) / found["find"],
    }


def sandbox_true() -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "kvmlet", "sandbox", "--", "true"],
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
        stdin=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - started


def measure(rounds: int) -> None:
    guest = ensure_default_guest(progress=QuietProgress())
    emit({"case": "environment", "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]})
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmlet-9p-bench-") as directory:
        scratch = Path(directory)
        make_tree(scratch / "tree")
        for _ in range(rounds):
            for monitor, run in (("qemu", run_qemu), ("kvmlet", run_kvmlet)):
                transcript, _ = run(guest, scratch, GUEST_SCRIPT)
                for case, value in phases(transcript, monitor).items():
                    samples.setdefault((monitor, case), []).append(value)
            transcript, seconds = run_qemu(guest, None, "true")
            if parse_exit_status(transcript) != 0:
                raise RuntimeError(f"`true` failed under QEMU:\n{transcript[-3000:]!r}")
            samples.setdefault(("qemu", "true_wall_s"), []).append(seconds)
            samples.setdefault(("kvmlet", "true_wall_s"), []).append(sandbox_true())
    for case in (
        "write_mibps",
        "read_mibps",
        "meta_ops_per_s",
        "find_entries_per_s",
        "true_wall_s",
    ):
        qemu = statistics.median(samples[("qemu", case)])
        for monitor in ("qemu", "kvmlet"):
            values = samples[(monitor, case)]
            value = statistics.median(values)
            emit(
                {
                    "case": f"{monitor}_{case}",
                    "value": round(value, 3),
                    "ratio_to_qemu": round(value / qemu, 3),
                    "samples": [round(sample, 3) for sample in values],
                    "rounds": rounds,
                }
            )


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_in_test_box(argv: list[str]) -> int:
    command = [sys.executable, str(CHECKOUT / "testbox" / "run.py"), "--timeout", "1500", "--"]
    command += ["python3", str(Path(__file__).resolve()), "--here", *argv]
    return subprocess.run(command, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per monitor")
    parser.add_argument("--here", action="store_true", help="run on this host's KVM")
    args = parser.parse_args()
    if not args.here and detect().name != "none" and os.environ.get("KVMLET_TESTBOX") != "1":
        return run_in_test_box(sys.argv[1:])
    if shutil.which("qemu-system-x86_64") is None:
        print("ninep_guest: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 1
    started = time.monotonic()
    measure(args.rounds)
    print(f"ninep_guest: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
