"""Machine names and control sockets: where they live, who may use them, and stale leftovers."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlet.api import names
from kvmlet.errors import KvmletError

CHECKOUT = Path(__file__).resolve().parents[3]


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "kvmlet"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_runtime_directory_follows_xdg_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert names.runtime_directory() == "/run/user/1000/kvmlet"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # not a valid XDG value: ignored
    monkeypatch.setenv("HOME", str(tmp_path))
    assert names.runtime_directory() == f"{tmp_path}/.kvmlet"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert names.runtime_directory() == f"{tmp_path}/.kvmlet"


def test_a_claim_makes_a_private_directory_and_an_owner_only_socket(runtime):
    endpoint = names.claim("web")
    try:
        assert endpoint.path == str(runtime / "web.sock")
        assert mode(runtime) == 0o700 and mode(runtime / "web.sock") == 0o600
        assert stat.S_ISSOCK(os.stat(endpoint.path).st_mode)
        assert names.running_names() == ["web"] and names.is_running("web")
    finally:
        endpoint.close()
    assert sorted(os.listdir(runtime)) == []
    assert names.running_names() == []


def test_an_open_runtime_directory_is_made_private(runtime):
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    names.claim("web").close()
    assert mode(runtime) == 0o700


def test_a_runtime_directory_of_another_user_is_refused(runtime):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 54321, 54321)
    with pytest.raises(KvmletError, match="belongs to another user"):
        names.claim("web")


def test_an_unwritable_home_is_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", "/proc/no-such-home")
    with pytest.raises(KvmletError, match=r"cannot create .* \(set XDG_RUNTIME_DIR"):
        names.claim("web")


def test_a_name_is_unique_among_running_machines(runtime):
    first = names.claim("web")
    try:
        with pytest.raises(KvmletError, match=r"^a machine named web is already running$"):
            names.claim("web")
        second = names.claim("db")
        second.close()
    finally:
        first.close()
    names.claim("web").close()  # free again once the first is gone


def test_generated_names_are_distinct(runtime):
    first, second = names.claim(), names.claim()
    try:
        assert first.name == f"vm-{os.getpid()}" and second.name == f"vm-{os.getpid()}-1"
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "two words", "x" * 65, "ünï", "-x"])
def test_bad_names_are_refused(runtime, bad):
    with pytest.raises(KvmletError, match="bad machine name"):
        names.claim(bad)


def test_the_socket_of_a_killed_monitor_is_stale_and_replaced(runtime):
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from kvmlet.api import names\n"
        "endpoint = names.claim('victim'); print('claimed', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(CHECKOUT)],
        stdout=subprocess.PIPE,
        env={**os.environ},
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "claimed"
        assert names.running_names() == ["victim"]
        with pytest.raises(KvmletError, match="already running"):
            names.claim("victim")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (runtime / "victim.sock").exists()  # left behind, as after any crash
    assert names.running_names() == []  # but nobody holds the name
    endpoint = names.claim("victim")
    try:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(endpoint.path)  # a fresh socket that listens
        probe.close()
    finally:
        endpoint.close()


def test_a_socket_elsewhere_is_linked_from_the_runtime_directory(runtime, tmp_path):
    path = tmp_path / "elsewhere" / "api.sock"
    path.parent.mkdir()
    endpoint = names.claim("web", str(path))
    try:
        assert endpoint.path == str(path) and mode(path) == 0o600
        assert os.readlink(runtime / "web.sock") == str(path)
        assert names.socket_path("web") == str(runtime / "web.sock")
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(names.socket_path("web"))  # through the link
        probe.close()
        assert names.running_names() == ["web"]
    finally:
        endpoint.close()
    assert not path.exists() and not os.path.lexists(runtime / "web.sock")


def test_a_socket_path_in_use_or_not_a_socket_is_refused(runtime, tmp_path):
    occupied = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(occupied))
    listener.listen(1)
    try:
        with pytest.raises(KvmletError, match="something is already listening"):
            names.claim("web", str(occupied))
    finally:
        listener.close()
    names.claim("web", str(occupied)).close()  # nothing listens any more: stale, replaced
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(KvmletError, match="exists and is not a socket"):
        names.claim("web", str(regular))
    assert regular.read_text() == "keep me"
    with pytest.raises(KvmletError, match="too long"):
        names.claim("web", str(tmp_path / ("x" * 120)))
    assert names.running_names() == []  # a failed claim leaves nothing behind
