"""virtiofsd: the vhost-user daemon that serves a host directory to a guest's virtio-fs device
(Debian: QEMU 7.2's `/usr/lib/qemu/virtiofsd`, package qemu-system-common; or one named with
`--virtiofsd PATH` that takes the same options).

How kvmlet runs it, as checked on Debian's 7.2, as root and as a normal user:

- **Its socket.** kvmlet makes a listening socket in a private runtime directory, connects to
  it, and hands the daemon the listening socket (`--fd`): the daemon accepts kvmlet's queued
  connection, serves it alone and exits when it closes. With `--socket-path` the daemon would
  first take a lock file in /run/virtiofsd, which only root may create.
- **Its sandbox.** The default, `-o sandbox=namespace` (new mount, PID and network namespaces,
  `pivot_root` into the shared directory), needs CAP_SYS_ADMIN, and `chroot` needs
  CAP_SYS_CHROOT: a normal user's daemon fails with EPERM either way. kvmlet runs it in a user
  namespace of its own (`unshare --user --map-root-user`), where the user is root: the
  sandbox works, and files the guest creates belong to the user, whose root the guest's root
  is (other guest users have no mapping there). The namespace sandbox cannot `pivot_root` into
  the host's `/` itself (EBUSY), so a share of `/` gets `chroot`, which confines nothing there.
- **Read-only shares.** This virtiofsd has no read-only option. A `ro` share is a read-only bind
  mount of the directory over itself, made in a mount namespace of the daemon's own (`unshare
  --mount`, then `mount --rbind` and `mount -o remount,bind,ro`), so the host refuses every
  change with EROFS, whatever the guest sends. The bind is recursive because in a user
  namespace the mounts below a directory are locked to it: a plain bind of `/` fails there
  (EINVAL). The remount makes the directory's own mount read-only, not mounts below it (a
  separate /home under a shared `/`): the guest mounts such a share read-only itself.
- **Options** kept at their defaults: `cache=auto` (the guest caches for a second, as QEMU's
  users get it), no extended attributes (`no_xattr`; Linux 6.1's tmpfs keeps no user.*
  attributes), no writeback cache, no DAX (the device offers no shared memory window).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence

from kvmlet.errors import KvmletError
from kvmlet.host.processes import HelperProcess, find_program, make_runtime_directory

VIRTIOFSD_PACKAGE = "qemu-system-common"
VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")
SOCKET_NAME = "virtiofsd.sock"
READ_ONLY_SCRIPT = 'mount --rbind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
"""Run by `sh -c` in the daemon's own mount namespace: DIR, then the daemon's argv."""
_NOISE = ("virtio_session_mount: ", "virtio_loop: ")


def is_noise(line: str) -> bool:
    """virtiofsd's progress lines (waiting for and getting the connection, its loop)."""
    return line.startswith(_NOISE)


def find_virtiofsd(program: str | None = None) -> str:
    """The daemon to run: `program` if given (it must be an executable), else Debian's."""
    if program is None:
        return find_program("virtiofsd", VIRTIOFSD_PACKAGE, VIRTIOFSD_PATHS)
    found = shutil.which(program)
    if found is None:
        raise KvmletError(f"--virtiofsd {program}: no such executable")
    return found


NAMESPACES_PROBE = ("--mount", "--pid", "--net", "--fork", "--", "true")
"""The namespaces virtiofsd's own sandbox makes (`-o sandbox=namespace`), tried with `unshare`."""
PROBE_TIMEOUT = 10.0


