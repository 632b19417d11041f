"""`--rootfs-via`, `--verbose` and the sandbox's `--net` on the command line: what reaches the
machine's configuration and `kvmlet.sandbox`, and the one line --verbose prints."""

from __future__ import annotations

import pytest

from kvmlet import cli
from kvmlet.cli.sandbox import with_shares
from kvmlet.errors import KvmletError
from kvmlet.machine import file_transport
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.shares import ROOT_TAG
from tests.unit.test_cli import fake_sandbox


@pytest.fixture
def virtiofsd(monkeypatch):
    """Whether virtiofs can run here: set `.problem` (None: it can)."""

    class Host:
        problem: str | None = None
        read_only: list = []

    def probe(program, read_only):
        Host.read_only.append(list(read_only))
        return Host.problem

    monkeypatch.setattr(file_transport, "virtiofs_problem", probe)
    monkeypatch.setattr(file_transport.os, "geteuid", lambda: 0)
    monkeypatch.setattr("kvmlet.guest.rootfs.ensure_rootfs_initramfs", lambda p: "initrd")
    return Host


def run_args(*words: str):
    return cli.build_parser().parse_args(["run", *words])


@pytest.mark.parametrize(
    ("words", "problem", "kind"),
    [
        ([], None, "virtiofs"),
        ([], "no virtiofsd", "9p"),
        (["--rootfs-via", "9p"], None, "9p"),
        (["--rootfs-via", "virtiofs"], None, "virtiofs"),
    ],
)
def test_run_rootfs_goes_the_way_asked_or_found(virtiofsd, tmp_path, capsys, words, problem, kind):
    virtiofsd.problem = problem
    config = with_shares(run_args("--rootfs", str(tmp_path), *words), MachineConfig())
    assert file_transport.root_filesystem(config, ROOT_TAG)["type"] == kind
    assert capsys.readouterr().err == "", "quiet without --verbose"


def test_the_probe_is_asked_about_the_directories_shared_read_only(virtiofsd, tmp_path):
    with_shares(run_args("--rootfs", str(tmp_path)), MachineConfig())
    with_shares(run_args("--rootfs", f"{tmp_path},rw"), MachineConfig())
    assert virtiofsd.read_only == [[str(tmp_path)], []]


def test_run_verbose_says_which_way_and_why_in_one_line(virtiofsd, tmp_path, capsys):
    virtiofsd.problem = "virtiofsd not found"
    with_shares(run_args("--rootfs", str(tmp_path), "--verbose"), MachineConfig())
    assert capsys.readouterr().err == (
        "kvmlet: host directories over 9p: not virtiofs, virtiofsd not found\n"
    )


def test_run_forced_virtiofs_that_cannot_run_is_one_line(virtiofsd, tmp_path):
    virtiofsd.problem = "virtiofsd not found"
    args = run_args("--rootfs", str(tmp_path), "--rootfs-via", "virtiofs")
    with pytest.raises(KvmletError, match="--rootfs-via virtiofs: virtiofsd not found"):
        with_shares(args, MachineConfig())


def test_rootfs_via_without_rootfs_is_one_line(virtiofsd):
    with pytest.raises(KvmletError, match="--rootfs-via is for --rootfs"):
        with_shares(run_args("--rootfs-via", "9p"), MachineConfig())
    assert with_shares(run_args(), MachineConfig()) == MachineConfig()


def test_an_unknown_way_is_refused_by_the_parser():
    with pytest.raises(KvmletError, match="--rootfs-via: invalid choice: 'nfs'"):
        run_args("--rootfs", "/", "--rootfs-via", "nfs")


@pytest.mark.parametrize(
    ("words", "net", "via"),
    [
        ([], None, "virtiofs"),
        (["--net"], "", "virtiofs"),
        (["-n", "user,mtu=1500"], "user,mtu=1500", "virtiofs"),
        (["--net", "--rootfs-via", "9p"], "", "9p"),
    ],
)
def test_sandbox_options_reach_the_sandbox(virtiofsd, monkeypatch, capsys, words, net, via):
    from kvmlet.sandboxing import SandboxResult
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    asked = fake_sandbox(monkeypatch, SandboxResult(0, "", GuestStop(StopReason.RESET)))
    status = cli.main(["sandbox", "--host-profile", "none", *words, "--", "true"])
    assert status == 0
    assert (asked["net"], asked["rootfs_via"], asked["command"]) == (net, via, "true")
    assert virtiofsd.read_only[-1:] == ([] if via == "9p" else [["/"]])
    assert capsys.readouterr().err == ""


def test_sandbox_verbose_says_which_way_before_the_command_runs(virtiofsd, monkeypatch, capsys):
    from kvmlet.sandboxing import SandboxResult
    from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

    fake_sandbox(monkeypatch, SandboxResult(0, "", GuestStop(StopReason.RESET)))
    assert cli.main(["sandbox", "--host-profile", "none", "--verbose", "--", "true"]) == 0
    line = "kvmlet: host directories over virtiofs: a virtiofsd can serve them for this user\n"
    assert capsys.readouterr().err == line
