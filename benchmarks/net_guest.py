"""virtio-net seen from the guest: kvmlet against QEMU, same kernel, same initramfs, same backend.

The default guest runs one command under every monitor (busybox only): it sends N MiB to the
host over TCP (`head -c | nc`, in connections of 2 MiB: `SEND_PART`), fetches N MiB from it
over HTTP (`wget`: passt of 2023 does not deliver to a guest that half-closed its side, as
`nc </dev/null` does), then echoes bytes back with `nc -e cat` while the host times
single-byte round trips on that connection. The host's side is a separate process (its CPU
time is not the monitor's) and times all three: the sending from the first connection to the
last byte, the receiving from the guest's request to the guest's close (a sender alone is done
when its socket buffer holds the rest), the round trips one by one. The guest's own clock
(/proc/uptime) around each transfer and the console prompts around the receiving are reported
beside them: prompts pass through each monitor's serial port, whose speed differs.
Cases, interleaved round after round:

- `qemu_tap_vhost`: QEMU, `-netdev tap,vhost=on` and virtio-net-pci;
- `kvmlet_tap_vhost`: kvmlet, `-n tap,vhost=on` (the kernel's vhost-net moves the packets);
- `kvmlet_tap_python`: kvmlet, `-n tap,vhost=off` (the Python data path on the same tap);
- `qemu_passt`: QEMU, `-netdev stream` to a passt started here with kvmlet's options;
- `kvmlet_passt`: kvmlet, `-n user` (passt, through the Python data path).

Tap cases: the guest's kernel configures eth0 (`ip=`) and the host's tap gets the other
address; passt cases: the default guest's init asks passt for a lease, and the host is the
gateway (passt maps it to the host's loopback). Before each phase the guest waits for a
console line, so the CPU time of the monitor process (guest, user, system) is read around each
phase alone; it is read again when the host's side says a transfer begins and ends, which
leaves the console's lines out (for kvmlet, with its vCPU exits by reason).

Where guest user space cannot run (our machines' software KVM) the script runs itself inside
the test box, where both monitors share the same nested KVM.

Prints JSON lines: {"case", "value", "unit", "ratio_to_qemu", ...}.
Usage: python3 benchmarks/net_guest.py [--mib 32] [--round-trips 200] [--rounds 3]
       [--cases qemu_tap_vhost,kvmlet_tap_vhost,...]
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
import textwrap
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from box_relay import needs_test_box, run_in_test_box  # noqa: E402  (beside this script)
from qemu_console import QemuConsole  # noqa: E402  (beside this script)
from virtio_blk_guest import cpu_snapshot  # noqa: E402  (beside this script)

from kvmlet.guest import QuietProgress, ensure_default_guest, parse_exit_status, run_parameter  # noqa: E402
from kvmlet.host.passt import passt_command, unprivileged_user  # noqa: E402
from kvmlet.host.processes import find_program, make_runtime_directory  # noqa: E402
from kvmlet.machine.config import MachineConfig, with_default_guest  # noqa: E402
from kvmlet.machine.machine import Machine  # noqa: E402
from kvmlet.virtio.net.option import NetConfig  # noqa: E402

MIB = 1 << 20
BOOT_TIMEOUT = 300.0
PHASE_TIMEOUT = 240.0
PHASES = ("tx", "rx", "rr")
CASES = ("qemu_tap_vhost", "kvmlet_tap_vhost", "kvmlet_tap_python", "qemu_passt", "kvmlet_passt")
TAP = "nbtap0"
HOST_ADDRESS, GUEST_ADDRESS = "10.20.0.1", "10.20.0.2"
TAP_PARAMETER = f"ip={GUEST_ADDRESS}::{HOST_ADDRESS}:255.255.255.0::eth0:off"
PASST_MTU = 65520
CLOCK_LINE = re.compile(rb"netbench-clock (\w+) ([\d.]+) ([\d.]+)")
FEATURES_LINE = re.compile(rb"netbench-features (\d+)")
MAC = "52:54:00:12:34:56"
SEND_PART = 2 * MIB
"""passt of Debian 12 (0.0~git20230309) resets a long-lived connection from a slow guest
(docs/performance.md, issue 11): the guest sends in parts it finishes well before that."""

PEER = textwrap.dedent(
    r"""
    import json, socket, sys, time
    size, round_trips, connections = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    listeners = [socket.create_server(("0.0.0.0", 0)) for _ in range(3)]
    print(json.dumps([listener.getsockname()[1] for listener in listeners]), flush=True)

    def report(phase, seconds, **extra):
        print(json.dumps({"phase": phase, "seconds": seconds, **extra}), flush=True)

    def mark(phase):                                 # a transfer begins: the monitor's
        print(json.dumps({"begins": phase}), flush=True)  # counters are read now

    buffer, received = bytearray(1 << 20), 0         # tx: the guest sends, in parts
    for index in range(connections):
        connection, _ = listeners[0].accept()
        if index == 0:
            start = time.monotonic()
            mark("tx")
        while count := connection.recv_into(buffer):
            received += count
        connection.close()
    report("tx", time.monotonic() - start, bytes=received, connections=connections)

    connection, _ = listeners[1].accept()            # rx: the guest fetches, as HTTP
    start, request = time.monotonic(), b""
    while b"\r\n\r\n" not in request:
        request += connection.recv(4096)
    mark("rx")
    header = f"HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()
    connection.sendall(header + bytes(size))
    sent = time.monotonic() - start
    try:                                             # the guest closes once it has it all
        while connection.recv(4096):
            pass
    except ConnectionResetError:
        pass
    report("rx", time.monotonic() - start, bytes=size, sent_seconds=sent)
    connection.close()

    connection, _ = listeners[2].accept()            # rr: one byte each way, echoed by cat
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for index in range(round_trips + 10):
        start = time.monotonic()
        connection.sendall(b"x")
        if connection.recv(1) != b"x":
            raise SystemExit("the echo broke off")
        if index >= 10:                              # the first ones warm the path up
            times.append(time.monotonic() - start)
    report("rr", sum(times), round_trips=round_trips, median=sorted(times)[len(times) // 2])
    connection.close()
    """
)


def send_parts(size: int) -> list[int]:
    """The guest→host transfer as connections of at most SEND_PART bytes each."""
    return [min(SEND_PART, size - offset) for offset in range(0, size, SEND_PART)]


def guest_command(ports: list[int], size: int) -> str:
    """The guest's side: each phase after a console line (the host reads counters around it)."""
    tx, rx, rr = ports
    sends = " && ".join(f"head -c {part} /dev/zero | nc $gw {tx}" for part in send_parts(size))
    steps = [
        "gw=$(ip -4 route show default | cut -d' ' -f3)",
        "echo netbench-features $(cat /sys/class/net/eth0/device/features)",
        "grep -e virtio -e LOC -e CAL /proc/interrupts",
        "echo netbench-ready tx",
        "read -r _",
        "read -r start _ </proc/uptime",
        sends,
        "read -r end _ </proc/uptime",
        "echo netbench-clock tx $start $end",
        "echo netbench-ready rx",
        "read -r _",
        "read -r start _ </proc/uptime",
        f"wget -q -O /dev/null http://$gw:{rx}/",
        "read -r end _ </proc/uptime",
        "echo netbench-clock rx $start $end",
        "grep -e virtio -e LOC -e CAL /proc/interrupts",
        "echo netbench-ready rr",
        "read -r _",
        f"nc $gw {rr} -e cat",
        "echo netbench-ready end",
        "read -r _",
    ]
    return " && ".join(steps)


class Peer:
    """The host's side of the transfers, in a process of its own."""

    def __init__(self, size: int, round_trips: int):
        connections = str(len(send_parts(size)))
        self.process = subprocess.Popen(
            [sys.executable, "-c", PEER, str(size), str(round_trips), connections],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ports = json.loads(self.process.stdout.readline())
        self.snapshot = None  # what to read when a transfer begins and ends (set later)
        self.transfers: dict[str, Counter] = {}
        self.entries: dict[str, dict] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """The peer's lines as they come: a transfer's beginning and its figures (its end)."""
        begun: dict[str, Counter] = {}
        for line in self.process.stdout:
            entry = json.loads(line)
            if "phase" in entry:
                self.entries[entry["phase"]] = entry
            try:
                if "begins" in entry and self.snapshot is not None:
                    begun[entry["begins"]] = self.snapshot()
                elif entry.get("phase") in begun:
                    ended = self.snapshot()
                    self.transfers[entry["phase"]] = ended - begun[entry["phase"]]
            except Exception as error:  # no counters for this transfer; the figures stay
                self.transfers[entry.get("phase", entry.get("begins"))] = Counter()
                print(f"net_guest: no counters: {error!r}", file=sys.stderr)

    def results(self) -> dict[str, dict]:
        self.process.wait(PHASE_TIMEOUT)
        self._reader.join(PHASE_TIMEOUT)
        if self.process.returncode != 0:
            raise RuntimeError(f"the host's side failed ({self.process.returncode})")
        return self.entries

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def guest_report(transcript: bytes) -> dict:
    """What the guest printed: each transfer's seconds by its own clock (/proc/uptime, 10 ms
    steps) and the virtio-net features its driver negotiated (bit 0 first, from sysfs)."""
    features = FEATURES_LINE.search(transcript)
    clock = {
        match[1].decode(): float(match[3]) - float(match[2])
        for match in CLOCK_LINE.finditer(transcript)
    }
    negotiated = [] if features is None else [i for i, bit in enumerate(features[1]) if bit == 49]
    return {"guest_clock": clock, "guest_features": negotiated}


def kvmlet_counters(machine: Machine) -> Counter:
    """The monitor's CPU time and its vCPUs' exits by reason (a phase's share tells whether
    the data path or the console took the guest out to Python)."""
    counters = cpu_snapshot("/proc/self/stat")
    for vcpu in machine.stats()["vcpus"]:
        counters.update({f"exits_{reason}": count for reason, count in vcpu["exits"].items()})
    return counters


def gated_phases(wait_for, send_line, snapshot, on_first=None) -> dict[str, Counter]:
    """Lets the guest run one phase at a time; what each phase added to `snapshot()`, and its
    wall time from the line that let it go to the guest's next prompt (`wall_seconds`)."""
    phases: dict[str, Counter] = {}
    previous = None
    for phase in (*PHASES, "end"):
        wait_for(f"netbench-ready {phase}\r?\n")
        arrived = time.monotonic()
        if on_first is not None and previous is None:
            on_first()
        current = snapshot()
        if previous is not None:
            name, before, released = previous
            phases[name] = current - before
            phases[name]["wall_seconds"] = arrived - released
        send_line()
        previous = (phase, current, time.monotonic())
    return phases


def ensure_uplink() -> bool:
    """What passt needs on the host: in the test box, which has no network, loopback up and a
    dummy interface with an address and a default route. True when the dummy was added."""
    route = subprocess.run(
        ["ip", "-4", "route", "show", "default"], capture_output=True, text=True, check=True
    ).stdout
    if route.strip() or os.environ.get("KVMLET_TESTBOX") != "1":
        return False
    for words in (
        ("link", "set", "lo", "up"),
        ("link", "add", "uplink", "type", "dummy"),
        ("addr", "add", "10.9.0.2/24", "dev", "uplink"),
        ("link", "set", "uplink", "up"),
        ("route", "add", "default", "via", "10.9.0.1"),
    ):
        subprocess.run(["ip", *words], check=True)
    return True


def configure_tap() -> None:
    """The host's end of the tap: its address, up (the monitor made the tap)."""
    for words in (("addr", "add", f"{HOST_ADDRESS}/24", "dev", TAP), ("link", "set", TAP, "up")):
        subprocess.run(["ip", *words], check=True)


def run_kvmlet(case: str, initrd: Path, size: int, round_trips: int) -> tuple[dict, dict]:
    peer = Peer(size, round_trips)
    try:
        command = guest_command(peer.ports, size)
        if case == "kvmlet_passt":
            net, parameters = NetConfig("user", mac=MAC), ()
        else:
            vhost = case == "kvmlet_tap_vhost"
            net, parameters = NetConfig("tap", mac=MAC, ifname=TAP, vhost=vhost), (TAP_PARAMETER,)
        config = with_default_guest(MachineConfig(nets=(net,)))
        config = replace(
            config,
            initrd=initrd,
            extra_parameters=(
                *config.extra_parameters,
                "quiet",
                *parameters,
                run_parameter(command),
            ),
        )
        with Machine(config) as machine:

            def wait_for(pattern: str) -> None:
                try:
                    machine.console.wait_for(pattern, PHASE_TIMEOUT, lambda: machine.running)
                except Exception as error:
                    tail = machine.console.text()[-2000:]
                    raise RuntimeError(f"{case}: {error}; the console's end: {tail!r}") from None

            peer.snapshot = lambda: kvmlet_counters(machine)
            setup = configure_tap if case != "kvmlet_passt" else None
            phases = gated_phases(
                wait_for,
                lambda: machine.console.write("\n"),
                lambda: kvmlet_counters(machine),
                setup,
            )
            stats = machine.stats()["virtio"]
            machine.wait(BOOT_TIMEOUT)
            transcript = machine.console.transcript()
        if parse_exit_status(transcript) != 0:
            raise RuntimeError(f"guest command failed under kvmlet:\n{transcript[-2000:]!r}")
        net_stats = next(value for key, value in stats.items() if key.startswith("virtio-net"))
        python_requests = sum(queue["requests"] for queue in net_stats["queues"])
        report = guest_report(transcript)
        results = peer.results()
        report["transfers"] = peer.transfers
        return results, {**phases, "python_requests": python_requests, **report}
    finally:
        peer.kill()


def start_passt_for_qemu() -> tuple[subprocess.Popen, str]:
    """passt as kvmlet starts it (same options, MTU included), listening for QEMU."""
    run_as = unprivileged_user() if os.geteuid() == 0 else None
    directory = make_runtime_directory("passt", owner=run_as, base="/tmp")
    socket_path = os.path.join(directory, "passt.socket")
    argv = passt_command(find_program("passt", "passt"), socket_path, (), PASST_MTU, run_as)
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(socket_path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("passt did not start")
        time.sleep(0.05)
    return process, socket_path


def run_qemu(case: str, kernel: Path, initrd: Path, size: int, round_trips: int):
    peer = Peer(size, round_trips)
    passt = None
    try:
        command = guest_command(peer.ports, size)
        parameters = f"console=ttyS0 reboot=k panic=-1 quiet {run_parameter(command)}"
        if case == "qemu_passt":
            passt, socket_path = start_passt_for_qemu()
            netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={socket_path}"
        else:
            netdev = f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=on"
            parameters += f" {TAP_PARAMETER}"
        qemu = [
            *("qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-cpu", "host", "-m", "256M"),
            *("-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd)),
            *("-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"),
            *("-append", parameters),
        ]
        console = QemuConsole(qemu, PHASE_TIMEOUT, BOOT_TIMEOUT)
        try:
            stat_path = f"/proc/{console.process.pid}/stat"
            peer.snapshot = lambda: cpu_snapshot(stat_path)
            setup = configure_tap if case == "qemu_tap_vhost" else None
            phases = gated_phases(
                console.wait_for, console.send_line, lambda: cpu_snapshot(stat_path), setup
            )
            transcript = console.finish()
        finally:
            console.process.kill()
            console.process.wait()
        if parse_exit_status(transcript) != 0:
            raise RuntimeError(f"guest command failed under QEMU:\n{transcript[-2000:]!r}")
        results = peer.results()
        return results, {**phases, **guest_report(transcript), "transfers": peer.transfers}
    finally:
        peer.kill()
        if passt is not None:
            passt.kill()
            passt.wait()


def figures(results: dict[str, dict], phases: dict) -> dict[str, float]:
    """Both transfers timed by the host's side: sending from the connection to the guest's
    last byte, receiving from the guest's request to its close (the guest closes once it has
    every byte; the host's sender alone would finish when its socket buffer holds the rest).
    For comparison, the same by the guest's clock and by the console prompts around a phase
    (these pass through each monitor's serial port, at its own speed)."""
    tx_mib, rx_mib = results["tx"]["bytes"] / MIB, results["rx"]["bytes"] / MIB
    clock = phases["guest_clock"]
    return {
        "tx_mibps": tx_mib / results["tx"]["seconds"],
        "rx_mibps": rx_mib / results["rx"]["seconds"],
        "rr_us": 1e6 * results["rr"]["seconds"] / results["rr"]["round_trips"],
        "tx_guest_clock_mibps": tx_mib / max(clock["tx"], 0.01),
        "rx_guest_clock_mibps": rx_mib / max(clock["rx"], 0.01),
        "rx_prompts_mibps": rx_mib / phases["rx"]["wall_seconds"],
    }


UNITS = {"tx_mibps": "MiB/s guest→host", "rx_mibps": "MiB/s host→guest", "rr_us": "µs/round trip"}
UNITS |= {"tx_guest_clock_mibps": "MiB/s guest→host by the guest's clock"}
UNITS |= {"rx_guest_clock_mibps": "MiB/s host→guest by the guest's clock"}
UNITS |= {"rx_prompts_mibps": "MiB/s host→guest between console prompts"}
REFERENCE = {"kvmlet_tap_vhost": "qemu_tap_vhost", "kvmlet_tap_python": "qemu_tap_vhost"}
REFERENCE["kvmlet_passt"] = "qemu_passt"


def measure(args: argparse.Namespace) -> None:
    guest = ensure_default_guest(progress=QuietProgress())
    emit({"case": "environment", "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]})
    cases = [case for case in args.cases.split(",") if case]
    size = args.mib * MIB
    samples: dict[tuple[str, str], list[float]] = {}
    cpu: dict[str, list[tuple[Counter, float]]] = {}
    for _ in range(args.rounds):
        for case in cases:
            if case.startswith("qemu"):
                results, phases = run_qemu(
                    case, guest.vmlinux, guest.initrd, size, args.round_trips
                )
            else:
                results, phases = run_kvmlet(case, guest.initrd, size, args.round_trips)
                emit(
                    {
                        "case": f"{case}_python_requests",
                        "value": phases["python_requests"],
                        "unit": "virtio-net requests handled in Python",
                        "ratio_to_qemu": None,
                    }
                )
            run_figures = figures(results, phases)
            emit({"case": f"{case}_run", **{k: round(v, 2) for k, v in run_figures.items()}})
            emit(
                {
                    "case": f"{case}_phases",
                    **{
                        phase: {name: round(value, 3) for name, value in phases[phase].items()}
                        for phase in PHASES
                    },
                    "guest_features": phases["guest_features"],
                    "during_transfers": {
                        phase: {name: round(value, 3) for name, value in counters.items()}
                        for phase, counters in phases["transfers"].items()
                    },
                }
            )
            for name, value in run_figures.items():
                samples.setdefault((case, name), []).append(value)
            for phase in ("tx", "rx"):
                cpu.setdefault(f"{case}:{phase}", []).append((phases[phase], args.mib))
    for (case, name), values in samples.items():
        value = statistics.median(values)
        reference = samples.get((REFERENCE.get(case, ""), name))
        ratio = None
        if reference:
            qemu = statistics.median(reference)
            ratio = qemu / value if name == "rr_us" else value / qemu  # above 1: kvmlet better
        emit(
            {
                "case": f"{case}_{name}",
                "value": round(value, 2),
                "unit": UNITS[name],
                "ratio_to_qemu": None if ratio is None else round(ratio, 3),
                "samples": [round(sample, 2) for sample in values],
                "mib": args.mib,
            }
        )
    for key, runs in cpu.items():
        case, phase = key.split(":")
        mib = sum(count for _, count in runs)
        total: Counter = Counter()
        for counters, _ in runs:
            total.update({key: value for key, value in counters.items() if key.startswith("cpu")})
        per_mib = {name: round(1000 * seconds / mib, 2) for name, seconds in total.items()}
        emit(
            {
                "case": f"{case}_{phase}_cpu_per_mib",
                "value": round(sum(per_mib.values()), 2),
                "unit": "monitor CPU ms/MiB",
                "ratio_to_qemu": None,
                **per_mib,
            }
        )


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB sent each way")
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per case")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--here", action="store_true", help="run on this host's KVM")
    args = parser.parse_args()
    if needs_test_box(args.here):
        return run_in_test_box(__file__, sys.argv[1:], timeout=2400)
    if os.geteuid() != 0 or not os.path.exists("/dev/vhost-net"):
        print("net_guest: needs root and /dev/vhost-net (the test box has both)", file=sys.stderr)
        return 1
    for tool in ("qemu-system-x86_64", "passt"):
        if shutil.which(tool) is None:
            print(f"net_guest: {tool} is not installed", file=sys.stderr)
            return 1
    started = time.monotonic()
    added_uplink = ensure_uplink()
    try:
        measure(args)
    finally:
        if added_uplink:
            subprocess.run(["ip", "link", "delete", "uplink"], check=True)
    print(f"net_guest: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
