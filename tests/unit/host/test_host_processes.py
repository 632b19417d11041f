"""The helper-daemon supervisor, against a fake daemon: start, socket, death, stop, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kvmlet.errors import KvmletError
from kvmlet.host.processes import HelperProcess, find_program, make_runtime_directory
from tests.helpers.fresh_python import CHECKOUT

FAKE_DAEMON = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    mode, path = sys.argv[1], sys.argv[2]
    print("Failed to send 12 bytes to syslog", file=sys.stderr, flush=True)
    print("fake daemon starting", flush=True)
    if mode == "fail":
        print("cannot do the thing: no such interface", file=sys.stderr, flush=True)
        print("Failed to send 40 bytes to syslog", file=sys.stderr, flush=True)
        sys.exit(2)
    if mode == "silent":
        time.sleep(60)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "slow":
        time.sleep(0.3)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    if mode == "slow":
        time.sleep(0.2)  # bound, not listening yet: a connect is refused meanwhile
    server.listen(1)
    connection, _ = server.accept()
    if mode == "crash":
        print("lost my way", flush=True)
        os._exit(3)
    while connection.recv(1024):
        pass
    time.sleep(60)
    """
)


@pytest.fixture
def daemon_script(tmp_path):
    script = tmp_path / "fake_daemon.py"
    script.write_text(FAKE_DAEMON)
    return str(script)


@pytest.fixture
def start(daemon_script, tmp_path):
    """Start the fake daemon in a mode; stops every one started at the end of the test."""
    started = []

    def start_daemon(mode, on_exit=None):
        directory = make_runtime_directory("fake")
        path = os.path.join(directory, "fake.socket")
        helper = HelperProcess.start(
            "fake",
            [sys.executable, daemon_script, mode, path],
            directory,
            on_exit,
            lambda line: line.startswith("Failed to send"),
        )
        started.append(helper)
        return helper, path

    yield start_daemon
    for helper in started:
        helper.stop()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_program_on_the_path_is_found():
    assert find_program("sh", "dash").endswith("/sh")


def test_a_missing_program_names_the_package_to_install(tmp_path):
    with pytest.raises(KvmletError) as raised:
        find_program("kvmlet-no-such-daemon", "some-package", [str(tmp_path / "nope")])
    assert str(raised.value) == (
        "kvmlet-no-such-daemon not found: install it with `apt-get install some-package`"
    )


def test_a_program_outside_the_path_is_found_among_the_candidates(tmp_path):
    program = tmp_path / "virtiofsd"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert find_program("kvmlet-no-such-daemon", "pkg", [str(program)]) == str(program)


def test_a_daemon_starts_listens_and_stops_without_a_trace(start):
    helper, path = start("serve")
    connection = helper.connect(path, timeout=10)
    connection.sendall(b"hello")
    assert helper.running and helper.returncode is None
    directory = helper.runtime_directory
    helper.stop()
    assert helper.returncode == -signal.SIGTERM
    assert not os.path.exists(directory)
    assert gone(helper.pid)
    assert "fake daemon starting" in helper.output()
    connection.close()
    helper.stop()  # twice is harmless


def test_connect_waits_while_the_socket_is_bound_but_not_listening(start):
    helper, path = start("slow")
    started = time.monotonic()
    helper.connect(path, timeout=10).close()
    assert time.monotonic() - started >= 0.4


def test_a_daemon_that_exits_before_listening_is_one_line_with_its_last_words(start):
    died = []
    helper, path = start("fail", lambda helper: died.append(helper))
    with pytest.raises(KvmletError) as raised:
        helper.connect(path, timeout=10)
    assert str(raised.value) == (
        f"fake exited with status 2 before it listened on {path}: "
        "cannot do the thing: no such interface"  # its last line but the noise after it
    )
    assert died == [], "a daemon that never got ready is reported by the error, not the callback"


def test_a_daemon_that_never_listens_times_out(start):
    helper, path = start("silent")
    with pytest.raises(KvmletError, match=r"fake did not listen on .* within 0.5 s: fake daemon"):
        helper.connect(path, timeout=0.5)


def test_a_daemon_that_dies_after_it_was_ready_calls_back_once(start):
    died = []
    called = threading.Event()

    def on_exit(helper):
        died.append(helper.returncode)
        called.set()

    helper, path = start("crash", on_exit)
    connection = helper.connect(path, timeout=10)
    assert helper.wait(10) == 3 and called.is_set()
    assert died == [3]
    assert helper.last_words() == "lost my way"
    helper.stop()
    assert died == [3]
    connection.close()


def test_a_stopped_daemon_does_not_call_back(start):
    died = []
    helper, path = start("serve", lambda helper: died.append(helper))
    helper.connect(path, timeout=10).close()
    assert helper.wait(0.05) is None
    helper.stop()
    assert died == []


def test_a_daemon_that_ignores_sigterm_is_killed(start):
    helper, path = start("stubborn")
    helper.connect(path, timeout=10).close()
    started = time.monotonic()
    helper.stop(grace=0.3)
    assert helper.returncode == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 5


def test_a_daemon_started_while_sigterm_is_blocked_still_stops_on_sigterm(start):
    """`kvmlet run` blocks SIGTERM while it builds the machine, when passt starts: the mask
    must not reach the daemon, or it would ignore the SIGTERM that stops it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        helper, path = start("serve")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    helper.connect(path, timeout=10).close()
    helper.stop(grace=5)
    assert helper.returncode == -signal.SIGTERM


def test_a_binary_that_cannot_run_is_one_line(tmp_path):
    directory = make_runtime_directory("fake")
    with pytest.raises(KvmletError, match=r"cannot start fake .*No such file or directory"):
        HelperProcess.start("fake", [str(tmp_path / "missing")], directory)
    assert not os.path.exists(directory)


def test_no_daemon_outlives_a_kvmlet_that_forgot_to_stop_it(daemon_script, tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        from kvmlet.host.processes import HelperProcess, make_runtime_directory
        directory = make_runtime_directory("fake")
        path = os.path.join(directory, "fake.socket")
        helper = HelperProcess.start("fake", [sys.executable, {daemon_script!r}, "serve", path],
                                     directory)
        helper.connect(path, timeout=10)
        print(helper.pid, directory)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid, directory = result.stdout.split()
    assert gone(int(pid))
    assert not os.path.exists(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a directory to another user needs root")
def test_a_runtime_directory_can_be_handed_to_the_user_a_daemon_runs_as():
    directory = make_runtime_directory("fake", owner=(65534, 65534))
    try:
        status = os.stat(directory)
        assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (65534, 65534, 0o700)
    finally:
        os.rmdir(directory)


def test_a_death_nobody_listens_for_is_logged_with_its_last_words(start, caplog):
    helper, path = start("crash")
    with caplog.at_level("WARNING", logger="kvmlet.host.processes"):
        connection = helper.connect(path, timeout=10)
        assert helper.wait(10) == 3
    assert f"fake (pid {helper.pid}) exited with status 3: lost my way" in caplog.text
    connection.close()