def virtiofsd_problem(
    program: str | None = None, euid: int | None = None, read_only: Sequence[str] = ()
) -> str | None:
    """Why a virtiofsd cannot serve a directory for this user, or None when it can: the
    daemon (`program`, else Debian's) is installed, the namespaces its sandbox needs can be
    made here (as root directly, else inside a user namespace of the user's own, as
    `start_virtiofsd` runs it: a kernel or a container may forbid either), and each directory
    to be shared `read_only` can be made read-only there as `start_virtiofsd` does it. A
    caller with another way to share a directory (9p) picks it when not."""
    try:
        find_virtiofsd(program)
        unshare = find_program("unshare", "util-linux")
    except KvmletError as error:
        return str(error)
    euid = os.geteuid() if euid is None else euid
    user = ("--user", "--map-root-user") if euid != 0 else ()
    problem = _namespaces_problem((unshare, *user, *NAMESPACES_PROBE))
    for directory in read_only:
        if problem is not None:
            break
        wrapper = ("--mount", "--", "/bin/sh", "-c", READ_ONLY_SCRIPT, "virtiofsd-ro")
        problem = _namespaces_problem((unshare, *user, *wrapper, directory, "true"))
    return problem


@functools.lru_cache(maxsize=4)
def _namespaces_problem(argv: tuple[str, ...]) -> str | None:
    """Run `argv` (an unshare that makes the namespaces); what failed, or None (asked once per
    process: the answer does not change while kvmlet runs)."""
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot make virtiofsd's namespaces: {error}"
    if result.returncode == 0:
        return None
    said = result.stderr.strip().splitlines()
    why = said[0] if said else f"exit status {result.returncode}"
    return f"virtiofsd's sandbox needs namespaces or mounts this user cannot make here ({why})"


def virtiofsd_command(
    program: str,
    source: str,
    listen_fd: int,
    *,
    read_only: bool = False,
    unprivileged: bool = False,
    unshare: str = "unshare",
    shell: str = "/bin/sh",
) -> list[str]:
    """The command line serving directory `source` on the listening socket `listen_fd`:
    the daemon itself, behind `unshare` when it needs a user or a mount namespace."""
    sandbox = "chroot" if os.path.realpath(source) == "/" else "namespace"
    daemon = [program, f"--fd={listen_fd}", "-o", f"source={source}", "-o", f"sandbox={sandbox}"]
    if not (read_only or unprivileged):
        return daemon
    wrapper = [unshare, *(("--user", "--map-root-user") if unprivileged else ()), "--mount", "--"]
    if read_only:
        wrapper += [shell, "-c", READ_ONLY_SCRIPT, "virtiofsd-ro", source]
    return wrapper + daemon


def start_virtiofsd(
    source: str,
    *,
    read_only: bool = False,
    program: str | None = None,
    name: str = "virtiofsd",
    on_exit: Callable[[HelperProcess], None] | None = None,
) -> tuple[HelperProcess, socket.socket]:
    """Start a daemon sharing `source`; returns it and kvmlet's connection to it, which the
    daemon takes up as soon as it runs (the caller's first vhost-user exchange waits for it;
    call `serving()` on the process once it answered)."""
    program = find_virtiofsd(program)
    unprivileged = os.geteuid() != 0
    unshare = find_program("unshare", "util-linux") if read_only or unprivileged else "unshare"
    source = os.path.abspath(source)
    directory = make_runtime_directory("virtiofsd")
    path = os.path.join(directory, SOCKET_NAME)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            listener.bind(path)
            listener.listen(1)
            # Queued before the daemon exists: it accepts this connection first, and no one
            # else can reach the private directory to connect before it.
            client.connect(path)
        except OSError as error:
            shutil.rmtree(directory, ignore_errors=True)
            raise KvmletError(f"cannot make a socket for {name}: {error.strerror}") from None
        argv = virtiofsd_command(
            program,
            source,
            listener.fileno(),
            read_only=read_only,
            unprivileged=unprivileged,
            unshare=unshare,
        )
        helper = HelperProcess.start(
            name, argv, directory, on_exit, is_noise, pass_fds=[listener.fileno()]
        )
    except BaseException:
        client.close()
        raise
    finally:
        listener.close()  # the daemon's copy accepts; once the daemon is gone, connects fail
    return helper, client
