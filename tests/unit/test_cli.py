"""The CLI: user mistakes end as one line on stderr and a non-zero status, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvmlet import cli
from kvmlet.kvm import system
from tests.unit.boot.synthetic_kernels import make_bzimage


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmlet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvmlet: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_kernel_is_one_line(tmp_path):
    result = run_cli("run", "-k", str(tmp_path / "bzImage"))
    assert_one_line_error(result, "bzImage", "No such file")


def test_file_that_is_not_a_kernel_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a kernel\n" * 100)
    result = run_cli("run", "-k", str(tmp_path / "notes.txt"))
    assert_one_line_error(result, "not a kernel kvmlet can boot", "multiboot")


def test_32_bit_only_kernel_is_one_line(tmp_path):
    (tmp_path / "old").write_bytes(make_bzimage(xloadflags=0))
    result = run_cli("run", "-k", str(tmp_path / "old"))
    assert_one_line_error(result, "64-bit")


def test_bad_memory_size_and_disk_option_are_one_line(tmp_path):
    (tmp_path / "k").write_bytes(make_bzimage())
    assert_one_line_error(run_cli("run", "-k", str(tmp_path / "k"), "-m", "lots"), "lots")
    result = run_cli("run", "-k", str(tmp_path / "k"), "-d", "disk.img,fast")
    assert_one_line_error(result, "fast")


def test_missing_dev_kvm_is_one_line(tmp_path, monkeypatch, capsys):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    original = system.Kvm.__init__
    monkeypatch.setattr(
        system.Kvm, "__init__", lambda self, path="": original(self, str(tmp_path / "kvm"))
    )
    status = cli.main(["run", "-k", str(kernel), "--host-profile", "none"])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.startswith("kvmlet: ") and "/dev/kvm" not in captured.out
    assert "kvm" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_sandbox_needs_a_command():
    assert_one_line_error(run_cli("sandbox"), "no command")


def test_help_teaches_each_flag_with_examples():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    for flag in ("--kernel", "--initrd", "--params", "--mem", "--cpus", "--disk", "--debug-io"):
        assert flag in result.stdout
    assert "examples:" in result.stdout and "Ctrl-A x" in result.stdout


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("kvmlet ")


@pytest.mark.parametrize("argv", [["run", "-i", "initrd"], ["run", "-c", "0"]])
def test_inconsistent_flags_are_one_line(argv):
    assert_one_line_error(run_cli(*argv))


def test_a_sandbox_command_that_times_out_exits_124_with_its_output(monkeypatch, capfd):
    from kvmlet.sandboxing import SandboxResult
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    result = SandboxResult(None, "started\n", GuestStop(StopReason.TIMEOUT), stdout=b"started\n")
    asked = fake_sandbox(monkeypatch, result)
    status = cli.main(["sandbox", "--timeout", "3", "--host-profile", "none", "--", "sleep 9"])
    captured = capfd.readouterr()
    assert (status, asked["command"], asked["timeout"]) == (124, "sleep 9", 3.0)
    assert captured.out == "started\n"
    assert captured.err.strip().splitlines()[-1] == "kvmlet: the command timed out after 3 s"


def fake_sandbox(monkeypatch, outcome):
    """Replace kvmlet.sandboxing.sandbox by one that records its call and returns or raises
    `outcome` (having streamed its stdout and stderr, as the real one does)."""
    from kvmlet import sandboxing as sandbox_module

    asked = {}

    def sandbox(command, config, *, timeout, **options):
        asked.update(command=command, timeout=timeout, **options)
        if isinstance(outcome, BaseException):
            raise outcome
        os.write(options["stdout"], outcome.stdout)
        os.write(options["stderr"], outcome.stderr)
        return outcome

    monkeypatch.setattr(sandbox_module, "sandbox", sandbox)
    return asked


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["echo a; exit 3"], "echo a; exit 3"),
        (["echo", "a; exit 3", "$HOME"], "echo 'a; exit 3' '$HOME'"),
    ],
)
def test_one_sandbox_argument_is_a_shell_line_and_several_are_one_program(
    monkeypatch, argv, command
):
    from kvmlet.sandboxing import SandboxResult
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    asked = fake_sandbox(monkeypatch, SandboxResult(3, "a\n", GuestStop(StopReason.RESET)))
    assert cli.main(["sandbox", "--host-profile", "none", "--", *argv]) == 3
    assert asked["command"] == command


@pytest.mark.parametrize(
    ("reason", "status"),
    [("USER_SPACE_UNSUPPORTED", 6), ("TRIPLE_FAULT", 3), ("RESET", 1)],
)
def test_a_sandbox_guest_that_never_ran_the_command_exits_with_kvmlets_status(
    monkeypatch, capsys, reason, status
):
    from kvmlet.errors import GuestStoppedError
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    stop = GuestStop(StopReason[reason], "why")
    fake_sandbox(monkeypatch, GuestStoppedError(f"the command did not run: {stop}", stop))
    assert cli.main(["sandbox", "--host-profile", "none", "--", "true"]) == status
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == f"kvmlet: the command did not run: {stop}"


def test_a_sandbox_command_that_reset_the_guest_reports_no_status(monkeypatch, capfd):
    from kvmlet.sandboxing import SandboxResult
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    result = SandboxResult(None, "bye\n", GuestStop(StopReason.RESET), stdout=b"bye\n")
    fake_sandbox(monkeypatch, result)
    assert cli.main(["sandbox", "--host-profile", "none", "--", "reboot -f"]) == 1
    captured = capfd.readouterr()
    assert captured.out == "bye\n"
    assert captured.err.strip().splitlines()[-1] == (
        "kvmlet: the command reported no exit status (the guest reset the machine)"
    )


def test_sandbox_help_says_how_arguments_run_and_whose_status_it_is():
    result = run_cli("sandbox", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "One argument is a shell command line" in text
    assert "several arguments are one program and its arguments" in text
    for status in ("1 a usage", "124 the command", "6 this host"):
        assert status in text


@pytest.mark.parametrize("argv", [["run"], ["sandbox", "--", "true"]])
def test_a_host_without_kvm_is_told_so_before_the_default_guest_is_built(
    tmp_path, monkeypatch, capsys, argv
):
    import kvmlet.guest

    original = system.Kvm.__init__
    monkeypatch.setattr(
        system.Kvm, "__init__", lambda self, path="": original(self, str(tmp_path / "kvm"))
    )
    monkeypatch.setattr(kvmlet.guest, "ensure_default_guest", pytest.fail)
    assert cli.main([*argv[:1], "--host-profile", "none", *argv[1:]]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kvmlet: cannot open ") and "no such device" in line


@pytest.mark.parametrize(
    "command", ["list", "stop", "pause", "resume", "stat", "balloon", "console"]
)
def test_each_control_command_explains_itself(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "NAME" in result.stdout or command == "list"


def test_control_commands_teach_with_examples():
    assert "kvmlet stop web --force" in run_cli("stop", "--help").stdout
    balloon = run_cli("balloon", "--help").stdout
    assert "kvmlet balloon web 64M" in balloon and "--balloon" in balloon
    run = run_cli("run", "--help").stdout
    assert "--name" in run and "--api-socket" in run and "kvmlet list" in run


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["stop", "web", "--grace", "-1"], "--grace"),
        (["stop", "web", "--grace", "nan"], "--grace"),
        (["stop", "web", "--grace", "inf"], "--grace"),
        (["stat", "web", "--watch", "inf"], "--watch"),
        (["stat", "web", "--watch", "0"], "--watch"),
        (["console", "web", "--bytes", "0"], "--bytes"),
        (["balloon", "web", "lots"], "lots"),
        (["stop", "two words"], "bad machine name"),
        (["pause", "nobody-here"], "no machine named nobody-here is running"),
    ],
)
def test_control_command_mistakes_are_one_line(argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("kvmlet: ") and fragment in error
    assert len(error.strip().splitlines()) == 1


def test_a_list_of_no_machines_is_a_header(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.split() == ["NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME"]
    assert cli.main(["list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


def test_balloon_sizes():
    from kvmlet.cli.control import parse_balloon_size

    assert parse_balloon_size("64M") == 64 << 20
    assert parse_balloon_size("8m") == 8 << 20  # below any RAM size: fine for a balloon
    assert parse_balloon_size("512K") == 512 << 10
    assert parse_balloon_size("1G") == 1 << 30
    assert parse_balloon_size("0") == 0
    assert parse_balloon_size("64") == 64 << 20


def test_help_teaches_the_programmable_machine_flags():
    result = run_cli("run", "--help")
    for flag in ("--module", "--debug-exit", "--device", "--record", "multiboot"):
        assert flag in result.stdout
    assert "(V << 1) | 1" in result.stdout
    assert "exit status: 0 when every replayed device" in run_cli("replay", "--help").stdout


def test_programmable_machine_mistakes_are_one_line(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    result = run_cli("run", "-k", str(kernel), "--device", "nomodel,port=1")
    assert_one_line_error(result, "start with the model")
    result = run_cli("run", "-k", str(kernel), "--module", str(kernel))
    assert_one_line_error(result, "--module is for multiboot kernels", "boots linux64")
    result = run_cli("run", "-k", str(kernel), "--boot-method", "multiboot")
    assert_one_line_error(result, "no multiboot header")
    (tmp_path / "not.rec").write_bytes(b"hello")
    assert_one_line_error(run_cli("replay", str(tmp_path / "not.rec")), "not a kvmlet recording")


def test_replay_reports_and_exits_0_or_2(tmp_path):
    from tests.unit.test_record_replay import SOURCE, record, with_model

    path = record(tmp_path)
    result = run_cli("replay", str(path))
    assert result.returncode == 0
    assert result.stderr.startswith("kvmlet: replayed 13 accesses")
    assert "no divergence" in result.stderr
    with_model(path, SOURCE.replace("return zlib.crc32(data)", "return 0"))
    result = run_cli("replay", str(path))
    assert result.returncode == 2 and "first divergence at event" in result.stderr


@pytest.mark.parametrize("seconds", ["inf", "1e300", "0", "-1", "nan", "-inf", "soon", ""])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_one_line(tmp_path, seconds):
    (tmp_path / "k").write_bytes(make_bzimage())
    for command in (["run", "-k", str(tmp_path / "k")], ["sandbox"]):
        result = run_cli(*command, "--timeout", seconds, "--host-profile", "none", "--", "true")
        assert_one_line_error(result, "--timeout")


def test_kernel_parameters_that_are_not_utf8_are_one_line(tmp_path):
    (tmp_path / "k").write_bytes(make_bzimage())
    result = subprocess.run(
        [sys.executable, "-m", "kvmlet", "run", "-k", str(tmp_path / "k"), "-p", b"quiet \xff"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert_one_line_error(result, "UTF-8")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["fly"],
        ["run", "--no-such-flag"],
        ["run", "-c"],
        ["run", "-c", "two"],
        ["run", "--console", "tty"],
        ["run", "--virtio-transport", "usb"],
        ["sandbox", "-m"],
        ["stop"],
        ["pause", "a", "b"],
        ["stat", "web", "--watch", "often"],
        ["console", "web", "--bytes", "many"],
        ["balloon"],
        ["list", "--yaml"],
    ],
)
def test_usage_mistakes_are_one_line_and_status_1(argv):
    result = run_cli(*argv)
    assert_one_line_error(result)
    assert "usage:" not in result.stderr


def test_kernel_parameters_must_be_utf8_without_nul():
    from kvmlet.errors import KvmletError
    from kvmlet.machine.config import MachineConfig

    with pytest.raises(KvmletError, match="kernel parameters"):
        MachineConfig(boot_code=b"\xf4", params="console=\udcff")
    with pytest.raises(KvmletError, match="kernel parameters"):
        MachineConfig(boot_code=b"\xf4", extra_parameters=("a\0b",))


def test_a_sigterm_while_the_machine_is_built_is_never_swallowed(tmp_path, monkeypatch, capsys):
    """Building a machine runs code that takes any exception for a refusal (the bus's listener
    commits); a SIGTERM then must not raise in there, but wait until the machine exists and
    stop it."""
    import os
    import signal

    from kvmlet.errors import KvmletError
    from kvmlet.machine import machine as machine_module

    swallowed, stops = [], []

    class Building:
        def __init__(self, config, **options):
            try:  # what a listener commit does with whatever a KVM call raised
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # bytecode boundaries where a handler could run
                    pass
            except Exception as error:
                swallowed.append(error)

        def stop(self, reason, detail=""):
            stops.append(detail)

        def start(self):
            raise KvmletError("not a real machine")

        def close(self):
            pass

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(machine_module, "Machine", Building)
    previous = signal.getsignal(signal.SIGTERM)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    try:
        status = cli.main(["run", "-k", str(kernel), "--host-profile", "none"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert swallowed == []
    error = capsys.readouterr().err
    if stops:  # delivered once the machine existed: stopped, then its start failed here
        assert stops == ["SIGTERM"] and "not a real machine" in error
    else:
        assert error == "kvmlet: terminated (SIGTERM) before the guest started\n"
    assert status == 1


def test_a_sandbox_passes_shares_streams_and_stdin_unless_a_terminal(monkeypatch, tmp_path):
    from kvmlet.sandboxing import SandboxResult
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    asked = fake_sandbox(monkeypatch, SandboxResult(0, "", GuestStop(StopReason.RESET)))
    argv = ["sandbox", "--host-profile", "none", "--share", str(tmp_path), "--", "true"]
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    assert cli.main(argv) == 0
    assert (asked["shares"], asked["stdin"], asked["stdout"], asked["stderr"]) == (
        [str(tmp_path)],
        0,
        1,
        2,
    )
    monkeypatch.setattr(os, "isatty", lambda fd: fd == 0)
    assert cli.main(argv) == 0
    assert asked["stdin"] is None


def test_an_interrupted_sandbox_without_a_status_exits_130(monkeypatch, capfd):
    from kvmlet.sandboxing import SandboxResult
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    stop = GuestStop(StopReason.HOST_QUIT, "interrupted")
    fake_sandbox(monkeypatch, SandboxResult(None, "", stop, interrupted=True))
    assert cli.main(["sandbox", "--host-profile", "none", "--", "sleep 9"]) == 130
    assert capfd.readouterr().err.strip().splitlines()[-1] == "kvmlet: interrupted"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--9p", ",ro"], "--9p"),
        (["--9p", "/x,tag=a", "--9p", "/y,tag=a"], "tags must differ"),
        (["--rootfs", "/x,ro"], "--rootfs"),
        (["--rootfs", "/", "-k", "k", "-i", "initrd"], "drop -i"),
    ],
)
def test_share_mistakes_of_run_are_one_line(monkeypatch, argv, message):
    from kvmlet.cli import sandbox as cli_sandbox
    from kvmlet.errors import KvmletError
    from kvmlet.machine.config import MachineConfig

    args = cli.build_parser().parse_args(["run", *argv])
    with pytest.raises(KvmletError, match=message):
        cli_sandbox.with_shares(args, MachineConfig(kernel="k"))


def test_run_shares_become_machine_shares(tmp_path):
    from kvmlet.cli import sandbox as cli_sandbox
    from kvmlet.machine.config import MachineConfig, ShareConfig

    args = cli.build_parser().parse_args(["run", "--9p", f"{tmp_path},ro", "--9p", "/srv,tag=s"])
    config = cli_sandbox.with_shares(args, MachineConfig(kernel="k"))
    assert config.shares == (ShareConfig(str(tmp_path), "share0", True), ShareConfig("/srv", "s"))


def test_a_rootfs_guest_that_stopped_early_gets_one_line_saying_why(capsys):
    from kvmlet.cli.sandbox import explain_rootfs_stop

    explain_rootfs_stop(b"[ 0.5] boot\r\nkvmlet-init: the guest kernel lacks: CONFIG_9P_FS\r\n")
    assert capsys.readouterr().err == "kvmlet: the guest kernel lacks: CONFIG_9P_FS\n"
    explain_rootfs_stop(b"[ 0.5] boot\r\nkvmlet-guest: ready\r\n# reboot -f\r\n")
    assert capsys.readouterr().err == ""


def test_help_teaches_the_network_modes():
    result = run_cli("run", "--help")
    for text in ("--net", "user[,hostfwd=tcp:HOSTPORT:GUESTPORT...]", "vhost=on|off", "none"):
        assert text in result.stdout
    assert "`-n` alone" in result.stdout and "for root too" in result.stdout


def test_net_options_become_nics_and_the_name_goes_with_them(tmp_path):
    from kvmlet.virtio.net.option import NetConfig, PortForward

    kernel = tmp_path / "k"
    kernel.write_bytes(make_bzimage())

    def config(*argv: str):
        args = cli.build_parser().parse_args(["run", "-k", str(kernel), *argv])
        return cli.run_config(args)

    nets = config("-n", "-n", "tap,ifname=kvm0", "-n", "hostfwd=tcp:8080:80", "-m", "64M").nets
    assert nets == (
        NetConfig("user"),
        NetConfig("tap", ifname="kvm0"),
        NetConfig("user", forwards=(PortForward("tcp", 8080, 80),)),
    )
    assert config().nets == ()
    assert config("--name", "web", "-n").name == "web"  # what generated MACs derive from


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["-n", "slirp"], "unknown mode 'slirp'"),
        (["-n", "none", "-n", "user"], "none (no NIC) cannot go with other networks"),
        (["-n", "tap,ifname=a/b"], "is not an interface name"),
        (["--net", "user,mtu=70000"], "mtu=70000 is not 68-65520"),
    ],
)
def test_net_mistakes_are_one_line(tmp_path, argv, fragment):
    (tmp_path / "k").write_bytes(make_bzimage())
    result = run_cli("run", "-k", str(tmp_path / "k"), "--host-profile", "none", *argv)
    assert_one_line_error(result, fragment)
