"""The test box's host side without booting it: console relay, session files, QEMU command."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest

RUN_SCRIPT = Path(__file__).resolve().parents[2] / "testbox" / "run.py"
_spec = importlib.util.spec_from_file_location("testbox_run", RUN_SCRIPT)
testbox_run = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = testbox_run  # dataclasses look their module up there
_spec.loader.exec_module(testbox_run)

TOKEN = "0123456789abcdef"
CONSOLE = (
    b"[    0.1] booting\r\n"
    b"kvmlet-box: start ffffffffffffffff\n"  # another token: boot log, not a start
    b"kvmlet-box: start " + TOKEN.encode() + b"\n"
    b"command output\nkvmlet-box: end 1\nmore\n"
    b"kvmlet-box: end " + TOKEN.encode() + b"\n"
    b"[    2.0] reboot: Restarting system\n"
)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, len(CONSOLE)])
def test_relay_splits_boot_log_and_command_output_at_any_chunking(chunk_size):
    output = io.BytesIO()
    relay = testbox_run.ConsoleRelay(TOKEN, output)
    for start in range(0, len(CONSOLE), chunk_size):
        relay.feed(CONSOLE[start : start + chunk_size])
    assert output.getvalue() == b"command output\nkvmlet-box: end 1\nmore\n"
    assert relay.started and relay.finished
    assert relay.boot_log.startswith(b"[    0.1] booting\r\n")
    assert relay.boot_log.endswith(b"start ffffffffffffffff\n")


def test_relay_without_start_marker_keeps_everything_as_boot_log():
    relay = testbox_run.ConsoleRelay(TOKEN, io.BytesIO())
    relay.feed(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n" + b"x" * 100)
    relay.feed(b"")
    assert not relay.started
    assert relay.boot_log.startswith(b"Kernel panic")


def test_session_command_runs_argv_verbatim_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["sh", "-c", 'printf "%s|" "$@"; pwd; echo "$KVMLET_TESTBOX $EXTRA"', "-", "a b", "c'd"]
    options = testbox_run.BoxOptions(environment={"EXTRA": "x y"})
    session = tmp_path / "session"
    session.mkdir()
    testbox_run.write_session(session, argv, options, TOKEN)
    assert (session / "token").read_text() == TOKEN
    assert (session / "work_dir").read_text() == str(testbox_run.CHECKOUT)
    result = subprocess.run(
        ["sh", "-c", '. "$1/environment" && . "$1/command"', "-", str(session)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == f"a b|c'd|{tmp_path}\n1 x y\n"


def test_environment_puts_the_real_interpreter_first_on_path():
    environment = testbox_run.box_environment({})
    assert environment["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert environment["KVMLET_TESTBOX"] == "1"
    assert environment["XDG_RUNTIME_DIR"] == "/run"  # HOME is read-only in L1


def test_qemu_command_boots_tcg_with_the_box_parameters(tmp_path):
    options = testbox_run.BoxOptions()
    command = testbox_run.qemu_command(Path("/k/vmlinux"), tmp_path, options)
    assert command[:5] == ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"]
    assert "-no-reboot" in command
    parameters = command[command.index("-append") + 1].split()
    assert {"random.trust_cpu=on", "tsc=reliable", "console=ttyS0", "ro"} <= set(parameters)
    assert f"init={testbox_run.BOX_INIT}" in parameters
    tsc = next(p for p in parameters if p.startswith("tsc_early_khz="))
    assert int(tsc.partition("=")[2]) > 100_000
    shares = [argument for argument in command if argument.startswith("local,")]
    assert "local,id=hostroot,path=/,readonly=on," in shares[0]
    assert f"path={testbox_run.CHECKOUT}," in shares[1] and "readonly" not in shares[1]
    assert f"path={tmp_path}," in shares[2]


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        testbox_run.main(["--timeout", "5", "--"])
    assert stop.value.code == 2
    assert "no command" in capsys.readouterr().err


def test_box_init_is_valid_shell_and_reports_status_between_markers():
    subprocess.run(["sh", "-n", str(testbox_run.BOX_INIT)], check=True)
    text = testbox_run.BOX_INIT.read_text()
    start, end = text.index("kvmlet-box: start"), text.index("kvmlet-box: end")
    assert start < text.index('> "$session/status"') < end
    assert "/bin/busybox reboot -f" in text[end:]


@pytest.mark.parametrize(
    ("status", "report", "stalled"),
    [
        (0, "20 passed", False),
        (1, "FAILED tests/linux/test_virtio.py::test_x - AssertionError", False),
        (1, "FAILED ...\nkvmlet-testbox: L1 stopped running nested guests (after x)\n", True),
        (124, "", True),
        (125, "testbox: the box stopped without a status", True),
    ],
)
def test_only_the_box_s_own_failures_are_retried(status, report, stalled):
    from tests.helpers.guests import box_stalled

    assert box_stalled(status, report) is stalled
