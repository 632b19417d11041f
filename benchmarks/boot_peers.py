"""Boot benchmark, box mode: kvmlet against kvmtool and QEMU (microvm and pc), one run.

Run it where KVM runs guest user space (on our machines: inside the test box, under its lock):

    flock -x /tmp/kvmlet-box.lock python3 testbox/run.py --smp 2 --stall-timeout 300 -- \\
        python3 benchmarks/boot.py --box [--rounds N] [--cpus C] [--monitors a,b,...]

Every monitor boots the same kernel (the default guest's `bzImage`) and the same initramfs (the
default guest's, with a second archive appended whose `/init` writes the boot-timer port,
prints `kvmlet-bench: user space` and sleeps) with 256 MiB and C vCPUs (default 1), and is
timed from its spawn to that line on its console (read in chunks from a pipe, the same for all).
Monitors, interleaved round by round:

- `kvmtool`: `lkvm run --nodefaults -n mode=none -k bzImage -i initrd -m 256 -c C -p PARAMS`;
- `qemu-microvm`, `qemu-pc`: `qemu-system-x86_64 -M microvm|pc -accel kvm -cpu host -m 256M
  -smp C -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel bzImage
  -initrd initrd -append PARAMS`;
- `kvmlet-peers`: `python3 -m kvmlet run -k bzImage -i initrd -m 256M -c C -p "pci=off
  nokaslr"` (kvmlet's own parameters hold the rest of PARAMS), `python3` being this Python in
  a fresh venv (a user's interpreter: no `.pth` of this machine) and kvmlet's package copied
  to L1's tmpfs with its bytecode compiled beforehand, as an installed kvmlet has it;
- `kvmlet`: the same with kvmlet's defaults (PCI on, its virtio-rng), no `-p`;

where PARAMS is the peers' `console=ttyS0 reboot=k panic=-1 acpi=off pci=off nokaslr`.
`kvmlet-quiet` (not in the default set) is `kvmlet-peers` with `quiet` and the boot timer on
(`MachineConfig(boot_timer=True)`; the CLI has no flag for it yet, so boot_timer_child.py
builds the run as `kvmlet run` does): its `boot_timer_s` comes from kvmlet's boot-timer line,
not from the console. `kvmtool-quiet`, `qemu-microvm-quiet` and `qemu-pc-quiet` (not in the
default set either) add `quiet` to the peer's PARAMS: with the quiet cases, a boot's time
splits into what printing the boot log costs under each monitor and everything else. A
monitor name may end in `@TREE`: that kvmlet checkout runs it (a before/after comparison in
one run).

kvmtool is not packaged by Debian 12; the benchmark takes `$KVMLET_KVMTOOL`, else
`~/.cache/kvmlet-peers/kvmtool/lkvm`, built on the host beforehand from kvmtool's public source
(commit b48735e): `git clone <kvmtool repository> ~/.cache/kvmlet-peers/kvmtool && make -C
~/.cache/kvmlet-peers/kvmtool lkvm` (gcc and make; about a minute). It is never vendored.
Inside the box kvmtool's check for vmx/svm passes: L1 has svm.

Per boot: `marker_s` (spawn to the marker), `vm_hwm_mib` (the monitor process's peak RSS, guest
RAM it touched included, read from /proc at the marker) and KVM's own per-VM counters from
debugfs (/sys/kernel/debug/kvm/PID-FD, mounted by the script): `kvm_exits` (every exit of the
guest to KVM), `kvm_mmio_exits` (MMIO exits to user space; SVM's `io_exits` counts every port
access, in-kernel and coalesced ones included, so it is reported but is not a user-space
count). User-space exits are `kvm_run_calls`: the monitor's KVM_RUN calls up to the marker,
counted by a small LD_PRELOAD library (RUN_COUNTER_C, built with gcc) around libc's ioctl;
each return of KVM_RUN is one exit to user space, whatever the monitor. (Tracing KVM_RUN with
strace instead slowed the box so much that L1 stalled in a spinlock.)
A boot that does not reach the marker within `--timeout` is a failure, reported and counted,
never a time.
"""

