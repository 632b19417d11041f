"""Machine names and where their control sockets live.

Every running machine has a name, unique among its user's running machines, and a control
socket. The socket is `$XDG_RUNTIME_DIR/kvmlet/NAME.sock`, or `~/.kvmlet/NAME.sock` without
XDG_RUNTIME_DIR; that directory is made 0700 and the socket 0600.

A name is claimed with an exclusive `flock` on `NAME.lock` beside the socket, held for the
machine's life: the kernel drops it when the monitor ends, however it ends (even SIGKILL), so a
name whose lock can be taken is free, and a socket a killed monitor left behind is stale and
replaced. With `--api-socket PATH` the socket is made at PATH and `NAME.sock` in the runtime
directory is a symbolic link to it, so `kvmlet list` and `kvmlet.connect(NAME)` find every
machine the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import stat

from kvmlet.errors import KvmletError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A name is a file name: letters, digits, '_', '.', '-', at most 64, not starting with a dot."""
SOCKET_SUFFIX = ".sock"
LOCK_SUFFIX = ".lock"
LISTEN_BACKLOG = 64
MAX_SOCKET_PATH = 107
"""sun_path holds 108 bytes with its terminating NUL."""


def runtime_directory() -> str:
    """Where control sockets live: $XDG_RUNTIME_DIR/kvmlet, else ~/.kvmlet (not created)."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base):
        return os.path.join(base, "kvmlet")
    return os.path.join(os.path.expanduser("~"), ".kvmlet")


def _private_directory() -> str:
    """The runtime directory, created 0700 and checked to be ours and private."""
    directory = runtime_directory()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError as error:
        raise KvmletError(
            f"cannot create {directory} for the control socket: {error.strerror.lower()} "
            "(set XDG_RUNTIME_DIR to a writable directory)"
        ) from None
    if info.st_uid != os.getuid():
        raise KvmletError(f"{directory} belongs to another user: kvmlet will not use it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    return directory


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise KvmletError(
            f"bad machine name {name!r}: use up to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def socket_path(name_or_path: str) -> str:
    """The control socket of a machine given by name, or a socket path (anything with a '/')."""
    if "/" in name_or_path:
        return name_or_path
    return os.path.join(runtime_directory(), check_name(name_or_path) + SOCKET_SUFFIX)


def is_running(name: str) -> bool:
    """Whether a live monitor holds the name (its lock cannot be taken)."""
    path = os.path.join(runtime_directory(), name + LOCK_SUFFIX)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def running_names() -> list[str]:
    """The names of the user's running machines, sorted."""
    try:
        entries = os.listdir(runtime_directory())
    except OSError:
        return []
    names = [entry.removesuffix(SOCKET_SUFFIX) for entry in entries if entry.endswith(".sock")]
    return sorted(name for name in names if NAME_PATTERN.fullmatch(name) and is_running(name))


class Endpoint:
    """A claimed name and its listening socket; `close()` gives both up."""

    def __init__(self, name: str, path: str, listener: socket.socket, lock_fd: int, link: str):
        self.name = name
        self.path = path  # where the socket is
        self.listener = listener
        self._lock_fd = lock_fd
        self._lock_path = os.path.join(os.path.dirname(link), name + LOCK_SUFFIX)
        self._link = link if link != path else None  # the runtime directory's entry

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.path!r})"

    def close(self) -> None:
        """Stop listening and remove the socket, its link and the lock (safe twice)."""
        if self._lock_fd < 0:
            return
        self.listener.close()
        for path in (self.path, self._link, self._lock_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        os.close(self._lock_fd)  # last: the name stays ours until the files are gone
        self._lock_fd = -1


def claim(name: str | None = None, path: str | None = None) -> Endpoint:
    """Claim `name` (a fresh one when None) and listen on its control socket (at `path`, or
    in the runtime directory). KvmletError when the name is taken or the socket cannot be
    made."""
    directory = _private_directory()
    if name is None:
        name, lock_fd = _claim_fresh_name(directory)
    else:
        lock_fd = _lock(directory, check_name(name))
        if lock_fd is None:
            raise KvmletError(f"a machine named {name} is already running")
    link = os.path.join(directory, name + SOCKET_SUFFIX)
    target = link if path is None else os.path.abspath(path)
    listener = None
    try:
        listener = _listen(target, replace_stale=path is None)
        if target != link:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            os.symlink(target, link)
        return Endpoint(name, target, listener, lock_fd, link)
    except BaseException:  # nothing of the claim is left behind
        if listener is not None:
            listener.close()
            leftovers = [target, link]
        else:
            leftovers = [link] if path is None else []
        for leftover in [*leftovers, os.path.join(directory, name + LOCK_SUFFIX)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        os.close(lock_fd)
        raise


def _claim_fresh_name(directory: str) -> tuple[str, int]:
    base = f"vm-{os.getpid()}"
    for attempt in range(100):
        name = base if attempt == 0 else f"{base}-{attempt}"
        lock_fd = _lock(directory, name)
        if lock_fd is not None:
            return name, lock_fd
    raise KvmletError("could not find a free machine name: give one with --name")


def _lock(directory: str, name: str) -> int | None:
    """An exclusive lock on NAME.lock, or None when a live monitor holds it. The file may be
    unlinked by its last owner between our open and our flock: then try again."""
    path = os.path.join(directory, name + LOCK_SUFFIX)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise KvmletError(f"cannot lock {path}: {error.strerror.lower()}") from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _listen(path: str, replace_stale: bool) -> socket.socket:
    """A listening UNIX socket at `path`, mode 0600. An old socket there is replaced when
    nothing answers on it (its monitor died); anything else there is an error."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise KvmletError(f"control socket path too long for a UNIX socket: {path}")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode) and not os.path.islink(path):
            raise KvmletError(f"{path} exists and is not a socket")
        if not replace_stale and _answers(path):
            raise KvmletError(f"something is already listening on {path}")
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        listener.bind(path)
        bound = True
        os.chmod(path, 0o600)
        listener.listen(LISTEN_BACKLOG)
    except BaseException as error:
        listener.close()
        if bound:
            os.unlink(path)
        if isinstance(error, OSError):
            raise KvmletError(f"cannot listen on {path}: {error.strerror.lower()}") from None
        raise
    return listener


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
