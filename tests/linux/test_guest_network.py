"""The guest on the network, as its user space sees it: two boots in all (a boot is cheap in
the test box; a Python-side transfer is not, so each boot carries several checks).

- user mode (passt): the default guest's init gets a DHCP lease from passt; the guest fetches a
  file from an HTTP server on the host side (checksum compared); a hostfwd port reaches a
  server in the guest; passt killed during a transfer takes the link down, the monitor and the
  guest run on.
- tap: two NICs, one served by the kernel's vhost-net and one by the Python data path; guest
  and host exchange 10 MiB over TCP both ways on each (checksums compared), and the vhost NIC's
  queues show no request handled in Python, its calls attached to their MSI-X vectors' irqfds.

passt needs an interface with an address and a default route: the test box's L1 has none, so
there the test adds a dummy one. Tap mode adds interfaces to the host: it runs in the test box,
or where KVMLET_TAP_TESTS=1 says that is fine.
"""

from __future__ import annotations

import hashlib
import http.server
import itertools
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from kvmlet.guest import READY_MARKER
from kvmlet.machine.machine import Machine
from kvmlet.virtio.net.option import NetConfig, PortForward
from tests.helpers.guests import BOOT_TIMEOUT, IN_TEST_BOX
from tests.helpers.host_network import ip, passt_uplink

pytestmark = pytest.mark.linux

MiB = 1 << 20
TRANSFER = 10 * MiB
TRANSFER_TIMEOUT = 300.0


class Guest:
    """A running guest's shell on its console: commands by marker."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self._marks = itertools.count()

    def run(self, command: str, timeout: float = 60) -> str:
        """Run `command` in the guest's shell; its output and exit status as `OUT\\nrc=N`. The
        markers are split by quotes in the typed line, so the console's echo never matches."""
        mark = f"m{next(self._marks)}"
        self.machine.console.write(f'echo "<{mark}"">"; {command}; echo "rc=$?<""/{mark}>"\n')
        pattern = rf"(?s)<{mark}>\r?\n(.*?)</{mark}>"
        match = self.machine.console.wait_for(pattern, timeout, lambda: self.machine.running)
        return match[1].replace("\r", "").strip()

    def check(self, command: str, timeout: float = 60) -> str:
        """Run `command`; its output, which must end in status 0."""
        output = self.run(command, timeout)
        body, _, status = output.rpartition("rc=")
        assert status == "0", f"{command!r} failed: {output}"
        return body.strip()


def boot(config) -> tuple[Machine, Guest]:
    machine = Machine(config)
    machine.start()
    machine.console.wait_for(READY_MARKER, BOOT_TIMEOUT, lambda: machine.running)
    return machine, Guest(machine)


def stop(machine: Machine) -> None:
    if machine.running:
        machine.console.write("reboot -f\n")
        machine.wait(60)
    machine.close()


@pytest.fixture(scope="module")
def uplink() -> Iterator[None]:
    with passt_uplink():
        yield


class Blobs(http.server.BaseHTTPRequestHandler):
    """GET /blob: `BLOB`; GET /endless: data, slowly, until the client goes."""

    blob = os.urandom(MiB)

    def do_GET(self):
        self.send_response(200)
        if self.path == "/blob":
            self.send_header("Content-Length", str(len(self.blob)))
            self.end_headers()
            self.wfile.write(self.blob)
            return
        self.end_headers()
        try:
            for _ in range(6000):
                self.wfile.write(bytes(4096))
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, *arguments):
        pass


@pytest.fixture(scope="module")
def http_server(uplink) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blobs)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 60) -> bytes:
    """A GET on the host's side of a forwarded port (retried while the guest's server starts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                connection.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                chunks = []
                while chunk := connection.recv(65536):
                    chunks.append(chunk)
            reply = b"".join(chunks)
            if reply.startswith(b"HTTP/1.") and b"\r\n\r\n" in reply:
                return reply
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no answer on host port {port}"
        time.sleep(0.5)


def test_user_mode_lease_fetch_hostfwd_and_passt_death(guest_config, uplink, http_server):
    forward_port = free_port()
    nets = (NetConfig("user", forwards=(PortForward("tcp", forward_port, 8080),)),)
    machine, guest = boot(replace(guest_config, nets=nets, name="netuser"))
    try:
        # The lease init asked for: passt gives the guest the host's address and route.
        host_address = _host_ipv4()
        assert f"inet {host_address}/" in guest.check("ip -4 addr show dev eth0")
        gateway = guest.check("ip -4 route show default").split()[2]
        assert guest.check("cat /sys/class/net/eth0/mtu") == "65520"

        # A file from the host (passt maps the gateway's address to the host's loopback).
        url = f"http://{gateway}:{http_server}/blob"
        digest = guest.check(f"wget -q -O - {url} | md5sum", timeout=120).split()[0]
        assert digest == hashlib.md5(Blobs.blob).hexdigest()

        # A host port forwarded to a server in the guest.
        guest.check("mkdir -p /www && echo kvmlet-hostfwd-$((6 * 7)) > /www/index.html")
        guest.check("httpd -p 8080 -h /www")
        reply = http_get(forward_port, "/index.html")
        assert reply.split(b"\r\n\r\n", 1)[1] == b"kvmlet-hostfwd-42\n"

        # passt dies mid-transfer: the link goes down, the monitor and the guest run on.
        guest.check(f"(wget -q -O /dev/null http://{gateway}:{http_server}/endless &)")
        nic = machine.virtio.nets.nics[0]
        time.sleep(2)
        os.kill(nic.passt.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while nic.device.link_up and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not nic.device.link_up
        assert guest.check("cat /sys/class/net/eth0/carrier") == "0"
        assert guest.check("echo alive-$((20 + 22))") == "alive-42"
        assert machine.running
        (name,) = [d["name"] for d in machine.describe()["devices"] if d["type"] == "virtio-net"]
        stats = machine.stats()["virtio"][name]
        assert stats["link_up"] is False and stats["net"]["rx_bytes"] > MiB  # the blob
    finally:
        stop(machine)


def _host_ipv4() -> str:
    """The address of the host's interface with the default route (what passt copies)."""
    route = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    device = route[route.index("dev") + 1]
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", device],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    return re.search(r"inet (\S+)/", shown)[1]


