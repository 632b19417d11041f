"""Devices served outside Python, seen from the guest: kvmlet against QEMU with the same backend.

Three comparisons, each side by side in one run, interleaved round by round, same kernel, same
initrd, same backend program and options:

- vhost-user-blk: virtio_blk_guest.py's guest program (O_DIRECT sequential 1 MiB reads and
  writes, random 4 KiB reads at depth 1 and 8) on a disk qemu-storage-daemon exports, under
  QEMU (`vhost-user-blk-pci`, RAM in a shared memfd) and kvmlet (`-d vhost-user=`), and on
  kvmlet's own Python virtio-blk over the same image file for the gain;
- virtiofs: a guest program writes a 64 MiB file in 1 MiB writes and fsyncs it, drops the
  guest's caches, reads it back, then creates, stats and unlinks 1,000 files; Debian's
  virtiofsd with the same options under QEMU (`vhost-user-fs-pci`) and kvmlet (`--fs`);
- vsock: the guest sends 64 MiB to a host socket, then does 2,000 one-byte round trips with a
  host echo (a process of its own under both monitors); the kernel's vhost-vsock under QEMU
  (`vhost-vsock-pci`, its default 3 MSI-X vectors, and "qemu-vectors4": a vector per queue)
  and kvmlet (`--vsock`).

Each phase is timed by the guest's own clock, whose clocksource each run prints; after each
kvmlet run its counters say what went through Python (exits by reason; per device its
doorbell exits, the requests Python served, and whether calls went by irqfd or relay).
Where guest user space cannot run (our machines' software KVM) the script runs itself inside
the test box, as virtio_blk_guest.py does.

Prints JSON lines: per run {"case": "run", ...}, per comparison and round {"case": "sample",
...}, then per figure {"case", "monitor", "value", "range", "ratio_to_qemu", "rounds"}.
Usage: python3 benchmarks/vhost_guest.py [--rounds 3] [--only blk,fs,vsock]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))
sys.path.insert(0, str(CHECKOUT / "benchmarks"))

import virtio_blk_guest as blk  # noqa: E402
from box_relay import needs_test_box, run_in_test_box  # noqa: E402

from kvmlet.guest import QuietProgress, ensure_default_guest, parse_exit_status, run_parameter  # noqa: E402
from kvmlet.guest.cpio import CpioWriter  # noqa: E402
from kvmlet.host.virtiofsd import find_virtiofsd  # noqa: E402
from kvmlet.machine.config import DiskConfig, MachineConfig, with_default_guest  # noqa: E402
from kvmlet.machine.machine import Machine  # noqa: E402
from kvmlet.machine.vhost_config import FilesystemConfig, VhostUserDiskConfig  # noqa: E402

MIB = 1 << 20
PROGRAM = "/bin/vhostbench"
FILE_MIB = 64
META_FILES = 1000
VSOCK_MIB = 64
ROUND_TRIPS = 2000
SINK_PORT, ECHO_PORT = 7001, 7002
GUEST_CID = 42
TIMEOUT = 600.0
RESULT = re.compile(r"vhostbench: (?P<mode>\w+) units=(?P<units>\d+) seconds=(?P<seconds>[\d.]+)")
CLOCKSOURCE = re.compile(r"vhostbench-clocksource: (?P<name>\S+)")
SHOW_CLOCKSOURCE = (
    "echo vhostbench-clocksource: "
    "$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
)

VHOSTBENCH_C = r"""
/* vhostbench fs DIR MIB FILES | vsock PORT MIB TRIPS: one line per phase, timed here. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static void report(const char *mode, unsigned long long units, double start) {
    printf("vhostbench: %s units=%llu seconds=%.6f\n", mode, units, now() - start);
    fflush(stdout);
}
static int die(const char *what) { perror(what); return 1; }
static char buffer[1 << 20];

static int fs(const char *dir, int mib, int files) {
    char path[4096];
    snprintf(path, sizeof path, "%s/bench.dat", dir);
    memset(buffer, 0x5a, sizeof buffer);
    double start = now();
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return die("open");
    for (int i = 0; i < mib; i++)
        if (write(fd, buffer, sizeof buffer) != sizeof buffer) return die("write");
    if (fsync(fd) || close(fd)) return die("fsync");
    report("fs_seqwrite", (unsigned long long)mib << 20, start);
    int drop = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (drop < 0 || write(drop, "3", 1) != 1) return die("drop_caches");
    close(drop);
    start = now();
    fd = open(path, O_RDONLY);
    unsigned long long total = 0;
    ssize_t got;
    while ((got = read(fd, buffer, sizeof buffer)) > 0) total += got;
    if (got < 0 || total != (unsigned long long)mib << 20) return die("read");
    close(fd);
    report("fs_seqread", total, start);
    unlink(path);
    start = now();
    struct stat st;
    for (int i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/m%d", dir, i);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0 || close(fd)) return die("create");
    }
    for (int i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/m%d", dir, i);
        if (stat(path, &st)) return die("stat");
    }
    for (int i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/m%d", dir, i);
        if (unlink(path)) return die("unlink");
    }
    report("fs_meta", files, start);
    return 0;
}

static int connect_host(int port) {
    struct sockaddr_vm address = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = port};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&address, sizeof address)) return -1;
    return fd;
}

static int vsock(int port, int mib, int trips) {
    int fd = connect_host(port);
    if (fd < 0) return die("connect sink");
    double start = now();
    for (int i = 0; i < mib; i++)
        for (size_t done = 0; done < sizeof buffer;) {
            ssize_t sent = write(fd, buffer + done, sizeof buffer - done);
            if (sent <= 0) return die("send");
            done += sent;
        }
    shutdown(fd, SHUT_WR);
    char ack;
    if (read(fd, &ack, 1) != 1) return die("ack");
    report("vsock_send", (unsigned long long)mib << 20, start);
    close(fd);
    fd = connect_host(port + 1);
    if (fd < 0) return die("connect echo");
    char byte = 'x';
    start = now();
    for (int i = 0; i < trips; i++)
        if (write(fd, &byte, 1) != 1 || read(fd, &byte, 1) != 1) return die("round trip");
    report("vsock_rtt", trips, start);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "fs")) return fs(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "vsock"))
        return vsock(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: vhostbench fs DIR MIB FILES | vsock PORT MIB TRIPS\n");
    return 2;
}
"""

FS_COMMAND = (
    f"mkdir -p /mnt/fs && mount -t virtiofs bench /mnt/fs && {PROGRAM} fs /mnt/fs {FILE_MIB} "
    f"{META_FILES}"
)
VSOCK_COMMAND = f"{PROGRAM} vsock {SINK_PORT} {VSOCK_MIB} {ROUND_TRIPS}"


def build_initrd(work: Path, base_initrd: Path) -> Path:
    """The default initrd plus blkbench (virtio_blk_guest.py's) and vhostbench."""
    initrd = blk.build_initrd(work, base_initrd)
    source, program = work / "vhostbench.c", work / "vhostbench"
    source.write_text(VHOSTBENCH_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(program), str(source)], check=True)
    extra = io.BytesIO()
    writer = CpioWriter(extra)
    writer.add_file(PROGRAM, program.read_bytes(), mode=0o755)
    writer.finish()
    with initrd.open("ab") as archive:
        archive.write(extra.getvalue())
    return initrd


def parse(text: str) -> dict[str, float]:
    """Each phase's figure: MiB/s, operations per second, or microseconds per round trip."""
    figures = {}
    for match in RESULT.finditer(text):
        mode, units, seconds = match["mode"], int(match["units"]), float(match["seconds"])
        if mode == "vsock_rtt":
            figures["vsock_rtt_us"] = seconds / units * 1e6
        elif mode == "fs_meta":  # a create, a stat and an unlink per file
            figures["fs_meta_ops_per_s"] = 3 * units / seconds
        else:
            figures[f"{mode}_mibps"] = units / MIB / seconds
    for mode, result in blk.parse_results(text).items():
        case, value, _ = blk.figure(mode, result)
        figures[f"blk_{case}"] = value
    return figures


# -- backends and host ends -----------------------------------------------------------------


def storage_daemon(work: Path, image: Path) -> tuple[subprocess.Popen, Path]:
    path = work / "qsd.sock"
    path.unlink(missing_ok=True)
    daemon = subprocess.Popen(
        [
            *("qemu-storage-daemon", "--blockdev"),
            f"driver=file,node-name=disk,filename={image},cache.direct=off",
            "--export",
            f"type=vhost-user-blk,id=e,node-name=disk,writable=on,addr.type=unix,addr.path={path}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_socket(path, daemon)
    return daemon, path


def virtiofsd(work: Path, share: Path) -> tuple[subprocess.Popen, Path]:
    """Debian's virtiofsd with the options kvmlet gives its own (as root: no wrapper)."""
    path = work / "virtiofsd.sock"
    path.unlink(missing_ok=True)
    daemon = subprocess.Popen(
        [
            find_virtiofsd(),
            f"--socket-path={path}",
            "-o",
            f"source={share}",
            "-o",
            "sandbox=namespace",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_socket(path, daemon)
    return daemon, path


def wait_for_socket(path: Path, daemon: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{daemon.args[0]} did not listen on {path}")
        time.sleep(0.05)


class VsockHost:
    """The host end of the vsock phases: a sink that acknowledges the end of the data with one
    byte, and an echo for the round trips; each serves connections until closed."""

    def __init__(self):
        self.sockets = []
        for port, serve in ((SINK_PORT, self._sink), (ECHO_PORT, self._echo)):
            listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            listener.bind((socket.VMADDR_CID_ANY, port))
            listener.listen(4)
            self.sockets.append(listener)
            threading.Thread(target=self._accept, args=(listener, serve), daemon=True).start()

    @staticmethod
    def _accept(listener, serve) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                serve(connection)

    @staticmethod
    def _sink(connection) -> None:
        buffer = bytearray(1 << 18)
        while connection.recv_into(buffer):
            pass
        connection.sendall(b"k")

    @staticmethod
    def _echo(connection) -> None:
        while data := connection.recv(64):
            connection.sendall(data)

    def close(self) -> None:
        for listener in self.sockets:
            listener.close()


# -- the monitors ---------------------------------------------------------------------------


def run_kvmlet(config: MachineConfig, command: str, label: str) -> dict[str, float]:
    config = replace(
        config, extra_parameters=("quiet", run_parameter(f"{SHOW_CLOCKSOURCE} && {command}"))
    )
    with Machine(config) as machine:
        machine.wait(TIMEOUT)
        transcript = machine.console.transcript()
        counters = kvmlet_counters(machine.stats())
    return checked(transcript, label, counters)


def kvmlet_counters(stats: dict) -> dict:
    """What went through the monitor's Python: the vCPUs' exits by reason, and per virtio
    device its doorbell exits, the requests Python served, and how the calls reached the guest
    (a vhost device's doorbells and calls should bypass Python: 0 notify exits, irqfd)."""
    exits: dict[str, int] = {}
    for vcpu in stats["vcpus"]:
        for reason, count in vcpu["exits"].items():
            exits[reason] = exits.get(reason, 0) + count
    devices = {}
    for name, device in stats["virtio"].items():
        if name == "workers":
            continue
        queues = device["queues"]
        devices[name] = {
            "notify_exits": device.get("notify_exits"),
            "notifications": sum(queue["notifications"] for queue in queues),
            "requests": sum(queue["requests"] for queue in queues),
            "interrupts": sum(queue["interrupts"] for queue in queues),
        }
        if "calls" in device:
            devices[name]["calls"] = device["calls"]
    return {"exits": {k: v for k, v in exits.items() if v}, "devices": devices}


def run_qemu(
    kernel: Path, initrd: Path, devices: list[str], command: str, label: str = "qemu"
) -> dict[str, float]:
    command = f"{SHOW_CLOCKSOURCE} && {command}"
    qemu = [
        *("qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-cpu", "host", "-m", "256M"),
        *("-object", "memory-backend-memfd,id=ram,size=256M,share=on"),
        *("-machine", "memory-backend=ram", "-nographic", "-no-reboot"),
        *("-kernel", str(kernel), "-initrd", str(initrd), *devices),
        *("-append", f"console=ttyS0 reboot=k panic=-1 quiet {run_parameter(command)}"),
    ]
    result = subprocess.run(qemu, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    return checked(result.stdout, label, {})


def checked(transcript: bytes, label: str, counters: dict) -> dict[str, float]:
    """The guest's figures; the run's clocksource and the monitor's counters are printed."""
    if parse_exit_status(transcript) != 0:
        raise RuntimeError(f"guest command failed under {label}:\n{transcript[-2000:]!r}")
    text = transcript.decode(errors="replace")
    clocksource = CLOCKSOURCE.search(text)
    blk.emit(
        {
            "case": "run",
            "monitor": label,
            "clocksource": clocksource["name"] if clocksource else None,
            **counters,
        }
    )
    return parse(text)


def in_order(monitors: tuple[str, ...], reverse: bool) -> tuple[str, ...]:
    """Every other round runs the monitors backwards, so a drift of the host's load over a
    round favours none of them."""
    return monitors[::-1] if reverse else monitors


def blk_round(
    work: Path, guest, initrd: Path, base: MachineConfig, seconds: float, reverse: bool
) -> dict:
    command = blk.guest_command(seconds, gated=False)
    figures = {}
    for monitor in in_order(("qemu", "kvmlet", "kvmlet-python"), reverse):
        image = blk.make_image(work / "disk.img", 64 * MIB)
        if monitor == "kvmlet-python":
            config = replace(base, disks=(DiskConfig(image),))
            figures[monitor] = run_kvmlet(config, command, monitor)
            continue
        daemon, path = storage_daemon(work, image)
        try:
            if monitor == "qemu":
                devices = ["-chardev", f"socket,id=blk,path={path}"]
                devices += ["-device", "vhost-user-blk-pci,chardev=blk,num-queues=1"]
                figures[monitor] = run_qemu(guest.vmlinux, initrd, devices, command)
            else:
                config = replace(base, vhost_user_disks=(VhostUserDiskConfig(path),))
                figures[monitor] = run_kvmlet(config, command, monitor)
        finally:
            daemon.terminate()
            daemon.wait(30)
    return figures


def fs_round(work: Path, guest, initrd: Path, base: MachineConfig, reverse: bool) -> dict:
    share = work / "share"
    share.mkdir(exist_ok=True)
    figures = {}
    for monitor in in_order(("qemu", "kvmlet"), reverse):
        if monitor == "kvmlet":
            config = replace(base, filesystems=(FilesystemConfig("bench", str(share)),))
            figures[monitor] = run_kvmlet(config, FS_COMMAND, monitor)
            continue
        daemon, path = virtiofsd(work, share)
        try:
            devices = ["-chardev", f"socket,id=fs,path={path}"]
            devices += ["-device", "vhost-user-fs-pci,chardev=fs,tag=bench"]
            figures[monitor] = run_qemu(guest.vmlinux, initrd, devices, FS_COMMAND)
        finally:
            daemon.terminate()
            daemon.wait(30)
    return figures


def serve_vsock_host() -> int:
    """The host end in a process of its own (`--vsock-host`), until its stdin closes: beside
    kvmlet in the benchmark's process, its threads would queue for that process's GIL."""
    host = VsockHost()
    print("ready", flush=True)
    sys.stdin.read()
    host.close()
    return 0


def vsock_round(guest, initrd: Path, base: MachineConfig, reverse: bool) -> dict:
    host = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--vsock-host"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if host.stdout.readline().strip() != "ready":
            raise RuntimeError("the vsock host end did not start")
        figures = {}
        for monitor in in_order(("qemu", "qemu-vectors4", "kvmlet"), reverse):
            if monitor == "kvmlet":
                config = replace(base, vsock_cid=GUEST_CID)
                figures[monitor] = run_kvmlet(config, VSOCK_COMMAND, monitor)
                continue
            vectors = ",vectors=4" if monitor == "qemu-vectors4" else ""
            devices = ["-device", f"vhost-vsock-pci,guest-cid={GUEST_CID}{vectors}"]
            figures[monitor] = run_qemu(guest.vmlinux, initrd, devices, VSOCK_COMMAND, monitor)
    finally:
        host.stdin.close()
        host.wait(30)
    return figures


def sample(figures: dict) -> dict:
    """One comparison's figures, printed as they come (a later failure keeps them)."""
    for monitor, values in figures.items():
        blk.emit(
            {"case": "sample", "monitor": monitor, **{k: round(v, 2) for k, v in values.items()}}
        )
    return figures


def measure(args: argparse.Namespace) -> None:
    guest = ensure_default_guest(progress=QuietProgress())
    blk.emit({"case": "environment", "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]})
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmlet-vhost-bench-") as directory:
        work = Path(directory)
        initrd = build_initrd(work, guest.initrd)
        base = with_default_guest(MachineConfig(initrd=initrd))
        for index in range(args.rounds):
            reverse = index % 2 == 1
            rounds = []
            if "blk" in args.only:
                rounds.append(sample(blk_round(work, guest, initrd, base, args.seconds, reverse)))
            if "fs" in args.only:
                rounds.append(sample(fs_round(work, guest, initrd, base, reverse)))
            if "vsock" in args.only:
                rounds.append(sample(vsock_round(guest, initrd, base, reverse)))
            for figures in rounds:
                for monitor, values in figures.items():
                    for case, value in values.items():
                        samples.setdefault((case, monitor), []).append(value)
    for (case, monitor), values in sorted(samples.items()):
        qemu = statistics.median(samples[(case, "qemu")])
        value = statistics.median(values)
        lower_is_better = case.endswith("_us")
        blk.emit(
            {
                "case": case,
                "monitor": monitor,
                "value": round(value, 2),
                "range": [round(min(values), 2), round(max(values), 2)],
                "ratio_to_qemu": round(qemu / value if lower_is_better else value / qemu, 3),
                "rounds": len(values),
            }
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per monitor")
    parser.add_argument("--seconds", type=float, default=3.0, help="each block phase")
    parser.add_argument("--only", default="blk,fs,vsock", help="comparisons to run")
    parser.add_argument("--here", action="store_true", help="run on this host's KVM")
    parser.add_argument("--vsock-host", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vsock_host:
        return serve_vsock_host()
    if needs_test_box(args.here):
        print(
            json.dumps({"case": "host", "cpus": os.cpu_count(), "load_before": os.getloadavg()}),
            flush=True,
        )
        status = run_in_test_box(__file__, sys.argv[1:], timeout=2400)
        print(json.dumps({"case": "host", "load_after": os.getloadavg()}), flush=True)
        return status
    for tool in ("qemu-system-x86_64", "qemu-storage-daemon", "gcc"):
        if shutil.which(tool) is None:
            print(f"vhost_guest: {tool} is not installed", file=sys.stderr)
            return 1
    started = time.monotonic()
    measure(args)
    print(f"vhost_guest: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
