"""How kvmlet runs virtiofsd: its command line (as root, as a user, read-only), its socket
handed over already connected, and a daemon that fails at once."""

from __future__ import annotations

import os
import stat

import pytest

from kvmlet.errors import KvmletError
from kvmlet.host.virtiofsd import (
    READ_ONLY_SCRIPT,
    VIRTIOFSD_PATHS,
    find_virtiofsd,
    start_virtiofsd,
    virtiofsd_command,
    virtiofsd_problem,
)
from kvmlet.vhost.user import VhostUserFrontend

DEBIAN_VIRTIOFSD = next((path for path in VIRTIOFSD_PATHS if os.access(path, os.X_OK)), None)


def test_root_runs_the_daemon_itself_in_its_own_sandbox():
    assert virtiofsd_command("/v", "/srv", 7) == [
        *("/v", "--fd=7", "-o", "source=/srv", "-o", "sandbox=namespace"),
    ]


def test_a_share_of_the_root_is_chrooted_its_namespace_sandbox_cannot_pivot_there():
    assert virtiofsd_command("/v", "/", 7)[-1] == "sandbox=chroot"
    assert virtiofsd_command("/v", "/usr/..", 7)[-1] == "sandbox=chroot"


def test_a_user_runs_it_as_root_of_a_user_namespace():
    argv = virtiofsd_command("/v", "/srv", 7, unprivileged=True, unshare="/u")
    assert argv[: argv.index("--") + 1] == ["/u", "--user", "--map-root-user", "--mount", "--"]
    assert argv[argv.index("--") + 1 :] == virtiofsd_command("/v", "/srv", 7)


@pytest.mark.parametrize("unprivileged", [False, True])
def test_a_read_only_share_is_a_read_only_bind_mount_in_the_daemons_namespace(unprivileged):
    argv = virtiofsd_command("/v", "/srv", 7, read_only=True, unprivileged=unprivileged)
    wrapper = argv[: argv.index("--") + 1]
    assert "--mount" in wrapper and ("--map-root-user" in wrapper) == unprivileged
    rest = argv[argv.index("--") + 1 :]
    assert rest[:5] == ["/bin/sh", "-c", READ_ONLY_SCRIPT, "virtiofsd-ro", "/srv"]
    assert rest[5:] == virtiofsd_command("/v", "/srv", 7)
    assert "mount -o remount,bind,ro" in READ_ONLY_SCRIPT and 'exec "$@"' in READ_ONLY_SCRIPT


def test_a_daemon_that_is_not_there_is_one_line(monkeypatch, tmp_path):
    with pytest.raises(KvmletError, match="--virtiofsd /nonexistent/virtiofsd: no such"):
        find_virtiofsd("/nonexistent/virtiofsd")
    assert "no such executable" in virtiofsd_problem("/nonexistent/virtiofsd")
    monkeypatch.setattr("kvmlet.host.virtiofsd.VIRTIOFSD_PATHS", (str(tmp_path / "none"),))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KvmletError, match="apt-get install qemu-system-common"):
        find_virtiofsd()


def fake_unshare(directory, status: int, said: str = ""):
    """An `unshare` first on PATH that logs its arguments and ends with `status`."""
    script = directory / "unshare"
    script.write_text(f'#!/bin/sh\necho "$@" >> {directory}/unshare.log\necho "{said}" >&2\n'
                      f"exit {status}\n")  # fmt: skip
    script.chmod(0o755)
    return directory / "unshare.log"


@pytest.mark.parametrize("euid", [0, 1000])
def test_virtiofsd_is_usable_when_installed_and_its_namespaces_can_be_made(
    monkeypatch, tmp_path, euid
):
    monkeypatch.setenv("PATH", str(tmp_path))
    log = fake_unshare(tmp_path, 0)
    assert virtiofsd_problem("/bin/true", euid=euid) is None
    user = "--user --map-root-user " if euid else ""
    assert log.read_text() == f"{user}--mount --pid --net --fork -- true\n"


def test_each_read_only_directory_is_probed_as_the_daemon_would_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    log = fake_unshare(tmp_path, 0)
    assert virtiofsd_problem("/bin/true", euid=1000, read_only=["/", "/srv"]) is None
    probes = log.read_text().splitlines()
    wrapper = f"--user --map-root-user --mount -- /bin/sh -c {READ_ONLY_SCRIPT} virtiofsd-ro"
    assert probes[1:] == [f"{wrapper} / true", f"{wrapper} /srv true"]
    assert "mount --rbind" in READ_ONLY_SCRIPT, "a plain bind of / fails in a user namespace"


def test_a_read_only_directory_that_cannot_be_made_so_makes_it_unusable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    script = tmp_path / "unshare"
    script.write_text(
        '#!/bin/sh\ncase "$*" in *virtiofsd-ro*) echo "mount: /: bad" >&2; exit 32;; esac\n'
    )
    script.chmod(0o755)
    assert "(mount: /: bad)" in virtiofsd_problem("/bin/true", euid=1000, read_only=["/"])
    assert virtiofsd_problem("/bin/true", euid=1000) is None


def test_virtiofsd_is_unusable_where_its_namespaces_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_unshare(tmp_path, 1, "unshare: unshare failed: Operation not permitted")
    problem = virtiofsd_problem("/bin/true", euid=1000)
    assert "namespaces" in problem and "Operation not permitted" in problem


def test_virtiofsd_without_unshare_is_unusable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "apt-get install util-linux" in virtiofsd_problem("/bin/true", euid=1000)


def test_the_socket_is_connected_before_the_daemon_runs_and_refused_once_it_died(tmp_path):
    script = tmp_path / "fake-virtiofsd"
    script.write_text('#!/bin/sh\necho "fuse: cannot share $3"\nexit 3\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    helper, connection = start_virtiofsd(str(tmp_path), program=str(script))
    try:
        directory = helper.runtime_directory
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert helper.wait(10) == 3
        assert helper.last_words() == f"fuse: cannot share source={tmp_path}"
        with pytest.raises(ConnectionResetError):  # the dead daemon's listener went with it
            connection.recv(1)
    finally:
        connection.close()
        helper.stop()
    assert not os.path.exists(directory)


@pytest.mark.skipif(DEBIAN_VIRTIOFSD is None, reason="needs qemu-system-common's virtiofsd")
@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("root", [False, True])
def test_debians_virtiofsd_answers_on_the_socket_it_was_handed(tmp_path, read_only, root):
    helper, connection = start_virtiofsd("/" if root else str(tmp_path), read_only=read_only)
    try:
        frontend = VhostUserFrontend(connection, name="virtiofsd", timeout=20)
        assert frontend.guest_features() >> 32 & 1, "VIRTIO_F_VERSION_1"
        assert frontend.max_vrings == 2, "the high-priority queue and one request queue"
        frontend.close()
        assert helper.wait(10) == 0, "it ends with its one connection"
    finally:
        helper.stop()