from __future__ import annotations

import io
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_PARAMETERS = "console=ttyS0 reboot=k panic=-1 acpi=off pci=off nokaslr"
MARKER = b"kvmlet-bench: user space"
BOOT_TIMER_PORT = 0x440
BOOT_TIMER_MAGIC = 123
DEBUGFS = Path("/sys/kernel/debug")
DEFAULT_MONITORS = ("kvmtool", "qemu-microvm", "qemu-pc", "kvmlet-peers", "kvmlet")
KVM_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "signal_exits")

BENCH_INIT = f"""#!/bin/sh
# /init of the boot benchmark: mark the boot (kvmlet's boot-timer port; other monitors ignore
# the write), say so on the console, then idle until the monitor is stopped.
printf '\\{BOOT_TIMER_MAGIC:o}' | dd of=/dev/port bs=1 seek={BOOT_TIMER_PORT} count=1 2>/dev/null
echo "{MARKER.decode()}"
exec sleep 100000
"""


def kvmtool_binary() -> Path | None:
    candidate = os.environ.get("KVMLET_KVMTOOL") or (
        Path.home() / ".cache" / "kvmlet-peers" / "kvmtool" / "lkvm"
    )
    path = Path(candidate)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def build_initrd(work: Path, base_initrd: Path) -> Path:
    """The default initrd with the benchmark's /init (and a /dev/port node) appended."""
    sys.path.insert(0, str(ROOT))
    from kvmlet.guest.cpio import CpioWriter

    extra = io.BytesIO()
    writer = CpioWriter(extra)
    writer.add_char_device("dev/port", 1, 4, mode=0o600)
    writer.add_file("init", BENCH_INIT.encode(), mode=0o755)
    writer.finish()
    initrd = work / "initrd-bench.cpio"
    initrd.write_bytes(base_initrd.read_bytes() + extra.getvalue())
    return initrd


def user_interpreter(work: Path) -> str:
    """This Python in a fresh venv: a user's interpreter, whose `site` runs no `.pth` of this
    machine (ours imports certifi and more: ~1 s of every start in the box)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "venv")], check=True)
    return str(work / "venv" / "bin" / "python3")


def monitor_command(
    name: str, kernel: Path, initrd: Path, cpus: int, python: str = sys.executable
) -> list[str]:
    peer = name.removesuffix("-quiet")
    parameters = PEER_PARAMETERS + (" quiet" if peer != name else "")
    if peer == "kvmtool":
        lkvm = kvmtool_binary()
        assert lkvm is not None
        return [
            *(str(lkvm), "run", "--nodefaults", "-n", "mode=none", "-k", str(kernel)),
            *("-i", str(initrd), "-m", "256", "-c", str(cpus), "-p", parameters),
        ]
    if peer.startswith("qemu-"):
        machine = peer.removeprefix("qemu-")
        return [
            *("qemu-system-x86_64", "-M", machine, "-accel", "kvm", "-cpu", "host"),
            *("-m", "256M", "-smp", str(cpus), "-nodefaults", "-no-user-config"),
            *("-display", "none", "-serial", "stdio", "-no-reboot"),
            *("-kernel", str(kernel), "-initrd", str(initrd), "-append", parameters),
        ]
    kind = name.partition("@")[0]
    arguments = ["run", "-k", str(kernel), "-i", str(initrd), "-m", "256M", "-c", str(cpus)]
    if kind == "kvmlet-peers":
        arguments += ["-p", "pci=off nokaslr"]
    elif kind == "kvmlet-quiet":
        arguments += ["-p", "pci=off nokaslr quiet"]
        return [python, str(Path(__file__).with_name("boot_timer_child.py")), *arguments]
    return [python, "-m", "kvmlet", *arguments]


def tree_of(name: str) -> Path:
    """The kvmlet checkout a monitor runs from: `@TREE` at the end of its name, else this one."""
    return Path(name.partition("@")[2] or ROOT)


def install_copy(tree: Path, destination: Path) -> Path:
    """kvmlet's package from `tree` and h11 copied to `destination` (L1's tmpfs), as an
    installed kvmlet sits on a local disk: the checkout is shared into the box over 9p without
    metadata caching, which makes every import's stat and read a round trip to the host."""
    import h11  # kvmlet's one dependency (the control API), installed beside it

    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(tree / "kvmlet", destination / "kvmlet", ignore=ignore)
    shutil.copytree(Path(h11.__file__).parent, destination / "h11", ignore=ignore)
    return destination


