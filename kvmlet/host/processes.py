"""Helper daemons kvmlet starts for a machine (passt, virtiofsd).

`find_program` finds a daemon's binary or says in one line which Debian package to install.
`HelperProcess.start` runs it with stdin closed and its output (stdout and stderr together)
captured, in its own session (a Ctrl-C or a signal meant for kvmlet's process group does not
reach it: kvmlet stops it in order), and gives it a private runtime directory for its socket
(or hands it a socket already listening, `pass_fds`, and says when it answered: `serving`).
`connect` waits for the daemon's UNIX socket and connects to it; a daemon that exits first, or
takes too long, is a `KvmletError` carrying its last line of output.

A monitor thread per daemon collects its output (the last lines are kept for error messages)
and notices its exit through a pidfd: a daemon that dies on its own once it was ready (its
socket appeared) calls `on_exit` once, from that thread (or, without one, is logged); one that
dies before is reported by the error `connect` raises. `stop()` (SIGTERM, then SIGKILL after a grace
period) reaps it and removes its runtime directory; every daemon still running when the
interpreter exits is stopped the same way, so none is left behind by a kvmlet that ends
normally or by an exception.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from kvmlet.errors import KvmletError, LazyLogger

log = LazyLogger(__name__)

OUTPUT_LINES_KEPT = 40
OUTPUT_LINE_LIMIT = 1000
STOP_GRACE_SECONDS = 2.0
_POLL_INTERVAL = 0.01

_running: set[HelperProcess] = set()
_running_lock = threading.Lock()


def find_program(name: str, package: str, candidates: Sequence[str] = ()) -> str:
    """The path of program `name` (on PATH, or one of `candidates`, e.g. /usr/libexec/...)."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise KvmletError(f"{name} not found: install it with `apt-get install {package}`")


def make_runtime_directory(
    name: str, owner: tuple[int, int] | None = None, base: str | None = None
) -> str:
    """A fresh private directory (mode 0700) for one daemon's socket and files, in `base`
    (default: $XDG_RUNTIME_DIR, else the temporary directory); `owner` (uid, gid) hands it to
    the user a daemon drops its privileges to."""
    base = base or os.environ.get("XDG_RUNTIME_DIR")
    if not (base and os.path.isdir(base) and os.access(base, os.W_OK)):
        base = None
    path = tempfile.mkdtemp(prefix=f"kvmlet-{name}-", dir=base)
    if owner is not None:
        os.chown(path, *owner)
    return path


