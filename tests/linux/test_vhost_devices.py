"""virtiofs, vhost-user-blk and vsock from `kvmlet run`, as the default guest's user space sees
them, in two boots (the test box is slow: every check that can share a guest does).

First boot, `python3 -m kvmlet run` in a process of its own: two virtiofs shares
(read-write, read-only) and two disks exported by qemu-storage-daemon (one read-only); the
guest runs a script from the read-write share: it reads a host file (checksum), writes one the
host reads, creates, renames and removes files and directories, sees the read-only share refuse
a write, checksums the read-only disk and sees its write fail. Then the host kills the read-only
share's virtiofsd: kvmlet says so in one line and the guest goes on (the read-write share still
works); the guest writes and fsyncs the other disk, and the host SIGKILLs the monitor: the
flushed write is in the image.

Second boot, through the Python API: a vsock; a small static C program added to the initrd
(busybox has no vsock client) sends 1 MiB to a host echo at CID 2 and checks what comes back,
then echoes 1 MiB the host sends through `Machine.vsock_connect`; a CID where no guest is
does not reach this one.

In both, the monitor's counters (the first through the control API) show its Python handled
none of these devices' requests (the backends did) and their calls reached the guest.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kvmlet.api.client import connect
from kvmlet.errors import KvmletError
from kvmlet.guest import run_parameter
from kvmlet.guest.cpio import CpioWriter
from kvmlet.host.virtiofsd import VIRTIOFSD_PATHS
from kvmlet.machine.machine import Machine
from kvmlet.vhost.vsock import connect_to_guest
from tests.helpers.guests import BOOT_TIMEOUT, IN_TEST_BOX

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(
        not IN_TEST_BOX and not os.path.exists("/dev/vhost-vsock"),
        reason="no /dev/vhost-vsock here (modprobe vhost_vsock); the test box has it",
    ),
    pytest.mark.skipif(
        not any(os.access(path, os.X_OK) for path in VIRTIOFSD_PATHS)
        or shutil.which("qemu-storage-daemon") is None
        or shutil.which("socat") is None,
        reason="needs virtiofsd, qemu-storage-daemon (qemu-system-x86) and socat",
    ),
]

MiB = 1 << 20
HOST_ECHO_PORT, GUEST_ECHO_PORT = 5001, 5000
STEP_TIMEOUT = 3 * BOOT_TIMEOUT
"""Seconds for one step of the guest's script (under the box's emulation, socat's start
through virtiofs takes a while)."""

GUEST_SCRIPT = """
rw=/mnt/rw
mkdir -p /mnt/ro && mount -t virtiofs ro /mnt/ro || echo FAILED mount
echo "host-file $(md5sum < $rw/host.bin)"
printf guest-wrote > $rw/from-guest
mkdir $rw/d1 && echo x > $rw/d1/f && mv $rw/d1 $rw/d2 && mv $rw/d2/f $rw/d2/g || echo FAILED tree
mkdir $rw/gone && touch $rw/gone/f && rm $rw/gone/f && rmdir $rw/gone || echo FAILED remove
echo "ro-file $(cat /mnt/ro/kept)"
if (echo x > /mnt/ro/new) 2>/dev/null; then echo ro-write-accepted; else echo ro-write-refused; fi
echo "vdb $(md5sum < /dev/vdb)"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null
then echo vdb-write-accepted; else echo vdb-write-refused; fi
echo checks-done
while [ ! -e $rw/go ]; do sleep 1; done
printf after-kill > $rw/after-kill && echo rw-after-kill-ok
printf flushed-data | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync 2>/dev/null
echo FLUSH-DONE
sleep 600
"""
VSOCK_ECHO_C = r"""
/* vsockecho send PORT IN OUT: to the host (CID 2), send IN, half-close, write what comes back
 * to OUT. vsockecho serve PORT: echo one connection until it half-closes. */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static char buffer[65536];

static int pump(int from, int to) {
    ssize_t got;
    while ((got = read(from, buffer, sizeof buffer)) > 0)
        for (ssize_t done = 0; done < got;) {
            ssize_t put = write(to, buffer + done, got - done);
            if (put <= 0) return 1;
            done += put;
        }
    return got < 0;
}

