"""A machine's NICs as the wiring makes them, with a tiny guest of our own: passt started with
the machine and stopped with it, taps created or attached, the link going down when either
goes away (said once, the guest running on), and the host's mistakes as one line.

No guest driver runs here (the linux tier has those): this is the host side of the wiring.
Tap tests run in a private network namespace (`unshare --net`, root), so the host's own
interfaces are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from kvmlet.errors import KvmletError
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.virtio.net.option import NetConfig, PortForward
from tests.helpers.fresh_python import CHECKOUT

pytestmark = pytest.mark.kvm

HALT_LOOP = bytes.fromhex("f4 ebfd")  # L: hlt ; jmp L

needs_passt = pytest.mark.skipif(shutil.which("passt") is None, reason="needs passt")
needs_tap = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("unshare"),
    reason="needs root, /dev/net/tun and unshare(1) for a private network namespace",
)


def machine_for(**config) -> Machine:
    return Machine(MachineConfig(boot_code=HALT_LOOP, rng=False, host_profile="none", **config))


def nics(machine: Machine) -> list[dict]:
    return [entry for entry in machine.describe()["devices"] if entry["type"] == "virtio-net"]


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_passt
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_a_user_nic_runs_passt_with_the_machine_and_stops_it_with_the_machine(transport):
    forward = PortForward("tcp", 18080, 80)
    machine = machine_for(
        nets=(NetConfig(forwards=(forward,)),), name="netweb", virtio_transport=transport
    )
    passt = machine.virtio.nets.nics[0].passt
    directory = passt.runtime_directory
    try:
        (nic,) = nics(machine)
        assert nic["network"] == "user" and nic["data_path"] == "python" and nic["link_up"]
        assert nic["hostfwd"] == ["tcp:18080:80"] and nic["transport"] == transport
        assert int(nic["mac"][:2], 16) & 0b11 == 0b10  # locally administered unicast
        command = Path(f"/proc/{passt.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--tcp-ports" in command and b"18080:80" in command
        assert b"65520" in command  # the MTU the guest is offered, passt's largest
        if transport == "mmio":
            assert any("virtio_mmio.device=" in p for p in machine.virtio.kernel_parameters())
        machine.start()
        assert machine.running and alive(passt.pid)
    finally:
        machine.close()
    assert not alive(passt.pid) and passt.returncode == 0  # stopped by SIGTERM, not killed
    assert not os.path.exists(directory)
    # The same name, the same MAC; another name, another.
    for name, same in (("netweb", True), ("netdb", False)):
        again = machine_for(nets=(NetConfig(),), name=name, virtio_transport=transport)
        try:
            assert (nics(again)[0]["mac"] == nic["mac"]) is same
        finally:
            again.close()


@needs_passt
def test_passt_dying_takes_the_link_down_once_and_the_guest_runs_on(caplog):
    machine = machine_for(nets=(NetConfig(), NetConfig()))
    first = machine.virtio.nets.nics[0]
    try:
        machine.start()
        with caplog.at_level(logging.WARNING):
            os.kill(first.passt.pid, signal.SIGKILL)
            wait_until(lambda: not first.device.link_up)
            time.sleep(0.3)  # both ways of noticing (pidfd, socket hang-up) have had their go
        assert machine.running
        assert [nic["link_up"] for nic in nics(machine)] == [False, True]
        assert first.device.read_config(6, 2) == 0  # status: LINK_UP cleared
        reports = [r.getMessage() for r in caplog.records if "net0 (user)" in r.getMessage()]
        assert len(reports) == 1, reports
        assert reports[0].startswith("kvmlet: net0 (user): passt ")
        assert reports[0].endswith(": link down; the guest keeps running")
    finally:
        machine.close()
    assert not alive(machine.virtio.nets.nics[1].passt.pid)


NAMESPACE_SETUP = """
import subprocess
for command in ("tuntap add uplink mode tap", "addr add 10.9.0.2/24 dev uplink",
                "link set uplink up", "route add default via 10.9.0.1"):
    subprocess.run(["ip", *command.split()], check=True)
