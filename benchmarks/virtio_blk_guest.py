"""virtio-blk throughput seen from the guest: kvmlet against QEMU, same kernel, same image.

In the default guest, a tiny static C program (compiled here, added to a copy of the default
initrd as a second cpio archive) reads /dev/vda sequentially in 1 MiB requests, writes it in 1
MiB requests, and reads 4 KiB blocks at random aligned offsets, one at a time and then 8 at
once (Linux AIO), all with O_DIRECT so every request reaches the virtio-blk device; each phase
runs for a fixed time and the guest reports bytes, requests and seconds by its own clock. The
same guest command runs under kvmlet (virtio over PCI, then MMIO) and under `qemu-system-x86_64
-enable-kvm` with virtio-blk-pci, on a fresh image of the same size for each run, interleaved
(QEMU, kvmlet-pci, kvmlet-mmio, repeated) so a slow phase of the host hits every one of them.

The guest waits for a console line before each phase, so the host reads counters around each
phase alone: for both monitors the CPU time of their process (in the guest, user, system: the
box has one CPU, so throughput is about 1 / CPU time per request); for kvmlet also its virtio
worker threads' CPU time and the monitor's own counters (`Machine.stats()`): block requests,
doorbell ("notify") exits and every user-space exit (port I/O and MMIO accesses that reached
the bus) per device request.

Where guest user space cannot run (our machines' software KVM) the script runs itself inside
the test box (testbox/run.py: a QEMU TCG L1 with a working KVM), where both monitors share the
same nested KVM. The image sits on L1's tmpfs, which refuses O_DIRECT, so both monitors use the
host page cache (QEMU `cache=writeback`, kvmlet without `direct`); the guest still bypasses its
own cache.

Prints JSON lines: {"case", "value", "unit", "ratio_to_qemu", ...}.
Usage: python3 benchmarks/virtio_blk_guest.py [--seconds 3] [--rounds 3] [--image-mib 64]
       [--transports pci,mmio]
"""

from __future__ import annotations

import argparse
import io
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
from collections import Counter
from dataclasses import replace
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from box_relay import needs_test_box, run_in_test_box  # noqa: E402  (beside this script)
from qemu_console import QemuConsole  # noqa: E402  (beside this script)

from kvmlet.guest import QuietProgress, ensure_default_guest, parse_exit_status, run_parameter  # noqa: E402
from kvmlet.guest.cpio import CpioWriter  # noqa: E402
from kvmlet.machine.config import (  # noqa: E402
    DiskConfig,
    MachineConfig,
    with_default_guest,
)
from kvmlet.machine.machine import Machine  # noqa: E402

MIB = 1 << 20
GUEST_PROGRAM = "/bin/blkbench"
BOOT_TIMEOUT = 300.0
QUEUE_DEPTH = 8
PHASES = (
    ("seqread", 1 * MIB),
    ("seqwrite", 1 * MIB),
    ("randread", 4096),
    (f"randread_qd{QUEUE_DEPTH}", 4096),
)
RESULT = re.compile(
    r"blkbench: (?P<mode>\w+) bytes=(?P<bytes>\d+) requests=(?P<requests>\d+) "
    r"seconds=(?P<seconds>[\d.]+)"
)