class HelperProcess:
    """One supervised daemon."""

    def __init__(
        self,
        name: str,
        process: subprocess.Popen,
        runtime_directory: str | None,
        on_exit: Callable[[HelperProcess], None] | None,
        is_noise: Callable[[str], bool] | None,
    ):
        self.name = name
        self.process = process
        self.runtime_directory = runtime_directory
        self.on_exit = on_exit
        self._is_noise = is_noise or (lambda line: False)
        self._lines: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._partial = b""
        self._stopping = False
        self._ready = False  # its socket appeared: from now on a death is news
        self._exited = threading.Event()
        self._pidfd_lock = threading.Lock()
        self._pidfd = os.pidfd_open(process.pid)
        self._monitor = threading.Thread(target=self._watch, name=f"{name}-monitor", daemon=True)
        with _running_lock:
            _running.add(self)
        self._monitor.start()

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        runtime_directory: str | None = None,
        on_exit: Callable[[HelperProcess], None] | None = None,
        is_noise: Callable[[str], bool] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> HelperProcess:
        """Run `argv` as daemon `name`; `runtime_directory` is removed when it stops.
        `is_noise(line)` marks output lines not worth showing in an error message;
        `pass_fds` are descriptors the daemon inherits (e.g. a socket it listens on)."""
        try:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_unblock_signals,
                pass_fds=tuple(pass_fds),
            )
        except OSError as error:
            if runtime_directory is not None:
                shutil.rmtree(runtime_directory, ignore_errors=True)
            raise KvmletError(f"cannot start {name} ({argv[0]}): {error.strerror}") from None
        return cls(name, process, runtime_directory, on_exit, is_noise)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited with {self.process.returncode}"
        return f"HelperProcess({self.name!r}, pid {self.process.pid}, {state})"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: the signal that ended it)."""
        return self.process.returncode if self._exited.is_set() else None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the daemon to exit and its death to be handled; its status, or None if it
        still runs after `timeout` seconds."""
        if not self._exited.wait(timeout):
            return None
        if threading.current_thread() is not self._monitor:
            self._monitor.join()
        return self.process.returncode

    def output(self) -> list[str]:
        """The last lines the daemon printed."""
        return list(self._lines)

    def last_words(self) -> str:
        """Its last line of output worth showing, for a one-line error message."""
        for line in reversed(self._lines):
            if line.strip() and not self._is_noise(line):
                return line.strip()
        return "no output"

    def serving(self) -> None:
        """The daemon answered (on a socket it was handed, say): from now on its death is
        news for `on_exit`, as after `wait_for_socket`."""
        self._ready = True

    # Waiting for its socket ---------------------------------------------------------------------

    def wait_for_socket(self, path: str, timeout: float) -> None:
        """Wait until `path` is a UNIX socket; a KvmletError if the daemon exits or times out."""
        deadline = time.monotonic() + timeout
        while not _is_socket(path):
            self._check_alive(path, deadline, timeout)
            self._exited.wait(_POLL_INTERVAL)
        self._ready = True

    def connect(self, path: str, timeout: float) -> socket.socket:
        """Connect to the daemon's UNIX stream socket at `path` once it listens there."""
        deadline = time.monotonic() + timeout
        self.wait_for_socket(path, timeout)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return sock
            except (ConnectionRefusedError, FileNotFoundError):  # bound, not listening yet
                sock.close()
            except OSError as error:
                sock.close()
                raise KvmletError(f"cannot connect to {self.name} at {path}: {error}") from None
            self._check_alive(path, deadline, timeout)
            self._exited.wait(_POLL_INTERVAL)

    def _check_alive(self, path: str, deadline: float, timeout: float) -> None:
        if self._exited.is_set():
            self._monitor.join(1.0)  # its last output is in once the monitor is done
            raise KvmletError(
                f"{self.name} exited with status {self.process.returncode} before it listened "
                f"on {path}: {self.last_words()}"
            )
        if time.monotonic() > deadline:
            raise KvmletError(
                f"{self.name} did not listen on {path} within {timeout:g} s: {self.last_words()}"
            )

    # Supervision --------------------------------------------------------------------------------

    def _watch(self) -> None:
        """The monitor thread: collect output until the daemon exits, then report its death."""
        output = self.process.stdout
        assert output is not None
        os.set_blocking(output.fileno(), False)
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        poller.register(output.fileno(), select.POLLIN)
        output_open = True
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if output.fileno() in ready and output_open:
                output_open = self._read_output(output.fileno())
                if not output_open:
                    poller.unregister(output.fileno())
            if self._pidfd in ready:
                break
        while output_open and self._read_output(output.fileno(), until_empty=True):
            pass
        self.process.wait()
        output.close()
        with self._pidfd_lock:
            os.close(self._pidfd)
            self._pidfd = -1
        self._exited.set()
        with _running_lock:
            _running.discard(self)
        if not self._ready or self._stopping:
            return
        if self.on_exit is None:
            log.warning(
                "%s (pid %d) exited with status %s: %s",
                self.name,
                self.pid,
                self.process.returncode,
                self.last_words(),
            )
            return
        try:
            self.on_exit(self)
        except Exception:
            log.exception("%s: exit callback failed", self.name)

    def _read_output(self, fd: int, until_empty: bool = False) -> bool:
        """Read what the daemon printed; False at end of output (or, `until_empty`, when
        nothing more is there now)."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return not until_empty
        if not data:
            if self._partial:
                self._add_line(self._partial)
                self._partial = b""
            return False
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._add_line(line)
        if len(self._partial) > OUTPUT_LINE_LIMIT:
            self._add_line(self._partial)
            self._partial = b""
        return True

    def _add_line(self, line: bytes) -> None:
        self._lines.append(line[:OUTPUT_LINE_LIMIT].decode(errors="replace").rstrip("\r"))

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop the daemon (SIGTERM, SIGKILL after `grace` seconds), reap it and remove its
        runtime directory. Calling it again, or after the daemon died, is harmless."""
        self._stopping = True
        if self.running:
            self._signal(signal.SIGTERM)
            if not self._exited.wait(grace):
                log.warning("%s (pid %d) ignored SIGTERM: killing it", self.name, self.pid)
                self._signal(signal.SIGKILL)
                self._exited.wait()
        if threading.current_thread() is not self._monitor:
            self._monitor.join()
        if self.runtime_directory is not None:
            shutil.rmtree(self.runtime_directory, ignore_errors=True)
            self.runtime_directory = None

    def _signal(self, number: int) -> None:
        # The pidfd names exactly this process, even if its pid were reused after it exited.
        with self._pidfd_lock:
            if self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, number)


def _unblock_signals() -> None:
    """In the child, before exec: a daemon starts with no signal blocked. The signal mask is
    inherited across exec, and `kvmlet run` blocks SIGTERM while it builds the machine, which
    is when daemons start: passt would then ignore the SIGTERM that stops it."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


@atexit.register
def _stop_every_helper() -> None:
    """No daemon outlives the kvmlet that started it (unless kvmlet itself is killed)."""
    with _running_lock:
        helpers = list(_running)
    for helper in helpers:
        helper.stop()
