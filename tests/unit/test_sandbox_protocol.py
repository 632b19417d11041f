"""The sandbox's command protocol: the host side (kvmlet.sandboxing.control) against the guest's
agent (the sandbox part of rootfs_init.sh), run here with busybox sh, its mounts made no-ops
and the control share replaced by a symlink to the control directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kvmlet.guest.rootfs import INIT_SCRIPT_PATH
from kvmlet.sandboxing.control import (
    ControlDirectory,
    command_script,
    guest_environment,
    parse_status,
)

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="no busybox on this host")


def test_the_environment_crossing_leaves_out_host_sessions_and_odd_names():
    crossed = guest_environment(
        {"HOME": "/h", "SSH_AUTH_SOCK": "/s", "BASH_FUNC_f%%": "() {}", "A B": "x", "X": "1"}
    )
    assert crossed == {"HOME": "/h", "X": "1"}


def test_the_command_script_quotes_everything_it_passes(tmp_path):
    script = command_script("echo \"$X\" 'q'; pwd", {"X": "a'b $c"}, str(tmp_path))
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout == f"a'b $c q\n{tmp_path}\n"


def test_a_status_counts_only_with_the_token():
    assert parse_status("abc 3\n", "abc") == 3
    assert parse_status("abc 256\n", "abc") is None
    assert parse_status("abd 3\n", "abc") is None
    assert parse_status("abc 3\nabc 4\n", "abc") is None
    assert parse_status("", "abc") is None


def agent(tmp_path, control: ControlDirectory) -> list[str]:
    """argv running the agent on `control` with busybox, as the guest would."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "ctl").symlink_to(control.path)
    # No mounts on the host, and no sync: the control directory is a local one, and a
    # host-wide sync waits for every other job's writes (tens of seconds beside a test box).
    wrapper = tmp_path / "bb"
    wrapper.write_text(
        f'#!/bin/sh\ncase "$1" in mount|umount|sync) exit 0 ;; esac\nexec {BUSYBOX} "$@"\n'
    )
    wrapper.chmod(0o755)
    text = INIT_SCRIPT_PATH.read_text()
    functions = text[text.index("fail() {") : text.index("stage2() {")]
    script = functions.replace("/run/kvmlet", str(state))
    return [BUSYBOX, "sh", "-c", f"bb={wrapper}\n{script}\nsandbox_agent kvmletctl"]


def run_request(tmp_path, command: str, *, uid=0, gid=0, stdin=None, **kwargs):
    control = ControlDirectory()
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o755, exist_ok=True)
    control.write_request(
        command,
        environment={"GREETING": "hello there", "PATH": os.environ["PATH"]},
        workdir=str(workdir),
        uid=uid,
        gid=gid,
        groups=[gid],
        mounts=[],
        stream_stdin=stdin is not None,
    )
    if isinstance(stdin, bytes):
        control.write_input(stdin)
    return control, agent(tmp_path, control)


@needs_busybox
def test_the_agent_runs_the_command_in_the_workdir_with_the_environment_and_input(tmp_path):
    command = 'echo "$GREETING from $(pwd)"; echo oops >&2; tr a-z A-Z; exit 3'
    control, argv = run_request(tmp_path, command, stdin=b"some input\n")
    try:
        seen = {"stdout": [], "stderr": []}
        control.relay_output({name: seen[name].append for name in seen})
        subprocess.run(argv, check=True, timeout=60)
        control.finish()
        assert (
            b"".join(seen["stdout"]) == f"hello there from {tmp_path}/work\nSOME INPUT\n".encode()
        )
        assert b"".join(seen["stderr"]) == b"oops\n"
        assert control.started() and control.status() == 3
    finally:
        control.close()


@needs_busybox
def test_output_that_imitates_the_status_does_not_count(tmp_path):
    control, argv = run_request(tmp_path, "echo 0 > ../status; echo 'x 0'; kill -9 $$")
    try:
        subprocess.run(argv, check=True, timeout=60)
        assert control.status() == 137  # the shell's own status for SIGKILL
    finally:
        control.close()


@needs_busybox
@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
def test_the_command_runs_as_the_callers_uid_and_gid():
    top = tempfile.mkdtemp()  # not under pytest's 0700 directory: uid 65534 must get in
    try:
        os.chmod(top, 0o755)
        control, argv = run_request(Path(top), "id -u; id -g", uid=65534, gid=65533)
        subprocess.run(argv, check=True, timeout=60)
        with open(os.path.join(control.path, "stdout")) as file:
            assert file.read().split() == ["65534", "65533"]
        assert control.status() == 0
        control.close()
    finally:
        shutil.rmtree(top)


@needs_busybox
def test_streamed_input_and_output_and_a_signal_cross_while_the_command_runs(tmp_path):
    command = "read line; echo \"got $line\"; trap 'echo caught; exit 42' INT; sleep 30 & wait"
    control, argv = run_request(tmp_path, command, stdin=0)
    reader, writer = os.pipe()
    seen = []
    arrived = threading.Event()

    def collect(data: bytes) -> None:
        seen.append(data)
        if b"got first" in b"".join(seen):
            arrived.set()

    try:
        control.relay_output({"stdout": collect})
        control.feed_stdin(reader)
        process = subprocess.Popen(argv)
        os.write(writer, b"first\n")
        assert arrived.wait(30), "output did not stream while the command ran"
        start = time.monotonic()
        control.send_signal("INT")
        process.wait(timeout=30)
        assert time.monotonic() - start < 10
        control.finish()
        assert b"".join(seen) == b"got first\ncaught\n"
        assert control.status() == 42
    finally:
        os.close(writer)
        os.close(reader)
        control.close()
