"""`kvmlet sandbox` over virtiofs, and with a network: two boots, each from the command line
as a user runs it.

- virtiofs: the caller's directory is a virtiofs mount in the guest; what the command writes
  lands there, owned by the caller; --verbose said which way the directories went.
- --net: the guest's init got a DHCP lease from passt, and busybox wget fetches a file from an
  HTTP server on the host's loopback through the gateway's address.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmlet.host.virtiofsd import virtiofsd_problem
from tests.helpers.guests import BOOT_TIMEOUT
from tests.helpers.host_network import passt_uplink

pytestmark = pytest.mark.linux
CHECKOUT = Path(__file__).resolve().parents[2]


def kvmlet_sandbox(cwd: Path, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmlet", "sandbox", "--timeout", str(BOOT_TIMEOUT), *words],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 60,
        check=False,
    )


def command_noise(stderr: str) -> list[str]:
    """What reached the command's stderr that the command did not write (its shells' warnings,
    e.g. a working directory they cannot name); kvmlet's own lines start with "kvmlet: "."""
    return [line for line in stderr.splitlines() if not line.startswith("kvmlet: ")]


def test_a_sandbox_over_virtiofs_writes_the_callers_directory(tmp_path):
    problem = virtiofsd_problem()
    if problem is not None:
        pytest.skip(problem)
    mounted = "busybox awk -v d=\"$PWD\" '$2 == d {print $2, $3}' /proc/mounts"
    command = f"{mounted}; echo $((6*7)) > out.txt; exit 3"
    result = kvmlet_sandbox(tmp_path, "--rootfs-via", "virtiofs", "--verbose", "--", command)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[0] == (
        "kvmlet: host directories over virtiofs: asked for with --rootfs-via virtiofs"
    )
    assert command_noise(result.stderr) == []
    assert result.stdout.splitlines() == [f"{tmp_path} virtiofs"]
    assert (tmp_path / "out.txt").read_text() == "42\n"
    assert (tmp_path / "out.txt").stat().st_uid == os.getuid()


class Greeting(http.server.BaseHTTPRequestHandler):
    body = b"kvmlet-sandbox-net-42\n"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *arguments):
        pass


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on the host's loopback (which passt shows at the guest's gateway)."""
    with passt_uplink():
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Greeting)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()


def test_a_sandbox_with_net_reaches_the_host_through_passt(tmp_path, host_server):
    command = (
        "gateway=$(busybox ip -4 route show default | busybox awk '{print $3}'); "
        "busybox ip -4 -o addr show dev eth0 | busybox awk '{print \"address\", $4}'; "
        f'busybox wget -q -O - "http://$gateway:{host_server}/"'
    )
    result = kvmlet_sandbox(tmp_path, "--net", "--", command)
    assert result.returncode == 0, result.stderr
    assert command_noise(result.stderr) == []
    lines = result.stdout.splitlines()
    assert lines[0].startswith("address ") and "/" in lines[0], "no DHCP lease on eth0"
    assert lines[1:] == ["kvmlet-sandbox-net-42"]