def monitor_environment(pycache: Path, tree: Path = ROOT) -> dict[str, str]:
    environment = dict(os.environ, PYTHONPATH=str(tree), PYTHONPYCACHEPREFIX=str(pycache))
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    environment["HOME"] = "/tmp"  # kvmtool keeps its sockets under $HOME/.lkvm
    return environment


def kvm_counters(pid: int) -> dict[str, int]:
    """KVM's per-VM counters (summed over the process's VMs) from debugfs."""
    totals = dict.fromkeys(KVM_COUNTERS, 0)
    for directory in (DEBUGFS / "kvm").glob(f"{pid}-*"):
        for counter in KVM_COUNTERS:
            with open(directory / counter) as file:
                totals[counter] += int(file.read())
    return totals


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def boot_once(
    name: str, command: list[str], environment: dict[str, str], timeout: float
) -> dict[str, object]:
    """One boot to the marker; the monitor is killed afterwards."""
    spawned = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        cwd=environment.get("PYTHONPATH", ROOT),
        start_new_session=True,
    )
    console = bytearray()
    marker_at = None
    result: dict[str, object] = {"case": name, "reached": False}
    counter = environment.get("KVMLET_BENCH_RUN_COUNTER")
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while marker_at is None:
                remaining = spawned + timeout - time.monotonic()
                if remaining <= 0 or not selector.select(timeout=remaining):
                    break
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                console += chunk
                if MARKER in console[-(len(chunk) + len(MARKER)) :]:
                    marker_at = time.monotonic()
        result["reached"] = marker_at is not None
        if marker_at is None:
            result["console_tail"] = console[-300:].decode(errors="replace")
            return result
        result["marker_s"] = round(marker_at - spawned, 3)
        result["vm_hwm_mib"] = round(peak_rss_kib(process.pid) / 1024, 1)
        if counter is not None:
            result["kvm_run_calls"] = read_counter(Path(counter))
        result.update({f"kvm_{key}": value for key, value in kvm_counters(process.pid).items()})
        return result
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        stderr = process.communicate()[1]
        if marker_at is None:
            result["stderr_tail"] = stderr[-300:].decode(errors="replace")
        timer = re.search(rb"boot timer: ([\d.]+) ms", stderr)
        if timer and marker_at is not None:
            result["boot_timer_s"] = round(float(timer.group(1)) / 1000, 3)


RUN_COUNTER_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned long *counter;
static int (*real_ioctl)(int, unsigned long, ...);

