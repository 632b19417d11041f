"""The control API of real machines running tiny guests: `kvmlet run` with its socket, the
control commands against it, SIGTERM, and the API's documents against docs/api.yaml."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmlet
from kvmlet.errors import KvmletError
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from tests.unit.boot.synthetic_kernels import MiB, make_elf, pvh_note

pytestmark = pytest.mark.kvm

CHECKOUT = Path(__file__).resolve().parents[2]
# 32-bit PVH entry: mov dx, 0x3f8 ; L: out dx, al ; inc al ; jmp L  -- COM1 output forever
SERIAL_LOOP = bytes.fromhex("66baf803 ee fec0 ebfb")
# real mode: L: in al, 0x64 ; test al, 1 ; jz L ; in al, 0x60 ; cmp al, 0x1d ; jne L ;
# mov al, 0xfe ; out 0x64, al ; hlt  -- resets the machine when Ctrl is pressed
RESET_ON_CTRL = bytes.fromhex("e464 a801 74fa e460 3c1d 75f4 b0fe e664 f4")
# real mode: mov dx, 0x3f8 ; L: out dx, al ; inc al ; jmp L
SERIAL_LOOP_REAL_MODE = bytes.fromhex("baf803 ee fec0 ebfb")


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "kvmlet"


@pytest.fixture
def kernel(tmp_path) -> Path:
    path = tmp_path / "vmlinux"
    segment = (16 * MiB, 0xFFFF_FFFF_8100_0000, SERIAL_LOOP, 4096)
    path.write_bytes(make_elf([segment], entry=16 * MiB, notes=pvh_note(16 * MiB)))
    return path


def kvmlet_command(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmlet", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=CHECKOUT,
        check=False,
    )


def start_run(kernel: Path, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmlet",
            "run",
            "-k",
            str(kernel),
            "--host-profile",
            "none",
            *arguments,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=CHECKOUT,
    )


def wait_for_api(path: Path, process: subprocess.Popen, timeout: float = 30) -> None:
    """Until the machine answers its API (its socket exists from before the guest starts)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the API never answered"
        if path.exists():
            try:
                with kvmlet.connect(str(path), timeout=5) as client:
                    client.describe()
                return
            except KvmletError:
                pass
        time.sleep(0.05)


def test_kvmlet_run_is_listed_stated_paused_and_stopped_by_name(runtime, kernel):
    run = start_run(kernel, "--name", "tiny", "--timeout", "120")
    try:
        wait_for_api(runtime / "tiny.sock", run)
        listing = kvmlet_command("list")
        assert listing.returncode == 0
        header, row = listing.stdout.splitlines()
        assert header.split() == ["NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME"]
        assert row.split()[:5] == ["tiny", str(run.pid), "running", "1", "256M"]
        documents = json.loads(kvmlet_command("list", "--json").stdout)
        assert [document["name"] for document in documents] == ["tiny"]

        stat = kvmlet_command("stat", "tiny")
        assert stat.returncode == 0 and "com1" in stat.stdout and "io" in stat.stdout
        raw = json.loads(kvmlet_command("stat", "tiny", "--json").stdout)
        assert raw["vcpus"][0]["exits"]["io"] > 0

        assert kvmlet_command("pause", "tiny").stdout == "tiny: paused\n"
        assert "paused" in kvmlet_command("list").stdout
        assert kvmlet_command("resume", "tiny").stdout == "tiny: running\n"
        assert len(kvmlet_command("console", "tiny", "--bytes", "10").stdout.encode()) >= 10

        refused = kvmlet_command("balloon", "tiny", "64M")
        assert refused.returncode == 1
        assert refused.stderr == "kvmlet: this machine has no balloon (start it with --balloon)\n"

        stop = kvmlet_command("stop", "tiny", "--force")
        assert stop.returncode == 0
        assert stop.stdout.startswith("tiny: stopped from the host")
        assert run.wait(15) == 0
        assert "stopped through the control API" in run.stderr.read()
    finally:
        run.kill()
        run.wait()
    assert os.listdir(runtime) == []  # socket and lock removed
    missing = kvmlet_command("stop", "tiny")
    assert (missing.returncode, missing.stderr) == (1, "kvmlet: no machine named tiny is running\n")


def test_sigterm_stops_kvmlet_run_and_removes_its_socket(runtime, kernel):
    run = start_run(kernel, "--name", "term", "--timeout", "120")
    try:
        wait_for_api(runtime / "term.sock", run)
        run.send_signal(signal.SIGTERM)
        assert run.wait(15) == 0
        assert "SIGTERM" in run.stderr.read()
    finally:
        run.kill()
        run.wait()
    assert os.listdir(runtime) == []


def test_sigterm_before_the_guest_starts_is_one_line(runtime, kernel):
    run = start_run(kernel, "--name", "early", "--timeout", "120")
    try:
        deadline = time.monotonic() + 30
        while not (runtime / "early.sock").exists():  # claimed: the machine is being built
            assert time.monotonic() < deadline
            time.sleep(0.001)
        run.send_signal(signal.SIGTERM)
        status = run.wait(15)
        errors = run.stderr.read()
    finally:
        run.kill()
        run.wait()
    if status == 1:
        assert errors == "kvmlet: terminated (SIGTERM) before the guest started\n"
    else:  # the guest had started already: an ordinary stop
        assert status == 0 and "SIGTERM" in errors
    assert os.listdir(runtime) == []


