"""`kvmlet.sandbox()` and `kvmlet.sandboxing.run_in_guest()` decide from the control directory
(or the console) and the stop what their caller gets: a result once the command started
(status None when it reported none), GuestStoppedError when the guest stopped before the
command could start. The machine is a stand-in here; the `linux`
and `pvm` tiers run the real one."""

from __future__ import annotations

import os

import pytest

from kvmlet import sandboxing as sandbox_module
from kvmlet.errors import GuestStoppedError, KvmletError
from kvmlet.machine import file_transport
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.vhost_config import FilesystemConfig
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

CONFIG = MachineConfig(kernel="vmlinux", host_profile="none")


class StandInMachine:
    """Plays back one run: the console transcript and how the guest stopped."""

    transcript = b""
    stop = GuestStop(StopReason.RESET)
    configs: list = []

    def __init__(self, config, console_echo_fd=None):
        self.configs.append(config)
        self.console = self
        self.created = self.started = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def wait(self, timeout):
        return self.stop

    def stats(self):
        return {}


def play(monkeypatch, transcript: bytes, stop: GuestStop):
    monkeypatch.setattr(StandInMachine, "transcript", lambda self: transcript)
    monkeypatch.setattr(StandInMachine, "stop", stop)
    monkeypatch.setattr(sandbox_module, "Machine", StandInMachine)


def test_a_command_that_reported_its_status_returns_it_with_its_output(monkeypatch):
    play(
        monkeypatch, b"kvmlet-guest: ready\r\nhi\r\nkvmlet-exit: 3\r\n", GuestStop(StopReason.RESET)
    )
    result = sandbox_module.run_in_guest("echo hi; exit 3", CONFIG)
    assert (result.status, result.output) == (3, "hi\n")
    assert "quiet" in StandInMachine.configs[-1].extra_parameters


def test_a_guest_that_never_started_the_command_raises_with_its_stop(monkeypatch):
    stop = GuestStop(StopReason.USER_SPACE_UNSUPPORTED, "/init died at its first system call")
    play(monkeypatch, b"Kernel panic - not syncing: Attempted to kill init!\r\n", stop)
    with pytest.raises(GuestStoppedError) as raised:
        sandbox_module.run_in_guest("true", CONFIG)
    assert raised.value.stop is stop
    assert str(raised.value).startswith(f"the command did not run: {stop} after ")


def test_a_reset_before_the_command_started_raises(monkeypatch):
    play(monkeypatch, b"Kernel panic - not syncing: VFS\r\n", GuestStop(StopReason.RESET))
    with pytest.raises(GuestStoppedError, match="the command did not run"):
        sandbox_module.run_in_guest("true", CONFIG)


def test_a_command_that_reset_the_guest_itself_has_no_status(monkeypatch):
    play(monkeypatch, b"kvmlet-guest: ready\r\nbye\r\n", GuestStop(StopReason.RESET))
    result = sandbox_module.run_in_guest("echo bye; reboot -f", CONFIG)
    assert (result.status, result.output, result.stop.reason) == (None, "bye\n", StopReason.RESET)


def test_a_timeout_returns_no_status_even_before_the_command_started(monkeypatch):
    play(monkeypatch, b"[ 50.0] booting\r\n", GuestStop(StopReason.TIMEOUT))
    result = sandbox_module.run_in_guest("true", CONFIG, timeout=1)
    assert (result.status, result.stop.reason) == (None, StopReason.TIMEOUT)


class StandInAgent(StandInMachine):
    """Plays the sandbox's guest agent: on `wait`, runs `act(control directory, request)`."""

    act = staticmethod(lambda control, request: None)

    def wait(self, timeout):
        import os

        control = next(share.path for share in self.configs[-1].shares if share.tag == "kvmletctl")
        with open(os.path.join(control, "request")) as file:
            request = dict(line.split("=", 1) for line in file.read().splitlines())
        self.act(control, request)
        return self.stop


RESET = GuestStop(StopReason.RESET)