__attribute__((constructor)) static void open_counter(void)
{
    real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    const char *path = getenv("KVMLET_BENCH_RUN_COUNTER");
    if (!path)
        return;
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, 4096) != 0)
        return;
    void *page = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (page != MAP_FAILED)
        counter = page;
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list arguments;
    va_start(arguments, request);
    void *argument = va_arg(arguments, void *);
    va_end(arguments);
    if (request == KVM_RUN && counter)
        __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    return real_ioctl(fd, request, argument);
}
"""
"""An LD_PRELOAD library counting the process's KVM_RUN calls into a shared file: each return
of KVM_RUN is one exit to user space, whatever the monitor (C or Python: both reach the libc
ioctl). It costs an atomic add per call, so every timed boot is counted."""


def build_run_counter(work: Path) -> Path | None:
    """Compile the KVM_RUN counter (None without gcc: boots are then not counted)."""
    if shutil.which("gcc") is None:
        return None
    source, library = work / "run_counter.c", work / "run_counter.so"
    source.write_text(RUN_COUNTER_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True
    )
    return library


def counted(environment: dict[str, str], library: Path | None, counter: Path) -> dict[str, str]:
    """`environment` with the KVM_RUN counter preloaded, counting into `counter`."""
    if library is None:
        return environment
    counter.unlink(missing_ok=True)
    return dict(environment, LD_PRELOAD=str(library), KVMLET_BENCH_RUN_COUNTER=str(counter))


def read_counter(counter: Path) -> int | None:
    try:
        return int.from_bytes(counter.read_bytes()[:8], "little")
    except OSError:
        return None


def summarise(name: str, boots: list[dict]) -> dict[str, object]:
    reached = [boot for boot in boots if boot["reached"]]
    line: dict[str, object] = {
        "case": f"box_{name}",
        "rounds": len(boots),
        "reached": len(reached),
    }
    for key in ("marker_s", "boot_timer_s", "vm_hwm_mib", "kvm_run_calls", "kvm_exits"):
        values = [boot[key] for boot in reached if key in boot]
        if values:
            line[key] = round(statistics.median(values), 3)
            line[f"{key}_range"] = [min(values), max(values)]
    return line


def environment_line(cpus: int) -> dict[str, object]:
    return {
        "case": "environment",
        "where": "test box" if os.environ.get("KVMLET_TESTBOX") == "1" else "host",
        "cpus_seen": os.cpu_count(),
        "guest_cpus": cpus,
        "load_average": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
    }


def run(rounds: int, cpus: int, monitors: list[str], timeout: float) -> None:
    sys.path.insert(0, str(ROOT))
    from kvmlet.guest import ensure_default_guest

    if kvmtool_binary() is None and {"kvmtool", "kvmtool-quiet"} & set(monitors):
        print("boot --box: no kvmtool (see the docstring for its build); left out", file=sys.stderr)
        monitors = [name for name in monitors if not name.startswith("kvmtool")]
    if not (DEBUGFS / "kvm").is_dir():
        subprocess.run(["mount", "-t", "debugfs", "debugfs", str(DEBUGFS)], check=False)
    guest = ensure_default_guest()
    print(json.dumps(environment_line(cpus)), flush=True)
    with tempfile.TemporaryDirectory(prefix="kvmlet-bootbox-") as scratch:
        work = Path(scratch)
        initrd = build_initrd(work, guest.initrd)
        python = user_interpreter(work)
        run_counter = build_run_counter(work)
        environments = {}
        installed: dict[Path, Path] = {}
        for name in monitors:
            tree = tree_of(name)
            if tree not in installed:
                installed[tree] = install_copy(tree, work / f"kvmlet-{len(installed)}")
            environments[name] = monitor_environment(work / "pycache", installed[tree])
            subprocess.run(  # compile kvmlet once, as an installed kvmlet is
                [python, "-c", "import kvmlet.cli, kvmlet.machine.machine"],
                env=environments[name],
                cwd=installed[tree],
                check=True,
            )
        commands = {
            name: monitor_command(name, guest.bzimage, initrd, cpus, python) for name in monitors
        }
        boots: dict[str, list[dict]] = {name: [] for name in monitors}
        for _ in range(rounds):
            for name in monitors:
                environment = counted(environments[name], run_counter, work / "run-count")
                boot = boot_once(name, commands[name], environment, timeout)
                boots[name].append(boot)
                print(json.dumps(boot), flush=True)
    lines = {name: summarise(name, boots[name]) for name in monitors}
    for reference in ("kvmtool", "qemu-microvm"):
        if reference not in lines or "marker_s" not in lines[reference]:
            continue
        for line in lines.values():
            if "marker_s" in line:
                line[f"ratio_to_{reference}"] = round(
                    line["marker_s"] / lines[reference]["marker_s"], 3
                )
    for line in lines.values():
        print(json.dumps(line), flush=True)