def test_two_machines_cannot_share_a_name(runtime, kernel):
    run = start_run(kernel, "--name", "twin", "--timeout", "120")
    try:
        wait_for_api(runtime / "twin.sock", run)
        second = kvmlet_command("run", "-k", str(kernel), "--name", "twin", "--timeout", "5")
        assert second.returncode == 1
        assert second.stderr.strip().endswith("a machine named twin is already running")
        assert kvmlet.connect("twin").describe().pid == run.pid
    finally:
        run.kill()
        run.wait()


def machine_for(code: bytes, **config) -> Machine:
    return Machine(MachineConfig(boot_code=code, rng=False, host_profile="none", **config))


def test_a_clean_stop_through_the_api_lets_the_guest_end_itself(runtime):
    with machine_for(RESET_ON_CTRL) as machine, kvmlet.serve(machine, "clean") as server:
        with kvmlet.connect("clean") as client:
            result = client.stop(grace_seconds=30)
        assert (result.reason, result.clean) == ("reset", True)
        assert server.name == "clean"


def test_the_api_of_a_machine_with_a_balloon(runtime):
    with machine_for(RESET_ON_CTRL, balloon=True) as machine, kvmlet.serve(machine) as server:
        client = kvmlet.connect(server.name)
        balloon = client.set_balloon(8 << 20)
        assert balloon.target_bytes == 8 << 20
        assert machine.balloon.target_pages == 2048
        assert client.balloon().statistics == {}  # the guest has no driver to answer
        with pytest.raises(KvmletError, match="more than the guest's"):
            client.set_balloon(1 << 40)
        stats = client.stats()
        assert stats.balloon.target_bytes == 8 << 20
        assert stats.raw["api"]["requests"] >= 4
        client.close()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("schemathesis") is None,
    reason="pip install -e '.[test]'",
)
def test_the_documents_of_a_real_machine_match_the_description(runtime):
    import schemathesis
    from hypothesis import HealthCheck, settings

    from tests.helpers.unix_http import unix_session

    schema = schemathesis.openapi.from_path(CHECKOUT / "docs" / "api.yaml")
    with machine_for(RESET_ON_CTRL, balloon=True) as machine, kvmlet.serve(machine) as server:
        session = unix_session(server.socket_path)
        for operation in schema.get_all_operations():
            operation = operation.ok()
            if operation.path == "/v1/vm/snapshot":
                continue  # it writes where it is told: test_a_snapshot_through_the_api
            strategy = operation.as_strategy()

            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
            @__import__("hypothesis").given(strategy)
            def check(case):
                response = case.call(session=session, base_url="http://localhost")
                case.validate_response(response)

            check()


def test_a_snapshot_through_the_api_matches_the_description(runtime, tmp_path):
    import schemathesis

    schema = schemathesis.openapi.from_path(CHECKOUT / "docs" / "api.yaml")
    snapshot = schema["/v1/vm/snapshot"]["PUT"]
    with machine_for(SERIAL_LOOP_REAL_MODE) as machine, kvmlet.serve(machine) as server:
        from tests.helpers.unix_http import unix_session

        session = unix_session(server.socket_path)
        for then, state in (("pause", "paused"), ("resume", "running"), ("stop", "stopped")):
            path = str(tmp_path / f"{then}.snap")
            case = snapshot.Case(body={"path": path, "then": then}, media_type="application/json")
            response = case.call(session=session, base_url="http://localhost")
            case.validate_response(response)
            assert response.json()["state"] == state == machine.state
            assert os.path.getsize(path) == response.json()["file_bytes"]
        refused = snapshot.Case(
            body={"path": str(tmp_path / "late.snap")}, media_type="application/json"
        )
        response = refused.call(session=session, base_url="http://localhost")
        refused.validate_response(response)
        assert response.status_code == 409


def test_kvmlet_snapshot_then_kvmlet_run_restore(runtime, kernel, tmp_path):
    snapshot = tmp_path / "tiny.snap"
    run = start_run(kernel, "--name", "saved", "--timeout", "120")
    try:
        wait_for_api(runtime / "saved.sock", run)
        paused = kvmlet_command("snapshot", "saved", str(snapshot), "--pause")
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.startswith(f"saved: saved to {snapshot} (")
        assert paused.stdout.endswith("; paused\n")
        stopped = kvmlet_command("snapshot", "saved", str(snapshot), "--stop")
        assert stopped.stdout.endswith("; stopped\n")
        assert run.wait(15) == 0
    finally:
        run.kill()
        run.wait()
    restored = subprocess.run(
        [sys.executable, "-m", "kvmlet", "run", "--restore", str(snapshot), "--timeout", "1"],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert restored.returncode == 124, restored.stderr
    assert restored.stderr.startswith(b"kvmlet: the run timed out after")
    console = restored.stdout  # the guest's loop goes on: each byte one more than the last
    assert len(console) > 100
    assert all(b == (a + 1) & 0xFF for a, b in itertools.pairwise(console))
    output = kvmlet_command("run", "--restore", str(snapshot), "-m", "1G")
    assert output.stderr == "kvmlet: --restore takes the machine from its file: drop -m/--mem\n"
