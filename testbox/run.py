#!/usr/bin/env python3
"""Run a command inside the test box: an L1 Linux under QEMU TCG whose /dev/kvm is a real KVM.

Usage: python3 testbox/run.py [--timeout S] [--verbose] [--env NAME=VALUE]... -- CMD...

Our machines' own KVM cannot run guest user space (docs/hosts.md), so the `linux`
test tier runs here instead. The box boots kvmlet's default guest kernel (KVM and KVM_AMD built
in) under `qemu-system-x86_64 -accel tcg -cpu max`, with the host's root file system as its
root (9p, read-only), tmpfs on /tmp, /run, /var/tmp and /dev/shm, and this checkout shared
read-write at its host path. testbox/box_init.sh runs CMD in the same working directory (or
the checkout when that is not visible), with the real Python interpreter's directory first on
PATH. CMD's output streams to our stdout; the exit status of this script is CMD's, 124 when
the timeout expired and 125 when the box itself failed (its boot log is then printed).

Test tooling only: kvmlet itself never needs QEMU.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

CHECKOUT = Path(__file__).resolve().parent.parent
BOX_INIT = CHECKOUT / "testbox" / "box_init.sh"
EXIT_TIMEOUT = 124
EXIT_BOX_FAILED = 125
_PR_SET_PDEATHSIG = 1
# Variables passed from the host into the box besides --env ones.
_PASSED_VARIABLES = ("TERM", "COLUMNS", "LANG", "PYTEST_ADDOPTS", "HYPOTHESIS_PROFILE")
_PASSED_PREFIXES = ("KVMLET_",)
_TSC_IN_LOG = re.compile(rb"tsc: (?:Refined TSC clocksource calibration|Detected): ?([\d.]+) MHz")
_CPUINFO_MHZ = re.compile(r"^cpu MHz\s*:\s*([\d.]+)$", re.MULTILINE)


@dataclass
class BoxOptions:
    """How to start the box (defaults match the measured setup in testbox/README.md)."""

    timeout: float = 1800.0
    memory: str = "2G"
    cpu: str = "max"
    verbose: bool = False
    kernel: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)


def host_tsc_khz() -> int:
    """The host's TSC rate: TCG's guest TSC runs at it, and L1 must not calibrate its own."""
    try:
        kernel_log = subprocess.run(["dmesg"], capture_output=True, check=False).stdout
    except FileNotFoundError:
        kernel_log = b""
    found = _TSC_IN_LOG.findall(kernel_log)
    if found:
        return round(float(found[-1]) * 1000)
    cpuinfo = _CPUINFO_MHZ.search(Path("/proc/cpuinfo").read_text())
    if cpuinfo is None:
        raise RuntimeError("cannot tell the host's TSC rate (no dmesg line, no cpu MHz)")
    return round(float(cpuinfo.group(1)) * 1000)


def default_kernel() -> Path:
    """kvmlet's default guest vmlinux (PVH entry, no decompression), built first if needed."""
    sys.path.insert(0, str(CHECKOUT))
    from kvmlet.guest import ConsoleProgress, ensure_default_guest

    return ensure_default_guest(progress=ConsoleProgress(sys.stderr)).vmlinux


def box_environment(extra: dict[str, str]) -> dict[str, str]:
    """The command's environment in L1: host's PATH behind the real interpreter's directory."""
    interpreter_bin = str(Path(sys.executable).parent)
    path = [interpreter_bin, *(p for p in os.environ.get("PATH", "").split(":") if p)]
    environment = {
        "PATH": ":".join(dict.fromkeys([*path, "/usr/sbin", "/usr/bin", "/sbin", "/bin"])),
        "HOME": os.environ.get("HOME", "/root"),
        "KVMLET_TESTBOX": "1",
        # HOME is read-only in L1: kvmlet's API sockets and locks go to L1's own tmpfs.
        "XDG_RUNTIME_DIR": "/run",
    }
    for name, value in os.environ.items():
        if name in _PASSED_VARIABLES or name.startswith(_PASSED_PREFIXES):
            environment[name] = value
    if not sys.stdout.isatty():
        environment.update({"TERM": "dumb", "NO_COLOR": "1", "PY_COLORS": "0"})
    environment.update(extra)
    return environment


def write_session(directory: Path, argv: list[str], options: BoxOptions, token: str) -> None:
    """Files box_init.sh reads from the session share."""
    cwd = Path.cwd()
    (directory / "work_dir").write_text(str(CHECKOUT))
    (directory / "token").write_text(token)
    exports = "".join(
        f"export {name}={shlex.quote(value)}\n"
        for name, value in box_environment(options.environment).items()
    )
    (directory / "environment").write_text(exports)
    (directory / "command").write_text(
        f"cd {shlex.quote(str(cwd))} 2>/dev/null || cd {shlex.quote(str(CHECKOUT))}\n"
        f"exec {shlex.join(argv)} </dev/null\n"
    )