def play_agent(monkeypatch, tmp_path, act, stop=RESET, transcript=b"", virtiofs_problem="absent"):
    """The sandbox against a stand-in agent; virtiofs is usable when `virtiofs_problem` is None."""
    monkeypatch.setenv("KVMLET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        file_transport, "virtiofs_problem", lambda program, read_only: virtiofs_problem
    )
    monkeypatch.setattr(StandInAgent, "act", staticmethod(act))
    monkeypatch.setattr(StandInAgent, "stop", stop)
    monkeypatch.setattr(StandInAgent, "transcript", lambda self: transcript)
    monkeypatch.setattr(sandbox_module, "Machine", StandInAgent)


def write(control: str, name: str, data: str) -> None:
    with open(f"{control}/{name}", "a") as file:
        file.write(data)


def test_the_sandbox_returns_the_status_that_carries_the_token_and_the_output(
    monkeypatch, tmp_path
):
    def agent(control, request):
        write(control, "started", "")
        write(control, "stdout", "out\n")
        write(control, "stderr", "err\n")
        write(control, "status", f"{request['token']} 3\n")

    play_agent(monkeypatch, tmp_path, agent)
    result = sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path))
    assert (result.status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert sorted(result.output.splitlines()) == ["err", "out"]
    config = StandInAgent.configs[-1]
    assert {share.tag: share.path for share in config.shares}["kvmletcwd"] == str(tmp_path)
    assert "kvmlet.ctl=kvmletctl" in config.extra_parameters
    assert "root=kvmletroot" in config.extra_parameters


REQUESTS: list[dict[str, str]] = []


def finish_with_status(control, request):
    REQUESTS.append(request)
    write(control, "started", "")
    write(control, "status", f"{request['token']} 0\n")


def test_auto_falls_back_to_9p_for_the_callers_directory_as_the_callers_uid(monkeypatch, tmp_path):
    play_agent(monkeypatch, tmp_path, finish_with_status, virtiofs_problem="no virtiofsd")
    result = sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path))
    assert (result.status, result.transport) == (0, "9p")
    config = StandInAgent.configs[-1]
    assert not config.filesystems and "rootfstype=9p" in config.extra_parameters
    request = REQUESTS[-1]
    assert request["mounts"] == f"'9p kvmletcwd {tmp_path}'"
    assert (request["uid"], request["gid"]) == (str(os.getuid()), str(os.getgid()))


@pytest.mark.parametrize(("euid", "via"), [(0, "auto"), (1000, "virtiofs")])
def test_a_usable_virtiofsd_serves_the_root_and_the_callers_directory(
    monkeypatch, tmp_path, euid, via
):
    play_agent(monkeypatch, tmp_path, finish_with_status, virtiofs_problem=None)
    monkeypatch.setattr(file_transport.os, "geteuid", lambda: euid)
    monkeypatch.setattr(sandbox_module.os, "getuid", lambda: euid)
    monkeypatch.setattr(sandbox_module.os, "getgid", lambda: euid)
    result = sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path), rootfs_via=via)
    assert (result.status, result.transport) == (0, "virtiofs")
    config = StandInAgent.configs[-1]
    assert config.filesystems == (
        FilesystemConfig("kvmletroot", source="/", read_only=True),
        FilesystemConfig("kvmletcwd", source=str(tmp_path)),
    )
    assert [share.tag for share in config.shares] == ["kvmletctl"], "the control share is 9p"
    assert "rootfstype=virtiofs" in config.extra_parameters
    request = REQUESTS[-1]
    assert request["mounts"] == f"'virtiofs kvmletcwd {tmp_path}'"
    # an unprivileged virtiofsd maps only the caller, as root: the command runs as guest root
    assert (request["uid"], request["gid"], request["groups"]) == ("0", "0", "0")


def test_forced_9p_is_taken_even_where_virtiofs_could_run(monkeypatch, tmp_path):
    play_agent(monkeypatch, tmp_path, finish_with_status, virtiofs_problem=None)
    monkeypatch.setattr(file_transport.os, "geteuid", lambda: 0)
    result = sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path), rootfs_via="9p")
    assert result.transport == "9p" and not StandInAgent.configs[-1].filesystems


