"""Helpers for the control API's tests: a machine the router can drive without KVM, a server
on a temporary socket, and raw HTTP over a UNIX socket (for requests no client library would
send)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from kvmlet.api.http import DEFAULT_LIMITS, HttpServer, Limits
from kvmlet.api.router import ApiError, Router
from kvmlet.errors import KvmletError


class FakeMachine:
    """The router's `Target` with the states and refusals of a real machine, no KVM."""

    def __init__(self, balloon: bool = True, memory: int = 256 << 20):
        self.state = "running"
        self.memory = memory
        self.has_balloon = balloon
        self.target_bytes = 0
        self.calls: list[tuple] = []

    def describe(self) -> dict:
        return {
            "name": "fake",
            "api_socket": "/run/fake.sock",
            "pid": os.getpid(),
            "state": self.state,
            "vcpus": 2,
            "memory_bytes": self.memory,
            "uptime_seconds": 12.5,
            "paused_seconds": 0.0,
            "kernel": "/boot/vmlinux",
            "initrd": None,
            "cmdline": "console=ttyS0",
            "console": "serial",
            "host_profile": "none",
            "disks": [],
            "devices": [{"name": "com1", "type": "uart-16550a", "port": 0x3F8}],
            "versions": {"kvmlet": "0.1.0", "python": "3.11", "kvm_api": 12, "host_kernel": "6"},
        }

    def pause(self) -> dict:
        self.calls.append(("pause",))
        if self.state == "stopped":
            raise KvmletError("cannot pause: the machine is stopped")
        self.state = "paused"
        return self.describe()

    def resume(self) -> dict:
        self.calls.append(("resume",))
        if self.state == "stopped":
            raise KvmletError("cannot resume: the machine is stopped")
        self.state = "running"
        return self.describe()

    def stop(self, force: bool, grace_seconds: float) -> dict:
        self.calls.append(("stop", force, grace_seconds))
        if self.state == "paused" and not force:
            raise KvmletError("the machine is paused: resume it first, or stop it with force")
        self.state = "stopped"
        return {
            "state": "stopped",
            "reason": "host_quit" if force else "reset",
            "message": "stopped",
            "clean": not force,
            "exit_status": 0,
        }

    def stats(self) -> dict:
        return {
            "vcpus": [{"id": 0, "exits": {"io": 10, "mmio": 2, "intr": 1}}],
            "port_io": {"regions": {"com1": {"reads": 1, "writes": 9}}},
            "mmio": {"regions": {}},
            "legacy": {},
            "virtio": {},
            "memory": {
                "rss_bytes": 30 << 20,
                "guest_ram_rss_bytes": 10 << 20,
                "monitor_rss_bytes": 20 << 20,
                "threads": 5,
            },
            "balloon": self.balloon() if self.has_balloon else None,
            "api": {"requests": 1},
        }

    def balloon(self) -> dict:
        if not self.has_balloon:
            raise ApiError(409, "this machine has no balloon (start it with --balloon)")
        return {
            "target_bytes": self.target_bytes,
            "actual_bytes": self.target_bytes,
            "inflated_bytes": self.target_bytes,
            "reported_bytes": 0,
            "guest_memory_bytes": self.memory,
            "statistics": {"free_memory": 100 << 20, "total_memory": 200 << 20},
            "statistics_age_seconds": 0.5,
            "counters": {"inflate_requests": 1},
        }

    def set_balloon(self, target_bytes: int) -> dict:
        self.calls.append(("balloon", target_bytes))
        if target_bytes > self.memory:
            raise ApiError(409, "target_bytes is more than the guest's memory")
        self.balloon()
        self.target_bytes = target_bytes
        return self.balloon()

    def snapshot(self, path: str, then: str) -> dict:
        self.calls.append(("snapshot", path, then))
        if self.state == "stopped":
            raise KvmletError("cannot pause: the machine is stopped")
        self.state = {"resume": "running", "pause": "paused", "stop": "stopped"}[then]
        return {
            "path": path,
            "file_bytes": 1 << 20,
            "ram_bytes": 4096,
            "seconds": 0.01,
            "paused_seconds": 0.005,
            "state": self.state,
        }

    def console(self, size: int) -> dict:
        text = "login: "[-size:]
        return {"text": text, "bytes": len(text), "total_bytes": 7}


@contextlib.contextmanager
def serving(path: str, target=None, limits: Limits = DEFAULT_LIMITS, allowed=None):
    """An HttpServer with a Router over `target` (a FakeMachine) listening at `path`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    options = {} if allowed is None else {"allowed": allowed}
    server = HttpServer(listener, Router(target or FakeMachine()), limits, **options).start()
    try:
        yield server
    finally:
        server.close()
        listener.close()


def raw_connection(path: str, timeout: float = 5.0) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    client.connect(path)
    return client


def read_response(client: socket.socket) -> tuple[int, dict, dict]:
    """Status, headers (lower-case) and JSON body of one response (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = client.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(status_line.split()[1]), headers, json.loads(rest[:length])


def exchange(path: str, raw: bytes, timeout: float = 5.0) -> tuple[int, dict, dict]:
    """Send `raw` bytes on a fresh connection and read one response."""
    with raw_connection(path, timeout) as client:
        client.sendall(raw)
        return read_response(client)


def request_bytes(method: str, target: str, body: bytes | None = None, **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: kvmlet"]
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def closed_by_peer(client: socket.socket, timeout: float) -> bool:
    """Whether the server closes `client` (EOF or reset) within `timeout` seconds."""
    client.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not client.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False