def qemu_command(kernel: Path, session: Path, options: BoxOptions) -> list[str]:
    nine_p = "security_model=none,multidevs=remap"
    kernel_parameters = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "root=/dev/root",
        "rootfstype=9p",
        "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose",
        "ro",
        f"init={BOX_INIT}",
        "random.trust_cpu=on",
        f"tsc_early_khz={host_tsc_khz()}",
        "tsc=reliable",
    ]
    return [
        "qemu-system-x86_64",
        *("-accel", "tcg", "-cpu", options.cpu, "-m", options.memory, "-smp", "1"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", "stdio", "-monitor", "none"),
        *("-kernel", str(kernel), "-append", " ".join(kernel_parameters)),
        *("-fsdev", f"local,id=hostroot,path=/,readonly=on,{nine_p}"),
        *("-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=/dev/root"),
        *("-fsdev", f"local,id=work,path={CHECKOUT},{nine_p}"),
        *("-device", "virtio-9p-pci,fsdev=work,mount_tag=kvmletwork"),
        *("-fsdev", f"local,id=session,path={session},{nine_p}"),
        *("-device", "virtio-9p-pci,fsdev=session,mount_tag=kvmletbox"),
    ]


class ConsoleRelay:
    """Splits the box's console into its boot log and the command's output between markers."""

    def __init__(self, token: str, output: BinaryIO) -> None:
        self._start = f"kvmlet-box: start {token}\n".encode()
        self._end = f"kvmlet-box: end {token}\n".encode()
        self._output = output
        self._pending = b""
        self.boot_log = bytearray()
        self.started = False
        self.finished = False
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def feed(self, data: bytes) -> None:
        self._pending += data
        if not self.started:
            position = self._pending.find(self._start)
            if position < 0:
                keep = len(self._start) - 1
                self.boot_log += self._pending[:-keep]
                self._pending = self._pending[-keep:]
                return
            self.boot_log += self._pending[:position]
            self._pending = self._pending[position + len(self._start) :]
            self.started = True
            self.started_at = time.monotonic()
        if self.finished:
            return
        position = self._pending.find(self._end)
        if position >= 0:
            self._write(self._pending[:position])
            self._pending = b""
            self.finished = True
            self.finished_at = time.monotonic()
            return
        keep = len(self._end) - 1
        self._write(self._pending[:-keep])
        self._pending = self._pending[-keep:]

    def _write(self, data: bytes) -> None:
        if data:
            self._output.write(data)
            self._output.flush()


def run_in_box(argv: list[str], options: BoxOptions, output: BinaryIO) -> int:
    """Runs argv in a fresh box; returns its exit status (124 timeout, 125 box failure)."""
    if shutil.which("qemu-system-x86_64") is None:
        print(
            "testbox: qemu-system-x86_64 not found (apt-get install qemu-system-x86)",
            file=sys.stderr,
        )
        return EXIT_BOX_FAILED
    kernel = options.kernel or default_kernel()
    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="kvmlet-box-") as session_name:
        session = Path(session_name)
        write_session(session, argv, options, token)
        relay = ConsoleRelay(token, output)
        started = time.monotonic()
        qemu = subprocess.Popen(
            qemu_command(kernel, session, options),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        try:
            timed_out = _relay_until_exit(qemu, relay, started + options.timeout)
        finally:
            if qemu.poll() is None:  # interrupted (Ctrl-C, an exception): never leave QEMU behind
                qemu.kill()
                qemu.wait()
        status_file = session / "status"
        status_text = status_file.read_text().strip() if status_file.is_file() else ""
    stopped = time.monotonic()
    elapsed = stopped - started
    if options.verbose or not relay.finished:
        sys.stderr.write(relay.boot_log.decode(errors="replace"))
    if timed_out:
        print(f"testbox: timed out after {options.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if not status_text.isdigit():
        print(f"testbox: the box stopped without a status after {elapsed:.1f} s", file=sys.stderr)
        return EXIT_BOX_FAILED
    if options.verbose and relay.started_at is not None and relay.finished_at is not None:
        boot, command = relay.started_at - started, relay.finished_at - relay.started_at
        print(
            f"testbox: status {status_text}; box start to command {boot:.2f} s, "
            f"command {command:.2f} s, shutdown {stopped - relay.finished_at:.2f} s",
            file=sys.stderr,
        )
    return int(status_text)


def _die_with_parent() -> None:
    """In QEMU's child process: get SIGKILL when this script dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _relay_until_exit(qemu: subprocess.Popen, relay: ConsoleRelay, deadline: float) -> bool:
    """Feeds QEMU's console to the relay in chunks until QEMU exits; True on timeout."""
    assert qemu.stdout is not None
    descriptor = qemu.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                qemu.kill()
                qemu.wait()
                return True
            if not selector.select(timeout=remaining):
                continue
            chunk = os.read(descriptor, 65536)
            if not chunk:
                qemu.wait()
                return False
            relay.feed(chunk)


def main(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run CMD inside the test box (QEMU TCG L1 with a working /dev/kvm).",
        usage="%(prog)s [--timeout S] [--verbose] [--env NAME=VALUE]... -- CMD...",
    )
    parser.add_argument("--timeout", type=float, default=BoxOptions.timeout, help="seconds")
    parser.add_argument("--memory", default=BoxOptions.memory, help="L1 RAM (QEMU -m)")
    parser.add_argument("--cpu", default=BoxOptions.cpu, help="QEMU CPU model with svm and npt")
    parser.add_argument("--kernel", type=Path, help="L1 kernel (default: kvmlet's own)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--verbose", action="store_true", help="print L1's boot log and timing")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    parsed = parser.parse_args(arguments)
    command = parsed.command[1:] if parsed.command[:1] == ["--"] else parsed.command
    if not command:
        parser.error("no command given (put it after --)")
    bad = [item for item in parsed.env if "=" not in item]
    if bad:
        parser.error(f"--env needs NAME=VALUE, got {bad[0]!r}")
    options = BoxOptions(
        timeout=parsed.timeout,
        memory=parsed.memory,
        cpu=parsed.cpu,
        verbose=parsed.verbose,
        kernel=parsed.kernel,
        environment=dict(item.split("=", 1) for item in parsed.env),
    )
    return run_in_box(command, options, sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
