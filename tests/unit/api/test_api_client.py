"""`kvmlet.connect`: typed results, the server's message in KvmletError, names and sockets."""

from __future__ import annotations

import os
import socket
import time

import pytest

import kvmlet
from kvmlet.api.client import BalloonInfo, MachineInfo, Stats, StopResult
from kvmlet.api.http import Limits
from kvmlet.errors import KvmletError
from tests.helpers.api import FakeMachine, serving


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = tmp_path / "kvmlet"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def machine():
    return FakeMachine()


@pytest.fixture
def client(runtime, machine):
    with serving(str(runtime / "fake.sock"), machine), kvmlet.connect("fake") as client:
        yield client


def test_results_are_typed(client):
    info = client.describe()
    assert isinstance(info, MachineInfo)
    assert (info.name, info.state, info.vcpus, info.memory_bytes) == (
        "fake",
        "running",
        2,
        256 << 20,
    )
    assert info.raw["console"] == "serial"
    stats = client.stats()
    assert isinstance(stats, Stats) and stats.vcpus[0].exits["io"] == 10
    assert stats.memory["monitor_rss_bytes"] == 20 << 20
    assert isinstance(stats.balloon, BalloonInfo)
    assert client.console(3).text == "n: "


def test_operations_reach_the_machine(client, machine):
    assert client.pause().state == "paused"
    assert client.resume().state == "running"
    balloon = client.set_balloon(64 << 20)
    assert balloon.target_bytes == 64 << 20 and balloon.statistics["free_memory"] == 100 << 20
    result = client.stop(grace_seconds=1.5)
    assert result == StopResult("reset", "stopped", True, 0)
    assert machine.calls == [("pause",), ("resume",), ("balloon", 64 << 20), ("stop", False, 1.5)]


def test_a_refusal_is_a_kvmlet_error_with_the_servers_message(client):
    client.pause()
    with pytest.raises(KvmletError, match=r"^the machine is paused: resume it first"):
        client.stop()
    with pytest.raises(KvmletError, match=r"^target_bytes must be a whole number"):
        client.set_balloon(-1)


def test_no_such_machine(runtime):
    with pytest.raises(KvmletError, match=r"^no machine named ghost is running$"):
        kvmlet.connect("ghost")
    with pytest.raises(KvmletError, match=r"^no machine is running at /nonexistent/x.sock$"):
        kvmlet.connect("/nonexistent/x.sock")
    with pytest.raises(KvmletError, match=r"^bad machine name"):
        kvmlet.connect("two words")


def test_a_stale_socket_is_no_machine(runtime):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(runtime / "dead.sock"))
    stale.close()  # bound, never listening: what a killed monitor leaves
    with pytest.raises(KvmletError, match="no machine named dead is running"):
        kvmlet.connect("dead")


def test_a_socket_path_works_as_well_as_a_name(runtime, machine):
    path = str(runtime / "elsewhere.sock")
    with serving(path, machine), kvmlet.connect(path) as client:
        assert client.describe().name == "fake"


def test_the_client_reconnects_after_the_server_closed_an_idle_connection(runtime, machine):
    limits = Limits(idle_seconds=0.2)
    with serving(str(runtime / "fake.sock"), machine, limits), kvmlet.connect("fake") as client:
        client.describe()
        time.sleep(0.5)  # the server closed the kept-alive connection meanwhile
        assert client.describe().name == "fake"


def test_a_machine_that_goes_away_is_a_kvmlet_error(runtime, machine):
    with serving(str(runtime / "fake.sock"), machine) as server:
        client = kvmlet.connect("fake")
        client.describe()
    server.close()
    os.unlink(runtime / "fake.sock")
    with pytest.raises(KvmletError, match=r"no machine named fake is running|lost the connection"):
        client.describe()
    client.close()


def test_a_machine_that_does_not_answer_in_time(runtime):
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(runtime / "silent.sock"))
    silent.listen(1)  # accepts (in the backlog), never answers
    try:
        client = kvmlet.connect("silent", timeout=0.3)
        with client, pytest.raises(KvmletError, match=r"did not answer within 0.3 s"):
            client.describe()
    finally:
        silent.close()
