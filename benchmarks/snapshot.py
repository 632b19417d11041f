"""Snapshot benchmark: taking a snapshot of the booted default guest, and restoring it against
booting it, process start to the same point (issue 16). JSON lines.

For each RAM size (`--memory`, default 128M and 1G) this script boots the default guest in its
own process to the point a boot is measured to (`kvmlet-guest: ready` where guest user space
runs, then two idle seconds; on a `pvm` host, whose KVM cannot run guest user space, the
kernel's `Run /init as init process`, paused at once), snapshots it and stops it:

- `snapshot_<size>`: the snapshot's time (request to file in place) and how long the guest was
  held, the file's size and what it takes on disk (sparse), the RAM written, the guest RAM
  the guest had touched (RSS of its mapping).
- `restore_<size>`: fresh processes going down `kvmlet run --restore FILE`'s path (import
  `kvmlet.cli`, parse the arguments, import the restore code, `Machine.restore`, start),
  stamped: process start → `Machine.restore` called (interpreter and imports: "process
  start", measured apart; the virtio modules a machine imports as it builds come after) →
  machine built → first KVM_RUN (the guest's next instruction: `monitor_ms` is restore called
  → first KVM_RUN, the ≤ 10 ms target) → where guest user space runs, the console answering
  (`echo` typed, its answer read). `monitor_cpu_ms` is the CPU time the calling thread
  spent from `Machine.restore` called to `start()` returned: kvmlet's own work, apart from
  waiting for the scheduler, for other threads to start and for the kernel (the grace
  periods KVM waits for when memory slots, irqchip routes and irqfds change).
- `boot_<size>`: fresh processes going down `kvmlet run`'s path to the same point: the marker,
  then the console answering where it can; the ratio boot / restore is the win (target ≥ 10
  in the test box).

Children find kvmlet's bytecode compiled (as boot.py arranges). Medians over `--rounds`.

    python3 benchmarks/snapshot.py [--memory SIZE]... [--rounds N] [--timeout S]
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

READY_MARKER = "kvmlet-guest: ready"
PVM_MARKER = "Run /init as init process"
QUESTION, ANSWER = "echo kvmlet-$((6 * 7))\n", "kvmlet-42"
IDLE_SECONDS = 2.0
CHILD_IMPORTS = (
    "import json, re, kvmlet.cli, kvmlet.machine.machine, kvmlet.machine.restore, kvmlet.virtio.pci"
)
TARGETS = {"monitor_ms": 10.0}
MiB = 1 << 20


def child(mode: str, argument: str, memory: str, marker: str, timeout: float) -> None:
    """One run in this process: `restore` FILE or `boot` (the default guest), console on
    stdout, stamps on stderr. `marker` empty: no console answer is waited for."""
    interpreter_ready = time.monotonic()
    import json
    import re

    from kvmlet import cli

    if mode == "restore":
        args = cli.build_parser().parse_args(["run", "--restore", argument])
        import kvmlet.machine.restore  # noqa: F401  (what Machine.restore imports first)
    else:
        args = cli.build_parser().parse_args(["run", "-m", memory])
        config = cli.run_config(args)
    from kvmlet.machine.machine import Machine

    imported = time.monotonic()
    cpu_before = time.thread_time()
    if mode == "restore":
        machine = Machine.restore(args.restore, console_echo_fd=1)
    else:
        machine = Machine(config, console_echo_fd=1)
    built = time.monotonic()
    report: dict[str, object] = {}
    try:
        machine.start()
        monitor_cpu = time.thread_time() - cpu_before
        wait_for = machine.console.wait_for
        still = lambda: machine.running  # noqa: E731
        if mode == "boot":
            wait_for(re.escape(marker), timeout, still_running=still)
        marker_seen = time.monotonic()
        answered = None
        if marker == READY_MARKER:
            machine.console.write(QUESTION)
            wait_for(ANSWER + r"\r?\n", timeout, still_running=still)
            answered = time.monotonic()
        else:
            while machine.first_run_at is None:
                time.sleep(0.0005)
        report = {
            "interpreter_ready": interpreter_ready,
            "imported": imported,
            "built": built,
            "first_run_at": machine.first_run_at,
            "marker_seen": marker_seen,
            "answered": answered,
            "monitor_cpu": monitor_cpu,
        }
    finally:
        machine.close()
        sys.stderr.write(json.dumps(report) + "\n")


def run_child(mode: str, argument: str, memory: str, marker: str, timeout: float, env) -> dict:
    import json
    import subprocess

    command = [sys.executable, __file__, "--child", mode, argument, memory, marker, str(timeout)]
    spawned = time.monotonic()
    result = subprocess.run(command, capture_output=True, env=env, timeout=timeout + 60)
    reports = [line for line in result.stderr.decode().splitlines() if line.startswith("{")]
    stamps = json.loads(reports[-1]) if reports else {}
    if not stamps.get("first_run_at"):
        raise RuntimeError(f"{mode} child failed: {result.stderr[-600:]!r}")

    def ms(start: float, end: float | None) -> float | None:
        return None if end is None else round((end - start) * 1000, 2)

    figures = {
        "process_start_ms": ms(spawned, stamps["imported"]),
        "interpreter_ms": ms(spawned, stamps["interpreter_ready"]),
        "build_ms": ms(stamps["imported"], stamps["built"]),
        "monitor_ms": ms(stamps["imported"], stamps["first_run_at"]),
        "monitor_cpu_ms": round(stamps["monitor_cpu"] * 1000, 2),
        "to_first_run_ms": ms(spawned, stamps["first_run_at"]),
        "to_answer_ms": ms(spawned, stamps["answered"]),
    }
    if mode == "boot":
        figures["to_marker_ms"] = ms(spawned, stamps["marker_seen"])
    return figures


def take_snapshot(memory: str, marker: str, path: str, timeout: float) -> dict:
    """Boot the default guest here to `marker`, snapshot it, stop it; the figures."""
    import re

    from kvmlet.boot.memory_map import parse_size
    from kvmlet.machine.config import MachineConfig, with_default_guest
    from kvmlet.machine.machine import Machine

    config = with_default_guest(MachineConfig(memory=parse_size(memory)))
    with Machine(config) as machine:
        machine.console.wait_for(re.escape(marker), timeout, lambda: machine.running)
        if marker == READY_MARKER:
            time.sleep(IDLE_SECONDS)
        machine.pause()
        touched = sum(_resident(bank) for bank in machine.memory)
        result = machine.snapshot(path, then="stop")
    status = os.stat(path)
    return {
        "snapshot_s": round(result.seconds, 3),
        "guest_held_s": round(result.paused_seconds, 3),
        "file_mib": round(result.file_bytes / MiB, 1),
        "file_on_disk_mib": round(status.st_blocks * 512 / MiB, 1),
        "ram_written_mib": round(result.ram_bytes / MiB, 1),
        "guest_ram_touched_mib": round(touched / MiB, 1),
    }


def _resident(bank) -> int:
    from kvmlet.snapshot.ram import resident_runs

    return sum(end - start for start, end in resident_runs(bank) or [(0, bank.size)])


def median(runs: list[dict]) -> dict:
    import statistics

    line = {}
    for key, value in runs[0].items():
        values = [run[key] for run in runs if run[key] is not None]
        if isinstance(value, int | float) and values:
            line[key] = round(statistics.median(values), 2)
    return line


def main() -> None:
    import argparse
    import json
    import platform
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", action="append", help="guest RAM sizes (default 128M, 1G)")
    parser.add_argument("--rounds", type=int, default=5, help="restores and boots per size")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per boot")
    options = parser.parse_args()

    from benchmarks.boot import compiled_bytecode_env
    from kvmlet.guest import ensure_default_guest
    from kvmlet.vstate import host_profile

    ensure_default_guest()
    profile = host_profile.detect()
    marker = PVM_MARKER if profile.name == "pvm" else READY_MARKER
    environment = {
        "case": "environment",
        "host_profile": profile.name,
        "in_test_box": os.environ.get("KVMLET_TESTBOX") == "1",
        "marker": marker,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(environment), flush=True)
    with tempfile.TemporaryDirectory(prefix="kvmlet-snapshot-") as scratch:
        import benchmarks.boot as boot

        boot.CHILD_IMPORTS = CHILD_IMPORTS
        env = compiled_bytecode_env(os.path.join(scratch, "pycache"), [sys.executable])
        for memory in options.memory or ["128M", "1G"]:
            path = os.path.join(scratch, f"guest-{memory}.snap")
            line = {"case": f"snapshot_{memory}", **take_snapshot(memory, marker, path, 600)}
            print(json.dumps(line), flush=True)
            restores = [
                run_child("restore", path, memory, marker, options.timeout, env)
                for _ in range(options.rounds)
            ]
            boots = [
                run_child("boot", "", memory, marker, options.timeout, env)
                for _ in range(options.rounds)
            ]
            restored, booted = median(restores), median(boots)
            for key, target in TARGETS.items():
                restored[f"{key}_target"] = target
                restored[f"{key}_meets_target"] = restored[key] <= target
            end = "to_answer_ms" if marker == READY_MARKER else "to_first_run_ms"
            boot_end = "to_answer_ms" if marker == READY_MARKER else "to_marker_ms"
            print(json.dumps({"case": f"restore_{memory}", "rounds": len(restores), **restored}))
            print(json.dumps({"case": f"boot_{memory}", "rounds": len(boots), **booted}))
            ratio = {
                "case": f"ratio_{memory}",
                "boot": boot_end,
                "restore": end,
                "boot_over_restore": round(booted[boot_end] / restored[end], 1),
            }
            print(json.dumps(ratio), flush=True)
            os.unlink(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        mode_arg, argument_arg, memory_arg, marker_arg, timeout_arg = sys.argv[2:7]
        child(mode_arg, argument_arg, memory_arg, marker_arg, float(timeout_arg))
    else:
        main()