BLKBENCH_C = r"""
/* Times O_DIRECT requests on a block device: sequential read or write, or random reads, one
 * at a time or (randread_qdN) N in flight at once through Linux AIO. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t state = 0x9e3779b97f4a7c15ULL;

static long random_block(long blocks) {
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (long)(state % (uint64_t)blocks);
}

static int queued_reads(int fd, long block, long blocks, double seconds, int depth,
                        uint64_t *requests, double *elapsed) {
    aio_context_t context = 0;
    struct iocb blocks_in_flight[MAX_DEPTH], *submitted[MAX_DEPTH];
    struct io_event events[MAX_DEPTH];
    if (syscall(SYS_io_setup, depth, &context) < 0) { perror("io_setup"); return 1; }
    for (int i = 0; i < depth; i++) {
        void *buffer;
        if (posix_memalign(&buffer, 4096, block)) return 1;
        memset(&blocks_in_flight[i], 0, sizeof blocks_in_flight[i]);
        blocks_in_flight[i].aio_fildes = fd;
        blocks_in_flight[i].aio_lio_opcode = IOCB_CMD_PREAD;
        blocks_in_flight[i].aio_buf = (uint64_t)(uintptr_t)buffer;
        blocks_in_flight[i].aio_nbytes = block;
        blocks_in_flight[i].aio_offset = (int64_t)random_block(blocks) * block;
        submitted[i] = &blocks_in_flight[i];
    }
    double start = now();
    if (syscall(SYS_io_submit, context, depth, submitted) != depth) {
        perror("io_submit");
        return 1;
    }
    long in_flight = depth;
    int stopping = 0;
    while (in_flight) {
        long done = syscall(SYS_io_getevents, context, 1, depth, events, NULL);
        if (done < 0) { perror("io_getevents"); return 1; }
        in_flight -= done;
        *elapsed = now() - start;
        stopping = stopping || *elapsed >= seconds;
        for (long i = 0; i < done; i++) {
            if (events[i].res != block) { fprintf(stderr, "short read\n"); return 1; }
            (*requests)++;
            if (stopping) continue;
            struct iocb *again = (struct iocb *)(uintptr_t)events[i].obj;
            again->aio_offset = (int64_t)random_block(blocks) * block;
            if (syscall(SYS_io_submit, context, 1, &again) != 1) { perror("io_submit"); return 1; }
            in_flight++;
        }
    }
    *elapsed = now() - start;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: blkbench seqread|seqwrite|randread|randread_qdN DEVICE BLOCK"
                        " SECONDS\n");
        return 2;
    }
    const char *mode = argv[1];
    long block = atol(argv[3]);
    double seconds = atof(argv[4]);
    int writing = strcmp(mode, "seqwrite") == 0;
    int random_access = strncmp(mode, "randread", 8) == 0;
    int depth = strncmp(mode, "randread_qd", 11) == 0 ? atoi(mode + 11) : 1;
    int fd = open(argv[2], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    off_t size = lseek(fd, 0, SEEK_END);
    long blocks = size / block;
    void *buffer;
    if (blocks <= 0 || depth < 1 || depth > MAX_DEPTH || posix_memalign(&buffer, 4096, block)) {
        fprintf(stderr, "bad device size, block or depth\n");
        return 1;
    }
    memset(buffer, 0x5a, block);
    uint64_t requests = 0;
    long next = 0;
    double elapsed = 0;
    if (depth > 1) {
        if (queued_reads(fd, block, blocks, seconds, depth, &requests, &elapsed)) return 1;
    } else {
        double start = now();
        while (elapsed < seconds) {
            long index = random_access ? random_block(blocks) : next;
            next = (next + 1) % blocks;
            ssize_t done = writing ? pwrite(fd, buffer, block, (off_t)index * block)
                                   : pread(fd, buffer, block, (off_t)index * block);
            if (done != block) { perror("io"); return 1; }
            requests++;
            elapsed = now() - start;
        }
    }
    printf("blkbench: %s bytes=%llu requests=%llu seconds=%.6f\n", mode,
           (unsigned long long)(requests * block), (unsigned long long)requests, elapsed);
    return 0;
}
"""

# -- the guest side -------------------------------------------------------------------------


def build_initrd(work: Path, base_initrd: Path) -> Path:
    """A copy of the default initrd with the benchmark program appended as a second archive."""
    source = work / "blkbench.c"
    program = work / "blkbench"
    source.write_text(BLKBENCH_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(program), str(source)], check=True)
    extra = io.BytesIO()
    writer = CpioWriter(extra)
    writer.add_file(GUEST_PROGRAM, program.read_bytes(), mode=0o755)
    writer.finish()
    initrd = work / "initrd.cpio"
    initrd.write_bytes(base_initrd.read_bytes() + extra.getvalue())
    return initrd


