"""Control API under load: latency of 1,000 sequential and 50 concurrent clients' requests, and
whether the guest keeps running and answering meanwhile.

A child process runs the machine and its API server, as `kvmlet run` does; this process is
the client, so the two do not share an interpreter lock. The guest is, where this host's KVM
runs guest user space, kvmlet's default Linux guest, whose shell is probed with `echo` over the
serial console; elsewhere (host profile pvm) a tiny real-mode guest that echoes every byte it
reads from COM1 in a busy loop, which exits to the monitor on every status poll: its exit rate
shows what the API's work takes from the guest.

Phases: idle (no requests), sequential (1,000 GET /v1/vm on one kept-alive connection, then
200 GET /v1/vm/stats), concurrent (50 connections, 20 GET /v1/vm each, all in flight at
once, driven from one thread with non-blocking sockets so the client adds no lock of its own).
Meanwhile the child sends the guest a console probe every 100 ms and times its echo, and the
parent samples the vCPU's exit counts at each phase's edges.

    python3 benchmarks/api_load.py [--guest tiny|linux] [--requests N] [--clients N]

Prints JSON lines: environment, one line per phase (latency p50/p99/max in ms, requests/s),
and one per phase of the guest's exits/s and console echo latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvmlet
from kvmlet.vstate import host_profile

# L: mov dx, 0x3fd ; in al, dx ; test al, 1 ; jz L ; mov dx, 0x3f8 ; in al, dx ; out dx, al ; jmp L
ECHO_GUEST = bytes.fromhex("bafd03 ec a801 74f8 baf803 ec ee ebf1")
PROBE_INTERVAL = 0.1


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 3),
        "max_ms": round(max(latencies) * 1e3, 3),
    }


# -- the child: a machine, its API, a console prober -------------------------------------------


def serve(kind: str, socket_path: str) -> None:
    from kvmlet.guest import READY_MARKER
    from kvmlet.machine.machine import Machine

    if kind == "linux":
        config = kvmlet.with_default_guest(kvmlet.MachineConfig(memory=256 << 20))
    else:
        config = kvmlet.MachineConfig(boot_code=ECHO_GUEST, rng=False, host_profile="none")
    with Machine(config) as machine, kvmlet.serve(machine, socket_path=socket_path):
        if kind == "linux":
            machine.console.wait_for(READY_MARKER, 300, lambda: machine.running)
        probes: list[tuple[float, float | None]] = []
        stop = threading.Event()
        prober = threading.Thread(target=probe_console, args=(machine, kind, probes, stop))
        prober.start()
        print("ready", flush=True)
        sys.stdin.readline()  # the parent is done
        stop.set()
        prober.join()
        print(json.dumps(probes), flush=True)
        machine.shutdown()


def probe_console(machine, kind: str, probes: list, stop: threading.Event) -> None:
    """Every PROBE_INTERVAL: send the guest something and time its answer (None: no answer
    within 5 s)."""
    number = 0
    while not stop.wait(PROBE_INTERVAL):
        number += 1
        token = f"p{number}q"
        sent = time.monotonic()
        if kind == "linux":
            machine.console.write(f"echo {token[:-1]}''q\n")
        else:
            machine.console.write(token)
        probes.append((sent, wait_for_echo(machine, token, sent + 5.0)))


def wait_for_echo(machine, token: str, deadline: float) -> float | None:
    """Seconds until `token` shows at the end of the console output (looked at every
    millisecond), or None at the deadline."""
    sent = deadline - 5.0
    expected = token.encode()
    while time.monotonic() < deadline:
        if expected in machine.console.tail(256)[0]:
            return time.monotonic() - sent
        time.sleep(0.001)
    return None


# -- the parent: load and measurements -----------------------------------------------------------


def exits(client) -> int:
    return sum(sum(vcpu.exits.values()) for vcpu in client.stats().vcpus)


def sequential(client, path: str, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        client.request("GET", path)
        latencies.append(time.perf_counter() - started)
    return latencies


def concurrent(socket_path: str, clients: int, per_client: int) -> tuple[list[float], int]:
    """`clients` connections with one request each in flight, `per_client` in turn."""
    request = b"GET /v1/vm HTTP/1.1\r\nhost: kvmlet\r\n\r\n"
    poller = select.poll()
    state = {}
    latencies: list[float] = []
    errors = 0
    for _ in range(clients):
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(socket_path)
        connection.setblocking(False)
        state[connection.fileno()] = [connection, per_client, b"", time.perf_counter()]
        connection.send(request)
        poller.register(connection, select.POLLIN)
    while state:
        for fd, _ in poller.poll(30_000):
            entry = state[fd]
            connection = entry[0]
            data = connection.recv(65536)
            if not data:
                errors += entry[1]
                poller.unregister(fd)
                del state[fd]
                continue
            entry[2] += data
            head, separator, body = entry[2].partition(b"\r\n\r\n")
            if not separator:
                continue
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) < length:
                continue
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            latencies.append(time.perf_counter() - entry[3])
            entry[1] -= 1
            entry[2] = body[length:]
            if entry[1] == 0:
                poller.unregister(fd)
                connection.close()
                del state[fd]
            else:
                entry[3] = time.perf_counter()
                connection.send(request)
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guest", choices=("tiny", "linux"), default=None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of the idle phase")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    options = parser.parse_args()
    profile = host_profile.detect().name
    kind = options.guest or ("linux" if profile == "none" else "tiny")
    if options.serve:
        serve(kind, options.serve)
        return
    print(
        json.dumps(
            {
                "case": "environment",
                "guest": kind,
                "host_profile": profile,
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "load_average": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="kvmlet-api-load-") as directory:
        environment = {**os.environ, "XDG_RUNTIME_DIR": directory}
        socket_path = os.path.join(directory, "load.sock")
        child = subprocess.Popen(
            [sys.executable, __file__, "--guest", kind, "--serve", socket_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
        )
        try:
            assert child.stdout.readline().strip() == "ready", "the machine did not start"
            results = measure(socket_path, options)
            child.stdin.write("stop\n")
            child.stdin.flush()
            probes = json.loads(child.stdout.readline())
        finally:
            child.kill()
            child.wait()
    report(results, probes)


def measure(socket_path: str, options: argparse.Namespace) -> dict:
    phases: dict[str, dict] = {}
    with kvmlet.connect(socket_path) as client:
        start_exits, started = exits(client), time.monotonic()
        time.sleep(options.idle)
        phases["idle"] = {
            "window": (started, time.monotonic()),
            "exits": (start_exits, exits(client)),
        }

        start_exits, started = exits(client), time.monotonic()
        describe = sequential(client, "/v1/vm", options.requests)
        stats = sequential(client, "/v1/vm/stats", options.requests // 5)
        window = (started, time.monotonic())
        phases["sequential"] = {
            "window": window,
            "exits": (start_exits, exits(client)),
            "describe": describe,
            "stats": stats,
        }

        start_exits, started = exits(client), time.monotonic()
        latencies, errors = concurrent(
            socket_path, options.clients, options.requests // options.clients
        )
        phases["concurrent"] = {
            "window": (started, time.monotonic()),
            "exits": (start_exits, exits(client)),
            "describe": latencies,
            "errors": errors,
            "clients": options.clients,
        }
    return phases


def report(phases: dict, probes: list) -> None:
    for name in ("sequential", "concurrent"):
        phase = phases[name]
        elapsed = phase["window"][1] - phase["window"][0]
        for endpoint in ("describe", "stats"):
            latencies = phase.get(endpoint)
            if not latencies:
                continue
            line = {
                "case": f"{name}_{endpoint}",
                "requests": len(latencies),
                **summary(latencies),
            }
            if name == "concurrent":
                line.update(
                    clients=phase["clients"],
                    errors=phase["errors"],
                    requests_per_second=round(len(latencies) / elapsed, 1),
                )
            print(json.dumps(line), flush=True)
    for name, phase in phases.items():
        low, high = phase["window"]
        echoes = [latency for sent, latency in probes if low <= sent < high]
        answered = [latency for latency in echoes if latency is not None]
        line = {
            "case": f"guest_during_{name}",
            "seconds": round(high - low, 2),
            "exits_per_second": round((phase["exits"][1] - phase["exits"][0]) / (high - low)),
            "console_probes": len(echoes),
            "console_unanswered": len(echoes) - len(answered),
        }
        if answered:
            line.update({f"echo_{key}": value for key, value in summary(answered).items()})
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
