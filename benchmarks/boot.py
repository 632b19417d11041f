"""Boot benchmark: process start -> first KVM_RUN -> first console byte -> init marker.

Each boot is a fresh `python3` process (this script with `--child`) that goes down the path of
`kvmlet run -k KERNEL -i INITRD`: import `kvmlet.cli`, parse those arguments, build the run's
configuration with `cli.run_config` (kernel check, host profile), import and build the `Machine`
with the console echoed to stdout, start it. This script imports nothing but os, sys and time
before the child's first stamp, so the child pays for every module a boot needs. The parent
stamps CLOCK_MONOTONIC just before it spawns the child and when console bytes arrive on the
child's stdout; the child reports its own stamps (same clock) and its memory at the marker on
stderr. Cases: the default guest's `vmlinux` (ELF, PVH entry) and its `bzImage` (64-bit boot
protocol, self-decompressing).

Set-up alone (process start -> first KVM_RUN) is measured in more rounds by `setup_*` cases
whose child stops right after the first KVM_RUN: `setup_python` runs `python3` as is (on our
machines its site runs a sandbox `.pth` that imports certifi, pathlib, re and more: ~20 ms no
user pays, and modules kvmlet then finds already loaded), and `setup_venv` runs the same
interpreter from a fresh `python3 -m venv` (site without any `.pth`: what a user's interpreter
costs). `interpreter_alone_ms` is `python3 -c pass` of the same interpreter, timed alongside.

The marker is the default guest's `kvmlet-guest: ready` on hardware KVM; on a host that needs
the `pvm` profile, guest user space cannot run, so it is the kernel's `Run /init as init process`.

Figures per boot: `setup_ms` (process start -> first KVM_RUN: interpreter, imports, KVM, RAM,
devices, kernel load; `imports_ms` runs from the child's first stamp to its configuration
built and `Machine` imported), `first_output_s`, `marker_s`; `monitor_rss_mib` is VmRSS minus the
guest RAM pages the guest touched (`guest_ram_rss_mib`, from the RAM mapping's smaps Rss),
`vm_hwm_mib` the peak RSS of the whole process. The children find kvmlet's modules already
compiled to bytecode, as an installed kvmlet does (see `compiled_bytecode_env`).

    python3 benchmarks/boot.py [--rounds R] [--setup-rounds N] [--setup-only] [--timeout S]

`--box` is the box mode: kvmlet against kvmtool and QEMU, in one run, where KVM runs guest
user space (the test box on our machines); benchmarks/boot_peers.py describes it.

    python3 benchmarks/boot.py --box [--rounds R] [--cpus C] [--monitors a,b]
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

READY_MARKER = "kvmlet-guest: ready"
PVM_MARKER = "Run /init as init process"
TARGETS = {"setup_ms": 60.0, "monitor_rss_mib": 30.0}
MiB = 1 << 20
CHILD_IMPORTS = "import json, re, kvmlet.cli, kvmlet.machine.machine, kvmlet.virtio.pci"
"""What a boot imports (compiled once by the warm-up, with the stdlib modules they pull in)."""


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
    """One boot in this process, as `kvmlet run -k KERNEL -i INITRD` does it; the console goes
    to stdout, the report to stderr. With no marker, stop at the first KVM_RUN (set-up only)."""
    interpreter_ready = time.monotonic()
    from kvmlet import cli

    args = cli.build_parser().parse_args(["run", "-k", kernel, "-i", initrd])
    config = cli.run_config(args)
    from kvmlet.machine.machine import Machine

    imported = time.monotonic()
    machine = Machine(config, console_echo_fd=1)
    built = time.monotonic()
    report: dict[str, object] = {}
    try:
        machine.start()
        if marker:
            import re

            wait_for = machine.console.wait_for
            wait_for(re.escape(marker), timeout, still_running=lambda: machine.running)
        else:
            while machine.first_run_at is None and time.monotonic() < built + timeout:
                time.sleep(0.001)
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
        import json

        sys.stderr.write(json.dumps(report) + "\n")


def compiled_bytecode_env(pycache: str, interpreters: list[str]) -> dict[str, str]:
    """An environment whose Python finds kvmlet's modules compiled, as in an installed kvmlet.

    Without it, PYTHONDONTWRITEBYTECODE (set on our machines) makes every boot recompile each
    module edited since its last .pyc: ~12 ms of imports here. The bytecode goes to a private
    PYTHONPYCACHEPREFIX, written once by a warm-up import, so the tree is left untouched."""
    import subprocess  # the parent's modules are imported here, so the child never pays them

    env = dict(os.environ, PYTHONPYCACHEPREFIX=pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    warm_up = f"import sys; sys.path.insert(0, {ROOT!r}); {CHILD_IMPORTS}"
    for interpreter in interpreters:
        subprocess.run([interpreter, "-c", warm_up], env=env, check=True)
    return env


def clean_interpreter(directory: str) -> str:
    """This Python in a new venv under `directory`: its site finds no `.pth` of this machine."""
    import subprocess

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", directory], check=True)
    return os.path.join(directory, "bin", "python3")


def boot_once(
    name: str, kernel: str, initrd: str, marker: str, timeout: float, env: dict[str, str]
) -> dict:
    """Spawn one boot; time its console on stdout; return the figures of that boot."""
    import json
    import selectors
    import subprocess

    command = [sys.executable, __file__, "--child", kernel, initrd, marker, str(timeout)]
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
    return {
        "case": f"boot_{name}",
        **setup_figures(spawned, child_report),
        "first_output_s": round(first_output - spawned, 2),
        "marker_s": round(marker_at - spawned, 2),
        "marker": marker,
        "monitor_rss_mib": round((child_report["vm_rss_kib"] - ram_kib) / 1024, 1),
        "guest_ram_rss_mib": round(ram_kib / 1024, 1),
        "vm_rss_mib": round(child_report["vm_rss_kib"] / 1024, 1),
        "vm_hwm_mib": round(child_report["vm_hwm_kib"] / 1024, 1),
        "guest_ram_mib": child_report["guest_ram_mib"],
    }


def setup_figures(spawned: float, child_report: dict) -> dict[str, float]:
    """Set-up and its parts in milliseconds, from the parent's spawn stamp and the child's."""
    stamps = {"spawned": spawned, **child_report}

    def milliseconds(start: str, end: str) -> float:
        return round((stamps[end] - stamps[start]) * 1000, 1)

    return {
        "setup_ms": milliseconds("spawned", "first_run_at"),
        "interpreter_ms": milliseconds("spawned", "interpreter_ready"),
        "imports_ms": milliseconds("interpreter_ready", "imported"),
        "machine_build_ms": milliseconds("imported", "built"),
        "start_to_run_ms": milliseconds("built", "first_run_at"),
    }


def setup_once(interpreter: str, kernel: str, initrd: str, env: dict[str, str]) -> dict:
    """Spawn one set-up-only boot: the child stops at its first KVM_RUN."""
    import json
    import subprocess

    command = [interpreter, __file__, "--child", kernel, initrd, "", "30"]
    spawned = time.monotonic()
    result = subprocess.run(command, capture_output=True, env=env, timeout=60, check=False)
    reports = [line for line in result.stderr.decode().splitlines() if line.startswith("{")]
    child_report = json.loads(reports[-1]) if reports else {}
    if not child_report.get("first_run_at"):
        raise RuntimeError(f"set-up child failed: {result.stderr[-400:]!r}")
    return setup_figures(spawned, child_report)


def interpreter_once(interpreter: str, env: dict[str, str]) -> float:
    """Milliseconds of `INTERPRETER -c pass`, start to exit."""
    import subprocess

    spawned = time.monotonic()
    subprocess.run([interpreter, "-c", "pass"], env=env, check=True)
    return round((time.monotonic() - spawned) * 1000, 1)


def summary(case: str, runs: list[dict]) -> dict:
    """Medians over rounds, with the targets that apply."""
    import statistics

    line: dict[str, object] = {"case": case, "rounds": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            line[key] = round(statistics.median(run[key] for run in runs), 2)
    if "marker" in runs[0]:
        line["marker"] = runs[0]["marker"]
    for key, target in TARGETS.items():
        if key in line:
            line[f"{key}_target"] = target
            line[f"{key}_meets_target"] = line[key] <= target
    return line


def main() -> None:
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="boots per kernel (median)")
    parser.add_argument(
        "--setup-rounds", type=int, default=15, help="set-up-only runs per interpreter (median)"
    )
    parser.add_argument("--setup-only", action="store_true", help="skip the full boots")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per boot")
    parser.add_argument("--box", action="store_true", help="kvmlet vs kvmtool vs QEMU")
    parser.add_argument("--cpus", type=int, default=1, help="box mode: guest vCPUs")
    parser.add_argument("--monitors", help="box mode: comma-separated monitors to run")
    options = parser.parse_args()
    if options.box:
        import boot_peers

        monitors = options.monitors.split(",") if options.monitors else boot_peers.DEFAULT_MONITORS
        timeout = min(options.timeout, 120.0)
        boot_peers.run(options.rounds, options.cpus, list(monitors), timeout)
        return

    from kvmlet.guest import ensure_default_guest
    from kvmlet.vstate import host_profile

    guest = ensure_default_guest()
    profile = host_profile.detect()
    marker = PVM_MARKER if profile.name == "pvm" else READY_MARKER
    print(json.dumps({"case": "environment", "host_profile": profile.name, "marker": marker}))
    kernels = {"elf": str(guest.vmlinux), "bzimage": str(guest.bzimage)}
    initrd = str(guest.initrd)
    with tempfile.TemporaryDirectory(prefix="kvmlet-boot-") as scratch:
        interpreters = {
            "python": sys.executable,
            "venv": clean_interpreter(os.path.join(scratch, "venv")),
        }
        env = compiled_bytecode_env(os.path.join(scratch, "pycache"), list(interpreters.values()))
        setups: dict[str, list[dict]] = {name: [] for name in interpreters}
        for _ in range(options.setup_rounds):
            for name, interpreter in interpreters.items():
                run = {"interpreter_alone_ms": interpreter_once(interpreter, env)}
                run.update(setup_once(interpreter, kernels["elf"], initrd, env))
                setups[name].append(run)
        for name, runs in setups.items():
            print(json.dumps(summary(f"setup_{name}", runs)), flush=True)
        if options.setup_only:
            return
        boots: dict[str, list[dict]] = {name: [] for name in kernels}
        for _ in range(options.rounds):
            for name, kernel in kernels.items():
                boot = boot_once(name, kernel, initrd, marker, options.timeout, env)
                boots[name].append(boot)
                if options.rounds > 1:
                    print(json.dumps(boot), flush=True)
    lines = {name: summary(f"boot_{name}", results) for name, results in boots.items()}
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