def test_forced_virtiofs_that_cannot_run_is_one_line_before_any_boot(monkeypatch, tmp_path):
    play_agent(monkeypatch, tmp_path, finish_with_status, virtiofs_problem="no virtiofsd")
    booted = len(StandInAgent.configs)
    with pytest.raises(KvmletError, match="--rootfs-via virtiofs: no virtiofsd"):
        sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path), rootfs_via="virtiofs")
    assert len(StandInAgent.configs) == booted


@pytest.mark.parametrize(("net", "mode"), [("", "user"), ("user", "user")])
def test_the_sandbox_gets_a_nic_when_asked(monkeypatch, tmp_path, net, mode):
    play_agent(monkeypatch, tmp_path, finish_with_status)
    sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path), net=net)
    assert [nic.mode for nic in StandInAgent.configs[-1].nets] == [mode]
    sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path))
    assert StandInAgent.configs[-1].nets == ()


def test_a_status_without_the_token_is_no_status(monkeypatch, tmp_path):
    def agent(control, request):
        write(control, "started", "")
        write(control, "status", "0123 0\n")

    play_agent(monkeypatch, tmp_path, agent)
    result = sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path))
    assert result.status is None


def test_a_sandbox_whose_init_failed_raises_with_the_inits_line(monkeypatch, tmp_path):
    console = b"kvmlet-init: the guest kernel lacks: CONFIG_9P_FS (see kvmlet run --help)\r\n"
    play_agent(monkeypatch, tmp_path, lambda control, request: None, transcript=console)
    with pytest.raises(GuestStoppedError, match="lacks: CONFIG_9P_FS"):
        sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path))


def test_the_sandbox_on_a_host_that_cannot_run_user_space_raises_with_that_stop(
    monkeypatch, tmp_path
):
    stop = GuestStop(StopReason.USER_SPACE_UNSUPPORTED, "/init died at its first system call")
    play_agent(monkeypatch, tmp_path, lambda control, request: None, stop)
    with pytest.raises(GuestStoppedError) as raised:
        sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path))
    assert raised.value.stop is stop


def test_a_keyboard_interrupt_asks_the_command_to_stop_and_waits_for_its_status(
    monkeypatch, tmp_path
):
    calls = []

    class Interrupted(StandInAgent):
        def wait(self, timeout=None):
            calls.append(timeout)
            if len(calls) == 1:
                raise KeyboardInterrupt
            control = next(s.path for s in self.configs[-1].shares if s.tag == "kvmletctl")
            with open(f"{control}/signal") as file:
                assert file.read() == "INT"
            return super().wait(timeout)

    def agent(control, request):
        write(control, "started", "")
        write(control, "status", f"{request['token']} 130\n")

    play_agent(monkeypatch, tmp_path, agent)
    monkeypatch.setattr(sandbox_module, "Machine", Interrupted)
    result = sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path), timeout=600)
    assert (result.status, result.interrupted) == (130, True)
    assert calls[1] <= sandbox_module.INTERRUPT_GRACE


def test_output_streamed_to_a_descriptor_goes_there_and_not_into_the_result(monkeypatch, tmp_path):
    def agent(control, request):
        write(control, "started", "")
        write(control, "stdout", "streamed\n")
        write(control, "stderr", "kept\n")
        write(control, "status", f"{request['token']} 0\n")

    play_agent(monkeypatch, tmp_path, agent)
    with open(tmp_path / "out", "wb") as out:
        result = sandbox_module.sandbox("x", CONFIG, cwd=str(tmp_path), stdout=out.fileno())
    assert (tmp_path / "out").read_bytes() == b"streamed\n"
    assert (result.stdout, result.stderr, result.output) == (b"", b"kept\n", "kept\n")


def test_kvmlet_sandbox_stays_the_function_once_its_module_is_imported():
    import importlib

    import kvmlet

    importlib.import_module("kvmlet.sandboxing.control")
    assert callable(kvmlet.sandbox)
    assert kvmlet.sandbox is sandbox_module.sandbox
