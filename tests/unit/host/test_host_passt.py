"""passt: its command line, the one-line error when it is missing, and the real daemon on this
host behind the virtio-net device (skipped, with what passt printed, where it cannot run)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import struct
import threading

import pytest

from kvmlet.errors import KvmletError
from kvmlet.host import passt as passt_module
from kvmlet.host.passt import is_noise, passt_command, start_passt
from kvmlet.memory import GuestMemory
from kvmlet.virtio.net.device import RECEIVE_QUEUE
from kvmlet.virtio.net.stream import StreamBackend
from tests.helpers.net import MAC, NetRig

GUEST_IP = bytes([169, 254, 7, 2])
ASKED_IP = bytes([169, 254, 7, 1])


def test_the_command_line_runs_passt_in_the_foreground_for_one_client():
    argv = passt_command(
        "/usr/bin/passt",
        "/run/x/passt.socket",
        [("tcp", 8080, 80), ("udp", 5353, 53)],
        mtu=1500,
        run_as=(65534, 65534),
    )
    assert argv == [
        "/usr/bin/passt",
        "--foreground",
        "--stderr",
        "--quiet",
        "--one-off",
        "--socket",
        "/run/x/passt.socket",
        "--mtu",
        "1500",
        "--tcp-ports",
        "8080:80",
        "--udp-ports",
        "5353:53",
        "--runas",
        "65534:65534",
    ]


def test_a_missing_passt_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KvmletError) as raised:
        start_passt()
    assert str(raised.value) == "passt not found: install it with `apt-get install passt`"


def test_syslog_complaints_and_qemu_advice_are_noise():
    assert is_noise("Failed to send 47 bytes to syslog")
    assert is_noise("    kvm ... -device virtio-net-pci,netdev=s -netdev stream,id=s")
    assert is_noise("UNIX domain socket bound at /run/kvmlet-passt-x/passt.socket")
    assert not is_noise("External interface not usable")


@pytest.fixture
def running_passt():
    """passt started for real, or a skip saying why it cannot run here (passt's own words:
    no user namespaces, no default route, ...)."""
    deaths = []
    died = threading.Event()

    def on_exit(helper):
        deaths.append(helper.returncode)
        died.set()

    if shutil.which("passt") is None:
        pytest.skip("passt is not installed (apt-get install passt)")
    try:
        helper, sock = start_passt(mtu=1500, on_exit=on_exit)
    except KvmletError as error:
        if " exited with status " not in str(error) or " status 0 " in str(error):
            raise  # passt unreachable, or quitting quietly, is kvmlet's problem, not the host's
        pytest.skip(f"passt cannot run in this environment: {error}")
    yield helper, sock, deaths, died
    helper.stop()
    sock.close()


def arp_request() -> bytes:
    return (
        b"\xff" * 6
        + MAC
        + b"\x08\x06"
        + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1)
        + MAC
        + GUEST_IP
        + bytes(6)
        + ASKED_IP
    )


def test_passt_answers_the_guest_through_the_device_and_its_death_takes_the_link_down(
    running_passt,
):
    helper, sock, deaths, died = running_passt
    memory = GuestMemory.anonymous([(0, 4 << 20)])
    rig = NetRig(memory, StreamBackend(sock, "passt"), None)
    try:
        rig.start()
        posted = rig.post_receive_buffers(16, 2048)
        rig.transmit(arp_request())
        replies = []
        for _ in range(200):
            select.select([sock], [], [], 0.02)
            rig.pump()
            for completion in rig.driver.collect(RECEIVE_QUEUE):
                frame = memory.read(posted[completion.head], completion.length)[12:]
                if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                    replies.append(frame)
            if replies:
                break
        assert replies, "passt did not answer the ARP request"
        reply = replies[0]
        assert reply[:6] == MAC  # to us
        assert reply[28:32] == ASKED_IP and reply[32:38] == MAC and reply[38:42] == GUEST_IP

        os.kill(helper.pid, signal.SIGKILL)
        assert died.wait(10) and deaths == [-signal.SIGKILL]
        for _ in range(100):
            select.select([sock], [], [], 0.02)
            rig.pump()
            if not rig.device.link_up:
                break
        assert not rig.device.link_up
        assert rig.link_reports == [(False, "virtio-net: passt closed the connection: link down")]
    finally:
        rig.close()
        memory.close()


def test_passt_that_cannot_start_is_one_line(monkeypatch, tmp_path):
    """A passt that refuses to run (here: a script standing in for it) is reported with its
    own words, and leaves nothing behind."""
    fake = tmp_path / "passt"
    fake.write_text(
        "#!/bin/sh\necho 'Failed to send 40 bytes to syslog' >&2\n"
        "echo 'External interface not usable' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(passt_module, "make_runtime_directory", _directory_in(tmp_path))
    with pytest.raises(KvmletError) as raised:
        start_passt(program=str(fake))
    assert str(raised.value).startswith("passt exited with status 1 before it listened on ")
    assert str(raised.value).endswith(": External interface not usable")
    assert not (tmp_path / "runtime").exists()


def _directory_in(directory):
    def make(name, owner=None, base=None):
        path = directory / "runtime"
        path.mkdir()
        return str(path)

    return make


@pytest.mark.skipif(os.geteuid() != 0, reason="passt drops to nobody only when run as root")
def test_passt_gets_a_socket_path_it_binds_as_given(tmp_path):
    """passt cuts long socket paths short, and as nobody it cannot reach a private directory:
    either way its directory goes to /tmp instead."""
    reachable = tmp_path / "open"
    reachable.mkdir(mode=0o755)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    nobody = passt_module.NOBODY
    if any(not os.stat(p).st_mode & 0o001 for p in (tmp_path, *tmp_path.parents)):
        pytest.skip("the test's own directory is private")
    assert passt_module._passt_can_bind(str(reachable / "d" / "passt.socket"), nobody)
    assert not passt_module._passt_can_bind(str(private / "d" / "passt.socket"), nobody)
    assert passt_module._passt_can_bind(str(private / "d" / "passt.socket"), None)
    deep = reachable / ("x" * 90) / "passt.socket"
    assert not passt_module._passt_can_bind(str(deep), None)