needs_taps = pytest.mark.skipif(
    not (os.geteuid() == 0 and os.path.exists("/dev/net/tun") and os.path.exists("/dev/vhost-net"))
    or not (IN_TEST_BOX or os.environ.get("KVMLET_TAP_TESTS") == "1"),
    reason="tap mode adds interfaces to the host: root, /dev/net/tun and /dev/vhost-net, in "
    "the test box (or KVMLET_TAP_TESTS=1)",
)

TAPS = {
    # ifname: (host address, guest address, vhost)
    "kvmvh0": ("10.10.0.1", "10.10.0.2", True),
    "kvmpy0": ("10.11.0.1", "10.11.0.2", False),
}


class Receiver(threading.Thread):
    """Accepts one connection and hashes everything it sends until it closes."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.listener = socket.create_server((address, 0))
        self.port = self.listener.getsockname()[1]
        self.digest = hashlib.md5()
        self.received = 0

    def run(self):
        self.listener.settimeout(TRANSFER_TIMEOUT)
        connection, _ = self.listener.accept()
        with connection:
            while chunk := connection.recv(1 << 20):
                self.digest.update(chunk)
                self.received += len(chunk)
        self.listener.close()


class Sender(threading.Thread):
    """Accepts one connection, sends `data` and closes."""

    def __init__(self, address: str, data: bytes):
        super().__init__(daemon=True)
        self.listener = socket.create_server((address, 0))
        self.port = self.listener.getsockname()[1]
        self.data = data

    def run(self):
        self.listener.settimeout(TRANSFER_TIMEOUT)
        connection, _ = self.listener.accept()
        with connection:
            connection.sendall(self.data)
        self.listener.close()


@needs_taps
def test_tap_vhost_net_and_python_paths_carry_10_mib_each_way(guest_config):
    nets = tuple(NetConfig("tap", ifname=name, vhost=vhost) for name, (*_, vhost) in TAPS.items())
    first_host, first_guest, _ = TAPS["kvmvh0"]
    # The kernel configures eth0 (init then asks no DHCP server, which the taps lack).
    params = f"ip={first_guest}::{first_host}:255.255.255.0::eth0:off"
    machine, guest = boot(replace(guest_config, nets=nets, params=params, memory=512 << 20))
    try:
        described = {d["ifname"]: d for d in machine.describe()["devices"] if "ifname" in d}
        assert described["kvmvh0"]["data_path"] == "vhost-net"
        assert described["kvmpy0"]["data_path"] == "python"
        for name, (host_address, _, _) in TAPS.items():
            ip("addr", "add", f"{host_address}/24", "dev", name)
            ip("link", "set", name, "up")
        guest_address = TAPS["kvmpy0"][1]
        guest.check(f"ip addr add {guest_address}/24 dev eth1 && ip link set eth1 up")
        guest.check(f"head -c {TRANSFER} /dev/urandom > /tmp/blob")
        guest_digest = guest.check("md5sum /tmp/blob").split()[0]
        outgoing = os.urandom(TRANSFER)
        for name, (host_address, _, _) in TAPS.items():
            receiver = Receiver(host_address)
            receiver.start()
            guest.check(f"nc {host_address} {receiver.port} < /tmp/blob", TRANSFER_TIMEOUT)
            receiver.join(TRANSFER_TIMEOUT)
            assert (receiver.received, receiver.digest.hexdigest()) == (TRANSFER, guest_digest)
            sender = Sender(host_address, outgoing)
            sender.start()
            command = f"nc {host_address} {sender.port} </dev/null | md5sum"
            digest = guest.check(command, TRANSFER_TIMEOUT).split()[0]
            assert digest == hashlib.md5(outgoing).hexdigest(), name
            sender.join(TRANSFER_TIMEOUT)
        stats = machine.stats()["virtio"]
        by_name = {
            entry["ifname"]: stats[entry["name"]]
            for entry in machine.describe()["devices"]
            if "ifname" in entry
        }
        vhost, python = by_name["kvmvh0"], by_name["kvmpy0"]
        assert [queue["requests"] for queue in vhost["queues"]] == [0, 0]
        assert [call["path"] for call in vhost["calls"]] == ["irqfd", "irqfd"]  # MSI-X, by KVM
        assert vhost["backend_error"] is None
        assert all(queue["requests"] > 100 for queue in python["queues"])
        assert python["net"]["rx_bytes"] >= TRANSFER and python["net"]["tx_bytes"] >= TRANSFER
    finally:
        stop(machine)