int main(int argc, char **argv) {
    struct sockaddr_vm address = {.svm_family = AF_VSOCK, .svm_port = atoi(argv[2])};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (argc == 5 && !strcmp(argv[1], "send")) {
        address.svm_cid = 2;
        if (connect(fd, (struct sockaddr *)&address, sizeof address)) return 2;
        int in = open(argv[3], O_RDONLY), out = open(argv[4], O_WRONLY | O_CREAT, 0644);
        pid_t reader = fork(); /* read back while sending: the echo cannot buffer it all */
        if (reader == 0) _exit(pump(fd, out));
        int status;
        if (pump(in, fd) || shutdown(fd, SHUT_WR) || waitpid(reader, &status, 0) != reader)
            return 3;
        return status != 0;
    }
    address.svm_cid = VMADDR_CID_ANY;
    if (bind(fd, (struct sockaddr *)&address, sizeof address) || listen(fd, 1)) return 4;
    int connection = accept(fd, NULL, NULL);
    if (connection < 0 || pump(connection, connection)) return 5;
    return 0;
}
"""
VSOCK_COMMAND = (
    f"head -c {MiB} /dev/urandom > /tmp/out && "
    f"vsockecho send {HOST_ECHO_PORT} /tmp/out /tmp/back && cmp /tmp/out /tmp/back && "
    "{ grep -q virtqueues /proc/interrupts && echo vsock-one-vector; true; } && "
    f"echo guest-echo-ok && echo guest-echo-listening && vsockecho serve {GUEST_ECHO_PORT} && "
    "echo vsock-done"
)


class Output:
    """What a process prints on one stream, collected on a thread (and shown as it comes with
    pytest -s); `wait_for` a fragment."""

    def __init__(self, stream):
        self.text = ""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            with self._changed:
                self.text += chunk.decode(errors="replace").replace("\r", "")
                self._changed.notify_all()

    def wait_for(self, fragment: str, timeout: float = STEP_TIMEOUT) -> None:
        with self._changed:
            found = self._changed.wait_for(lambda: fragment in self.text, timeout)
        assert found, f"no {fragment!r} within {timeout:g} s: {self.text[-3000:]}"


class EchoServer:
    """An AF_VSOCK echo server on the host for one connection; counts what it echoed."""

    def __init__(self, port: int):
        self.listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.listener.bind((socket.VMADDR_CID_ANY, port))
        self.listener.listen(1)
        self.listener.settimeout(STEP_TIMEOUT)
        self.echoed = 0
        self.peer_cid: int | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, (self.peer_cid, _) = self.listener.accept()
        with connection:
            for chunk in iter(lambda: connection.recv(65536), b""):
                connection.sendall(chunk)
                self.echoed += len(chunk)

    def close(self) -> None:
        self.listener.close()
        self._thread.join(1)


def free_cid(first: int = 3) -> int:
    from tests.linux.test_kernel_vhost_in_guest import free_cid as probe

    return probe(first)


def storage_daemon(tmp_path: Path, images: dict[str, tuple[Path, bool]]) -> subprocess.Popen:
    """qemu-storage-daemon exporting each image (name: (path, writable)) as vhost-user-blk at
    tmp_path/NAME.sock, once its sockets are there."""
    argv = ["qemu-storage-daemon"]
    for name, (image, writable) in images.items():
        argv += ["--blockdev", f"driver=file,node-name={name},filename={image}"]
        argv += [
            "--export",
            f"type=vhost-user-blk,id={name}-export,node-name={name},"
            f"writable={'on' if writable else 'off'},addr.type=unix,"
            f"addr.path={tmp_path / f'{name}.sock'}",
        ]
    daemon = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not all((tmp_path / f"{name}.sock").exists() for name in images):
        assert daemon.poll() is None, daemon.stderr.read().decode()
        assert time.monotonic() < deadline, "qemu-storage-daemon did not listen"
        time.sleep(0.05)
    return daemon


def daemon_serving(monitor_pid: int, source: Path) -> int:
    """The pid of the virtiofsd the monitor started for directory `source` (found by parent
    and command line: the box's kernel has no /proc/PID/task/TID/children)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if parent == monitor_pid and f"source={source}".encode() in argv:
            return int(entry)
    raise AssertionError(f"no virtiofsd for {source} among the monitor's children")


def start_monitor(tmp_path: Path, *options: str, command: str) -> subprocess.Popen:
    """`kvmlet run` with `options`, running `command` in the guest, its API at api.sock."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "kvmlet", "run", "--api-socket", str(tmp_path / "api.sock")),
            *options,
            *("-p", run_parameter(command), "--timeout", "1200"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(monitor: subprocess.Popen) -> None:
    if monitor.poll() is None:
        monitor.kill()
        monitor.wait(BOOT_TIMEOUT)


def delivered(call: dict) -> bool:
    """A backend's call reached the guest: bound to its MSI-X vector in KVM, or relayed."""
    return call["path"] == "irqfd" or call["relayed"] > 0


def assert_served_outside_python(api: Path, devices: int) -> None:
    """The control API's counters: no request of a vhost device went through the monitor's
    Python, no doorbell exited to it, and every call reached the guest."""
    with connect(str(api)) as client:
        virtio = client.stats().raw["virtio"]
    vhost = {name: stats for name, stats in virtio.items() if name.startswith("vhost-")}
    assert len(vhost) == devices, sorted(virtio)
    for name, stats in vhost.items():
        assert all(queue["requests"] == 0 for queue in stats["queues"]), name
        assert stats["notify_exits"] == 0, name
        assert all(delivered(call) for call in stats["calls"]), (name, stats["calls"])


def test_virtiofs_and_vhost_user_blk_from_kvmlet_run(tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    host_file = os.urandom(256 * 1024)
    (rw / "host.bin").write_bytes(host_file)
    (rw / "script.sh").write_text(GUEST_SCRIPT)
    (ro / "kept").write_text("read-only-data")
    disk, data = tmp_path / "disk.img", tmp_path / "data.img"
    disk.write_bytes(bytes(4 * MiB))
    data_bytes = os.urandom(MiB)
    data.write_bytes(data_bytes)
    storage = storage_daemon(tmp_path, {"disk": (disk, True), "data": (data, False)})
    monitor = start_monitor(
        tmp_path,
        *("--fs", f"{rw},tag=rw", "--fs", f"{ro},tag=ro,ro"),
        *("-d", f"vhost-user={tmp_path / 'disk.sock'}"),
        *("-d", f"vhost-user={tmp_path / 'data.sock'},ro"),
        command="mkdir -p /mnt/rw && mount -t virtiofs rw /mnt/rw && sh /mnt/rw/script.sh",
    )
    console, errors = Output(monitor.stdout), Output(monitor.stderr)
    try:
        console.wait_for("checks-done")
        assert "FAILED" not in console.text, console.text
        assert f"host-file {hashlib.md5(host_file).hexdigest()}" in console.text
        assert "ro-file read-only-data" in console.text and "ro-write-refused" in console.text
        assert f"vdb {hashlib.md5(data_bytes).hexdigest()}" in console.text
        assert "vdb-write-refused" in console.text
        assert (rw / "from-guest").read_text() == "guest-wrote"
        assert (rw / "d2" / "g").read_text() == "x\n"
        assert not (rw / "d1").exists() and not (rw / "gone").exists()
        assert not (ro / "new").exists()
        assert_served_outside_python(tmp_path / "api.sock", devices=4)

        os.killpg(daemon_serving(monitor.pid, ro), signal.SIGKILL)
        errors.wait_for("the guest keeps running")
        (rw / "go").touch()
        console.wait_for("FLUSH-DONE")
        assert "rw-after-kill-ok" in console.text
        assert (rw / "after-kill").read_text() == "after-kill"
        # The flush was acknowledged: the write is qemu-storage-daemon's, whatever the monitor.
        monitor.send_signal(signal.SIGKILL)
        monitor.wait(BOOT_TIMEOUT)
        assert disk.read_bytes()[8 * 512 : 8 * 512 + 12] == b"flushed-data"
        lines = [line for line in errors.text.splitlines() if line.strip()]
        assert len(lines) == 1, errors.text
        assert "virtiofsd for 'ro'" in lines[0] and "needs a reset" in lines[0]
    finally:
        stop(monitor)
        storage.terminate()
        storage.wait(BOOT_TIMEOUT)


def send_all_and_close(stream: socket.socket, data: bytes) -> None:
    stream.sendall(data)
    stream.shutdown(socket.SHUT_WR)


def initrd_with_vsockecho(tmp_path: Path, base: Path) -> Path:
    """The default initrd plus /bin/vsockecho (busybox has no vsock client)."""
    source, program = tmp_path / "vsockecho.c", tmp_path / "vsockecho"
    source.write_text(VSOCK_ECHO_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(program), str(source)], check=True)
    extra = io.BytesIO()
    writer = CpioWriter(extra)
    writer.add_file("/bin/vsockecho", program.read_bytes(), mode=0o755)
    writer.finish()
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(base.read_bytes() + extra.getvalue())
    return initrd


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the guest's vsock echo")
def test_vsock_carries_a_mebibyte_each_way(tmp_path, guest_config):
    cid = free_cid()
    echo = EchoServer(HOST_ECHO_PORT)
    config = replace(
        guest_config,
        initrd=initrd_with_vsockecho(tmp_path, Path(guest_config.initrd)),
        vsock_cid=cid,
        extra_parameters=(run_parameter(VSOCK_COMMAND),),
    )
    try:
        with Machine(config) as machine:

            def running() -> bool:
                return machine.running

            machine.console.wait_for("guest-echo-listening", STEP_TIMEOUT, running)
            assert (echo.echoed, echo.peer_cid) == (MiB, cid)
            # Linux shares one vector among the queues ("virtioN-virtqueues"), as under QEMU.
            assert b"vsock-one-vector" in machine.console.transcript()
            stats = machine.stats()["virtio"]
            with pytest.raises(KvmletError):  # no guest there: nothing reaches this one
                connect_to_guest(cid + 1, GUEST_ECHO_PORT, timeout=1).close()
            sent = os.urandom(MiB)
            with machine.vsock_connect(GUEST_ECHO_PORT, timeout=STEP_TIMEOUT) as stream:
                sender = threading.Thread(target=send_all_and_close, args=(stream, sent))
                sender.start()  # read the echo meanwhile: neither end can buffer 1 MiB
                back = b"".join(iter(lambda: stream.recv(65536), b""))
                sender.join()
            assert back == sent
            machine.console.wait_for("vsock-done", STEP_TIMEOUT, running)
            machine.wait(STEP_TIMEOUT)
    finally:
        echo.close()
    (vsock,) = [device for name, device in stats.items() if name.startswith("vhost-vsock")]
    assert all(queue["requests"] == 0 for queue in vsock["queues"])
    assert vsock["notify_exits"] == 0 and all(delivered(call) for call in vsock["calls"])