"""
"""An interface (a tap: this host has no dummy driver) with an address and a default route:
all passt needs to start."""


def in_network_namespace(script: str) -> dict:
    """Run `script` in a fresh network namespace (with `NAMESPACE_SETUP`); it prints one JSON
    object."""
    code = NAMESPACE_SETUP + textwrap.dedent(script)
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_tap
def test_tap_nics_are_created_or_attached_and_a_deleted_one_takes_the_link_down():
    result = in_network_namespace(
        """
        import json, logging, os, subprocess, time
        from kvmlet.machine.config import MachineConfig
        from kvmlet.machine.machine import Machine
        from kvmlet.virtio.net.option import NetConfig

        reports = []
        class Reports(logging.Handler):
            def emit(self, record):
                reports.append(record.getMessage())
        logging.getLogger("kvmlet.machine.net_devices").addHandler(Reports())
        subprocess.run(["ip", "tuntap", "add", "dev", "made", "mode", "tap"], check=True)
        nets = (NetConfig("tap", ifname="made", vhost=False), NetConfig("tap"))
        machine = Machine(MachineConfig(boot_code=bytes.fromhex("f4ebfd"), rng=False,
                                        host_profile="none", nets=nets))
        machine.start()
        described = [d for d in machine.describe()["devices"] if d["type"] == "virtio-net"]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        vhost = machine.virtio.nets.nics[1]
        subprocess.run(["ip", "link", "delete", vhost.ifname], check=True)
        deadline = time.monotonic() + 10
        while vhost.device.link_up and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        running = machine.running
        machine.close()
        after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        print(json.dumps({
            "described": [(d["ifname"], d["data_path"], d["link_up"]) for d in described],
            "created": vhost.ifname in links, "made_kept": "made:" in after,
            "link_up": vhost.device.link_up, "running": running, "reports": reports,
            "vhost_net": os.path.exists("/dev/vhost-net"),
        }))
        """
    )
    kernel_data_path = "vhost-net" if result["vhost_net"] else "python"
    assert result["described"] == [
        ["made", "python", True],
        ["tap0", kernel_data_path, True],
    ]
    assert result["created"] and result["made_kept"]  # ours goes, the user's persistent one stays
    assert not result["link_up"] and result["running"]
    assert result["reports"] == [
        "kvmlet: net1 (tap): tap tap0 was deleted: link down; the guest keeps running"
    ]


@needs_tap
def test_tap_mistakes_are_one_line_and_leave_nothing_running(tmp_path):
    from tests.unit.boot.synthetic_kernels import make_bzimage

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    # Where passt's socket goes: a place of this test's own, short enough for passt.
    runtime = Path(tempfile.mkdtemp(prefix="kvmlet-test-", dir="/tmp"))
    runtime.chmod(0o755)  # passt, which drops to nobody, must reach its directory in it
    result = in_network_namespace(
        f"""
        import json, os, subprocess, sys
        from kvmlet.host.tap import open_tap

        held = open_tap("busy")
        def passt_of_ours(pid):
            try:
                argv = open(f"/proc/{{pid}}/cmdline", "rb").read().split(b"\\0")
            except OSError:
                return False
            return argv[0].endswith(b"passt") and any(
                word.startswith({str(runtime)!r}.encode()) for word in argv)
        def run(*net):
            argv = [sys.executable, "-m", "kvmlet", "run", "-k", {str(kernel)!r},
                    "--host-profile", "none", *(word for n in net for word in ("-n", n))]
            environment = {{**os.environ, "XDG_RUNTIME_DIR": {str(runtime)!r}}}
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                  env=environment)
            return done.returncode, done.stderr.strip().splitlines()
        print(json.dumps({{
            "busy": run("user", "tap,ifname=busy"),
            "vhost_on": run("tap,vhost=on"),
            "no_vhost": not os.path.exists("/dev/vhost-net"),
            "passt_left": [pid for pid in os.listdir("/proc") if pid.isdigit()
                           and passt_of_ours(pid)],
        }}))
        """
    )
    assert result["busy"] == [1, ["kvmlet: tap interface busy is in use by another process"]]
    assert not result["passt_left"]  # the first NIC's passt went with the failed build
    assert [p.name for p in runtime.iterdir()] == ["kvmlet"]  # no passt directory left
    shutil.rmtree(runtime)
    if result["no_vhost"]:
        status, lines = result["vhost_on"]
        assert status == 1 and lines == [
            "kvmlet: net0 (tap): vhost=on: cannot open /dev/vhost-net: no such file or "
            "directory (load vhost_net: modprobe vhost_net)"
        ]


def test_a_machine_without_nets_has_no_nic_and_none_means_none():
    for nets in ((), (NetConfig("none"),)):
        machine = machine_for(nets=nets)
        try:
            assert nics(machine) == []
        finally:
            machine.close()
    with pytest.raises(KvmletError, match="cannot go with other networks"):
        MachineConfig(nets=(NetConfig("none"), NetConfig()))