def guest_command(seconds: float, gated: bool) -> str:
    """The shell line the guest runs: each phase, optionally waiting for a console line first
    (so the host can read the monitor's counters around the phase alone)."""
    steps = []
    for mode, block in PHASES:
        if gated:
            steps.append(f"echo blkbench-ready {mode}; read -r _")
        steps.append(f"{GUEST_PROGRAM} {mode} /dev/vda {block} {seconds}")
    if gated:
        steps.append("echo blkbench-ready end; read -r _")
    return " && ".join(steps)


def make_image(path: Path, size: int) -> Path:
    """An image of random-looking data: one random MiB, stamped with each MiB's index (fresh
    random bytes for all of it take seconds of emulated ChaCha in the test box)."""
    pattern = bytearray(os.urandom(MIB))
    with path.open("wb") as image:
        for index in range(size // MIB):
            pattern[:8] = index.to_bytes(8, "little")
            image.write(pattern)
    return path


def parse_results(text: str) -> dict[str, dict[str, float]]:
    return {
        match["mode"]: {
            "bytes": int(match["bytes"]),
            "requests": int(match["requests"]),
            "seconds": float(match["seconds"]),
        }
        for match in RESULT.finditer(text)
    }


# -- the two monitors -----------------------------------------------------------------------


def counter_snapshot(stats: dict) -> Counter:
    """The monitor's counters that matter here: user-space exits by bus region (every port
    I/O and MMIO access that reached the bus is one exit), block requests and notify exits."""
    snapshot: Counter = Counter()
    for space in ("port_io", "mmio"):
        for name, counters in stats[space]["regions"].items():
            snapshot[f"{space}:{name}"] = counters["reads"] + counters["writes"]
        snapshot[f"{space}:unassigned"] = stats[space]["unassigned_total"]
    for name, device in stats["virtio"].items():
        if name.startswith("virtio-blk"):
            snapshot["requests"] += sum(queue["requests"] for queue in device["queues"])
            snapshot["notify_exits"] += device["notify_exits"]
    return snapshot


def cpu_snapshot(stat_path: str) -> Counter:
    """CPU seconds of a process or thread from its /proc stat file: time in the guest
    (KVM_RUN), user time outside the guest, and system time."""
    with open(stat_path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    user, system, guest = int(fields[11]), int(fields[12]), int(fields[40])
    return Counter(
        {
            "cpu_guest": guest / ticks,
            "cpu_user": (user - guest) / ticks,
            "cpu_system": system / ticks,
        }
    )


def kvmlet_snapshot(machine: Machine) -> Counter:
    """kvmlet's counters plus the CPU time of the process and of its virtio worker threads."""
    snapshot = counter_snapshot(machine.stats())
    snapshot.update(cpu_snapshot("/proc/self/stat"))
    for thread in threading.enumerate():
        if thread.name.startswith("virtio") and thread.native_id is not None:
            worker = cpu_snapshot(f"/proc/self/task/{thread.native_id}/stat")
            snapshot.update({f"worker_{key}": value for key, value in worker.items()})
    return snapshot


def gated_phases(wait_for, send_line, snapshot, seconds: float) -> dict[str, dict]:
    """Lets the guest run one phase at a time and returns what each phase added to the
    counters `snapshot()` reads; sleeps through most of a phase instead of polling."""
    phases: dict[str, dict] = {}
    previous: tuple[str, Counter] | None = None
    for mode, _ in (*PHASES, ("end", 0)):
        wait_for(f"blkbench-ready {mode}\r?\n")
        current = snapshot()
        if previous is not None:
            before = previous[1]
            phases[previous[0]] = {key: current[key] - before[key] for key in current}
        previous = (mode, current)
        send_line()
        if mode != "end":
            time.sleep(seconds * 0.9)
    return phases


def run_kvmlet(config: MachineConfig, seconds: float) -> tuple[dict, dict]:
    """Runs the phases under kvmlet; returns the guest's results and per-phase counters."""
    command = guest_command(seconds, gated=True)
    run_config = replace(
        config, extra_parameters=(*config.extra_parameters, "quiet", run_parameter(command))
    )
    with Machine(run_config) as machine:

        def wait_for(pattern: str) -> None:
            machine.console.wait_for(pattern, BOOT_TIMEOUT, lambda: machine.running)

        phases = gated_phases(
            wait_for, lambda: machine.console.write("\n"), lambda: kvmlet_snapshot(machine), seconds
        )
        machine.wait(BOOT_TIMEOUT)
        transcript = machine.console.transcript()
    if parse_exit_status(transcript) != 0:
        raise RuntimeError(f"guest command failed under kvmlet:\n{transcript[-2000:]!r}")
    for phase in phases.values():
        phase["exits_by_region"] = {
            key: count for key, count in phase.items() if ":" in key and count
        }
        phase["exits"] = sum(phase["exits_by_region"].values())
    return parse_results(transcript.decode(errors="replace")), phases


def run_qemu(kernel: Path, initrd: Path, image: Path, seconds: float) -> tuple[dict, dict]:
    """Runs the phases under QEMU; returns the guest's results and per-phase CPU time."""
    command = guest_command(seconds, gated=True)
    qemu = [
        *("qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-cpu", "host", "-m", "256M"),
        *("-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd)),
        *("-drive", f"file={image},if=virtio,format=raw,cache=writeback"),
        *("-append", f"console=ttyS0 reboot=k panic=-1 quiet {run_parameter(command)}"),
    ]
    console = QemuConsole(qemu, BOOT_TIMEOUT, BOOT_TIMEOUT)
    try:
        stat_path = f"/proc/{console.process.pid}/stat"
        phases = gated_phases(
            console.wait_for, console.send_line, lambda: cpu_snapshot(stat_path), seconds
        )
        transcript = console.finish()
    finally:
        console.process.kill()
    if parse_exit_status(transcript) != 0:
        raise RuntimeError(f"guest command failed under QEMU:\n{transcript[-2000:]!r}")
    return parse_results(transcript.decode(errors="replace")), phases


# -- figures --------------------------------------------------------------------------------


def figure(mode: str, result: dict[str, float]) -> tuple[str, float, str]:
    if mode.startswith("randread"):
        return f"{mode}_4k_iops", result["requests"] / result["seconds"], "IOPS"
    return f"{mode}_1m_mibps", result["bytes"] / MIB / result["seconds"], "MiB/s"


def measure(args: argparse.Namespace) -> None:
    guest = ensure_default_guest(progress=QuietProgress())
    emit({"case": "environment", "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]})
    transports = [name for name in args.transports.split(",") if name]
    samples: dict[tuple[str, str], list[float]] = {}
    phases: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmlet-blk-bench-") as directory:
        work = Path(directory)
        initrd = build_initrd(work, guest.initrd)
        image_size = args.image_mib * MIB
        for _ in range(args.rounds):
            for monitor in ("qemu", *(f"kvmlet-{name}" for name in transports)):
                image = make_image(work / "disk.img", image_size)
                if monitor == "qemu":
                    results, counters = run_qemu(guest.vmlinux, initrd, image, args.seconds)
                else:
                    config = with_default_guest(
                        MachineConfig(
                            initrd=initrd,
                            disks=(DiskConfig(image),),
                            virtio_transport=monitor.removeprefix("kvmlet-"),
                        )
                    )
                    results, counters = run_kvmlet(config, args.seconds)
                for mode, phase in counters.items():
                    phase["guest_requests"] = results[mode]["requests"]
                    phase["guest_seconds"] = results[mode]["seconds"]
                    phases.setdefault((monitor, mode), []).append(phase)
                image.unlink()
                for mode, result in results.items():
                    case, value, _ = figure(mode, result)
                    samples.setdefault((monitor, case), []).append(value)
    report(samples, phases, transports, args)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


CPU_KEYS = ("cpu_guest", "cpu_user", "cpu_system")
WORKER_KEYS = ("worker_cpu_user", "worker_cpu_system")


def report(samples, phases, transports, args) -> None:
    """Medians over the rounds with their ratio to QEMU; then, summed over the rounds, CPU
    time per guest request (both monitors) and kvmlet's exits per device request."""
    monitors = ("qemu", *(f"kvmlet-{name}" for name in transports))
    common = {"seconds": args.seconds, "rounds": args.rounds, "image_mib": args.image_mib}
    for mode, _ in PHASES:
        case, _, unit = figure(mode, {"bytes": 0, "requests": 0, "seconds": 1.0})
        qemu = statistics.median(samples[("qemu", case)])
        for monitor in monitors:
            values = samples[(monitor, case)]
            value = statistics.median(values)
            emit(
                {
                    "case": f"{monitor.replace('-', '_')}_{case}",
                    "value": round(value, 2),
                    "unit": unit,
                    "ratio_to_qemu": round(value / qemu, 3),
                    "samples": [round(sample, 2) for sample in values],
                    **common,
                }
            )
    for mode, _ in PHASES:
        cpu_per_request = {}
        for monitor in monitors:
            runs = phases[(monitor, mode)]
            guest_requests = sum(run["guest_requests"] for run in runs)
            keys = CPU_KEYS + (WORKER_KEYS if monitor != "qemu" else ())
            cpu_per_request[monitor] = {
                key: 1000 * sum(run[key] for run in runs) / guest_requests for key in keys
            }
            total = sum(cpu_per_request[monitor][key] for key in CPU_KEYS)
            busy = total * guest_requests / 1000 / sum(run["guest_seconds"] for run in runs)
            qemu_total = sum(cpu_per_request["qemu"][key] for key in CPU_KEYS)
            emit(
                {
                    "case": f"{monitor.replace('-', '_')}_{mode}_cpu_per_request",
                    "value": round(total, 3),
                    "unit": "CPU ms/guest request",
                    "ratio_to_qemu": round(total / qemu_total, 3),
                    **{key: round(value, 3) for key, value in cpu_per_request[monitor].items()},
                    "guest_requests": guest_requests,
                    "busy_fraction": round(busy, 3),
                }
            )
    for transport in transports:
        for mode, _ in PHASES:
            runs = phases[(f"kvmlet-{transport}", mode)]
            requests = sum(run["requests"] for run in runs)
            by_region: Counter = Counter()
            for run in runs:
                by_region.update(run["exits_by_region"])
            outside_console = sum(
                count for region, count in by_region.items() if not region.startswith("port_io:com")
            )
            notify_exits = sum(run["notify_exits"] for run in runs)
            emit(
                {
                    "case": f"kvmlet_{transport}_{mode}_exits_per_request",
                    "value": round(outside_console / max(requests, 1), 4),
                    "unit": "exits/device request (console excluded)",
                    "ratio_to_qemu": None,
                    "notify_exits_per_request": round(notify_exits / max(requests, 1), 4),
                    "device_requests": requests,
                    "guest_requests": sum(run["guest_requests"] for run in runs),
                    "exits_by_region": dict(by_region),
                }
            )


# -- where to run ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per monitor")
    parser.add_argument("--image-mib", type=int, default=64)
    parser.add_argument("--transports", default="pci,mmio")
    parser.add_argument("--here", action="store_true", help="run on this host's KVM")
    args = parser.parse_args()
    if needs_test_box(args.here):
        return run_in_test_box(__file__, sys.argv[1:], timeout=1200)
    for tool in ("qemu-system-x86_64", "gcc"):
        if shutil.which(tool) is None:
            print(f"virtio_blk_guest: {tool} is not installed", file=sys.stderr)
            return 1
    started = time.monotonic()
    measure(args)
    print(f"virtio_blk_guest: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
