"""Boot benchmark: process start -> first KVM_RUN -> first console byte -> init marker.

Each boot is a fresh `python3` process (this script with `--child`) that does what
`kvmlet run -k KERNEL -i INITRD` does: build a `Machine` with the default configuration and the
console echoed to stdout, start it. The parent stamps CLOCK_MONOTONIC just before it spawns the
child and when console bytes arrive on the child's stdout; the child reports its own stamps
(same clock) and its memory at the marker on stderr. Cases: the default guest's `vmlinux`
(ELF, PVH entry) and its `bzImage` (64-bit boot protocol, self-decompressing).

The marker is the default guest's `kvmlet-guest: ready` on hardware KVM; on a host that needs
the `pvm` profile, guest user space cannot run, so it is the kernel's `Run /init as init process`.

Figures per boot: `setup_ms` (process start -> first KVM_RUN: interpreter, imports, KVM, RAM,
devices, kernel load), `first_output_s`, `marker_s`; `monitor_rss_mib` is VmRSS minus the
guest RAM pages the guest touched (`guest_ram_rss_mib`, from the RAM mapping's smaps Rss),
`vm_hwm_mib` the peak RSS of the whole process. The children find kvmlet's modules already
compiled to bytecode, as an installed kvmlet does (see `compiled_bytecode_env`).

    python3 benchmarks/boot.py [--rounds R] [--timeout S]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

READY_MARKER = "kvmlet-guest: ready"
PVM_MARKER = "Run /init as init process"
TARGETS = {"setup_ms": 60.0, "monitor_rss_mib": 30.0}
MiB = 1 << 20
CHILD_IMPORTS = "import json, re, kvmlet.machine.config, kvmlet.machine.machine"
"""What a boot imports before its first KVM_RUN (compiled once by the warm-up)."""


def status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def mapping_rss_kib(starts: set[int]) -> int:
    """Resident kB of the mappings that begin at `starts` (the guest RAM banks)."""
    total = 0
    current = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) in starts
            elif current and head == "Rss:":
                total += int(line.split()[1])
    return total


def child(kernel: str, initrd: str, marker: str, timeout: float) -> None:
    """One boot in this process; the console goes to stdout, the report to stderr."""
    interpreter_ready = time.monotonic()
    from kvmlet.machine.config import MachineConfig
    from kvmlet.machine.machine import Machine

    imported = time.monotonic()
    machine = Machine(MachineConfig(kernel=Path(kernel), initrd=Path(initrd)), console_echo_fd=1)
    built = time.monotonic()
    report: dict[str, object] = {}
    try:
        machine.start()
        machine.console.wait_for(re.escape(marker), timeout, still_running=lambda: machine.running)
        marker_seen = time.monotonic()
        ram_kib = mapping_rss_kib({bank.host_address() for bank in machine.memory})
        rss_kib = status_kib("VmRSS")
        report = {
            "interpreter_ready": interpreter_ready,
            "imported": imported,
            "built": built,
            "started": machine.started,
            "first_run_at": machine.first_run_at,
            "marker_seen": marker_seen,
            "vm_rss_kib": rss_kib,
            "vm_hwm_kib": status_kib("VmHWM"),
            "guest_ram_rss_kib": ram_kib,
            "guest_ram_mib": sum(bank.size for bank in machine.memory) // MiB,
        }
    finally:
        machine.close()
        sys.stderr.write(json.dumps(report) + "\n")


def compiled_bytecode_env(pycache: str) -> dict[str, str]:
    """An environment whose Python finds kvmlet's modules compiled, as in an installed kvmlet.

    Without it, PYTHONDONTWRITEBYTECODE (set on our machines) makes every boot recompile each
    module edited since its last .pyc: ~12 ms of imports here. The bytecode goes to a private
    PYTHONPYCACHEPREFIX, written once by a warm-up import, so the tree is left untouched."""
    import subprocess  # the parent's modules are imported here, so the child never pays them

    env = dict(os.environ, PYTHONPYCACHEPREFIX=pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    root = str(Path(__file__).resolve().parent.parent)
    warm_up = f"import sys; sys.path.insert(0, {root!r}); {CHILD_IMPORTS}"
    subprocess.run([sys.executable, "-c", warm_up], env=env, check=True)
    return env


def boot_once(
    name: str, kernel: Path, initrd: Path, marker: str, timeout: float, env: dict[str, str]
) -> dict:
    """Spawn one boot; time its console on stdout; return the figures of that boot."""
    import selectors
    import subprocess

    command = [sys.executable, __file__, "--child", str(kernel), str(initrd), marker]
    command.append(str(timeout))
    spawned = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first_output = marker_at = None
    console = bytearray()
    expected = marker.encode()
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while marker_at is None:
            if not selector.select(timeout=max(0.0, spawned + timeout - time.monotonic())):
                break
            chunk = os.read(process.stdout.fileno(), 65536)
            now = time.monotonic()
            if not chunk:
                break
            if first_output is None:
                first_output = now
            console += chunk
            if expected in console[-(len(chunk) + len(expected)) :]:
                marker_at = now
    process.stdout.close()
    stderr = process.communicate(timeout=30)[1].decode(errors="replace")
    reports = [line for line in stderr.splitlines() if line.startswith("{")]
    child_report = json.loads(reports[-1]) if reports else {}
    if marker_at is None or not child_report:
        tail = console[-400:].decode(errors="replace")
        raise RuntimeError(
            f"{name}: no {marker!r} within {timeout:g} s; console tail: {tail!r}; "
            f"stderr tail: {stderr[-400:]!r}"
        )
    ram_kib = child_report["guest_ram_rss_kib"]
    stamps = {"spawned": spawned, **child_report}

    def milliseconds(start: str, end: str) -> float:
        return round((stamps[end] - stamps[start]) * 1000, 1)

    return {
        "case": f"boot_{name}",
        "setup_ms": milliseconds("spawned", "first_run_at"),
        "interpreter_ms": milliseconds("spawned", "interpreter_ready"),
        "imports_ms": milliseconds("interpreter_ready", "imported"),
        "machine_build_ms": milliseconds("imported", "built"),
        "start_to_run_ms": milliseconds("built", "first_run_at"),
        "first_output_s": round(first_output - spawned, 2),
        "marker_s": round(marker_at - spawned, 2),
        "marker": marker,
        "monitor_rss_mib": round((child_report["vm_rss_kib"] - ram_kib) / 1024, 1),
        "guest_ram_rss_mib": round(ram_kib / 1024, 1),
        "vm_rss_mib": round(child_report["vm_rss_kib"] / 1024, 1),
        "vm_hwm_mib": round(child_report["vm_hwm_kib"] / 1024, 1),
        "guest_ram_mib": child_report["guest_ram_mib"],
    }


def summary(name: str, boots: list[dict]) -> dict:
    """Medians over rounds, with the targets and the per-round figures."""
    import statistics

    line: dict[str, object] = {"case": f"boot_{name}", "rounds": len(boots)}
    for key, value in boots[0].items():
        if isinstance(value, (int, float)):
            line[key] = round(statistics.median(boot[key] for boot in boots), 2)
    line["marker"] = boots[0]["marker"]
    for key, target in TARGETS.items():
        line[f"{key}_target"] = target
        line[f"{key}_meets_target"] = line[key] <= target
    return line


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="boots per kernel (median)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per boot")
    options = parser.parse_args()

    from kvmlet.guest import ensure_default_guest
    from kvmlet.machine import host_profile

    guest = ensure_default_guest()
    profile = host_profile.detect()
    marker = PVM_MARKER if profile.name == "pvm" else READY_MARKER
    print(json.dumps({"case": "environment", "host_profile": profile.name, "marker": marker}))
    kernels = {"elf": guest.vmlinux, "bzimage": guest.bzimage}
    boots: dict[str, list[dict]] = {name: [] for name in kernels}
    with tempfile.TemporaryDirectory(prefix="kvmlet-boot-pycache-") as pycache:
        env = compiled_bytecode_env(pycache)
        for _ in range(options.rounds):
            for name, kernel in kernels.items():
                boot = boot_once(name, kernel, guest.initrd, marker, options.timeout, env)
                boots[name].append(boot)
                if options.rounds > 1:
                    print(json.dumps(boot), flush=True)
    lines = {name: summary(name, results) for name, results in boots.items()}
    for key in ("marker_s", "first_output_s", "setup_ms", "monitor_rss_mib"):
        lines["elf"][f"{key}_ratio_to_bzimage"] = round(
            lines["elf"][key] / lines["bzimage"][key], 3
        )
    for line in lines.values():
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        kernel_arg, initrd_arg, marker_arg, timeout_arg = sys.argv[2:6]
        child(kernel_arg, initrd_arg, marker_arg, float(timeout_arg))
    else:
        main()
