"""passt: user-mode networking for a guest without root (Debian package `passt`).

passt takes a guest's Ethernet frames on a UNIX socket (QEMU's stream protocol: a 32-bit
big-endian length before each frame) and turns them into ordinary sockets on the host, so the
guest gets DHCP, DNS, NAT to the host's network and port forwards (`-t HOSTPORT:GUESTPORT`)
with no privilege at all. `start_passt` runs it in the foreground on a socket in a private
directory, with `--one-off` so it also quits by itself when kvmlet's connection closes (kvmlet
killed included), and returns the supervised process with the connected socket, which
`kvmlet.virtio.net.stream.StreamBackend` speaks.

What passt needs, checked on Debian's 0.0~git20230309: user namespaces (it isolates itself in
one) and a default route on the host (it copies the host's address, gateway and DNS for the
guest); without them it exits with a message, which becomes the error's one line. Run as root,
it drops to `nobody` before it binds its socket, and it does not say when the bind fails, so
the runtime directory is handed to that user first, and made in /tmp when that user could not
reach it where it would go (root's $XDG_RUNTIME_DIR, /run/user/0, is private). passt also cuts
a socket path longer than 98 bytes short without a word and binds there: a runtime directory
too deep for that is made in /tmp too.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
from collections.abc import Callable, Sequence

from kvmlet.host.processes import HelperProcess, find_program, make_runtime_directory

PASST_PACKAGE = "passt"
START_TIMEOUT = 10.0
SOCKET_NAME = "passt.socket"
NOBODY = (65534, 65534)
SOCKET_PATH_LIMIT = 98
"""The longest socket path passt binds as given (bytes)."""

PortForward = tuple[str, int, int]
"""A forward as (protocol "tcp" or "udp", host port, guest port)."""


def passt_command(
    program: str,
    socket_path: str,
    forwards: Sequence[PortForward] = (),
    mtu: int | None = None,
    run_as: tuple[int, int] | None = None,
) -> list[str]:
    """The command line for one guest's passt."""
    argv = [program, "--foreground", "--stderr", "--quiet", "--one-off", "--socket", socket_path]
    if mtu is not None:
        argv += ["--mtu", str(mtu)]
    for protocol, host_port, guest_port in forwards:
        option = "--tcp-ports" if protocol == "tcp" else "--udp-ports"
        argv += [option, f"{host_port}:{guest_port}"]
    if run_as is not None:
        argv += ["--runas", f"{run_as[0]}:{run_as[1]}"]
    return argv


_NOISE = ("Failed to send", "You can now start", "or qrap", "    kvm ", "    ./qrap")
_NOISE += ("UNIX domain socket bound at",)


def is_noise(line: str) -> bool:
    """passt's complaints about a missing syslog, and its news of its socket and advice on
    starting QEMU (the last words of a passt killed later would otherwise be those)."""
    return line.startswith(_NOISE)


def unprivileged_user() -> tuple[int, int]:
    """The user passt drops to when started as root (`nobody`)."""
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return NOBODY
    return entry.pw_uid, entry.pw_gid


def start_passt(
    forwards: Sequence[PortForward] = (),
    mtu: int | None = None,
    on_exit: Callable[[HelperProcess], None] | None = None,
    timeout: float = START_TIMEOUT,
    program: str | None = None,
) -> tuple[HelperProcess, socket.socket]:
    """Start passt for one NIC; returns the process and the socket connected to it."""
    program = program or find_program("passt", PASST_PACKAGE)
    run_as = unprivileged_user() if os.geteuid() == 0 else None
    directory = make_runtime_directory("passt", owner=run_as)
    socket_path = os.path.join(directory, SOCKET_NAME)
    if not _passt_can_bind(socket_path, run_as):
        os.rmdir(directory)
        directory = make_runtime_directory("passt", owner=run_as, base="/tmp")
        socket_path = os.path.join(directory, SOCKET_NAME)
    argv = passt_command(program, socket_path, forwards, mtu, run_as)
    helper = HelperProcess.start("passt", argv, directory, on_exit, is_noise)
    try:
        return helper, helper.connect(socket_path, timeout)
    except BaseException:
        helper.stop()
        raise


def _passt_can_bind(socket_path: str, run_as: tuple[int, int] | None) -> bool:
    """Whether passt binds `socket_path` as given: short enough, and (when it drops to another
    user) in directories every user may pass through."""
    if len(os.fsencode(socket_path)) > SOCKET_PATH_LIMIT:
        return False
    if run_as is None:
        return True
    parent = os.path.dirname(os.path.dirname(socket_path))  # above passt's own directory
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)
