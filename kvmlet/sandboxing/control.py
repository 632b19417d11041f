"""The sandbox's command protocol: a control directory on the host, shared into the guest.

kvmlet and the guest's agent (the sandbox part of kvmlet/guest/rootfs_init.sh) talk through
files in a private host directory (mode 0700), which the guest mounts over virtio-9p with
`cache=none`, so every write reaches the other side at once (kvmlet's own 9p server, whatever
serves the user's directories):

    request      written by kvmlet, sourced by the agent (root) as shell assignments:
                 token, uid, gid, groups, workdir, stdin (stream or null), mounts (triples
                 of file system type, 9p or virtiofs, tag and guest path, mounted
                 read-write in that order)
    command      written by kvmlet, run by the agent with `sh` as uid:gid: exports the
                 caller's environment, enters the working directory, runs the command line
    stdout       written by the agent: the command's standard output, as it comes
    stderr       the same for its standard error
    stdin.N      written by kvmlet: chunk N of kvmlet's standard input (0, 1, ...), each
                 renamed into place once complete; the agent feeds them to the command
    stdin.end    written by kvmlet when its input ended: how many chunks there were
    started      written by the agent just before the command starts
    signal       written by kvmlet (a signal name, e.g. INT): the agent sends that signal to
                 the command's session
    status       written by the agent when the command has ended: "TOKEN STATUS"

kvmlet relays stdout and stderr while they grow. The status counts only with the run's token,
a random string that exists only in `request`, which the agent reads before the command
starts and then detaches from the guest's tree (the command cannot see the control
directory): nothing the command prints or writes can pass for its status.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import shlex
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from kvmlet.errors import KvmletError

POLL_INTERVAL = 0.02
"""Seconds between two looks at the output files (the latency of streamed output)."""
STDIN_CHUNK = 1 << 16
INPUT_POLL_MS = 100
"""How often the input feeder looks whether the run has ended."""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ENVIRONMENT_KEPT_OUT = frozenset(
    {
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "HOSTNAME",
        "TERMCAP",
        "SSH_AUTH_SOCK",
        "SSH_AGENT_PID",
        "SSH_CONNECTION",
        "SSH_CLIENT",
        "SSH_TTY",
        "GPG_AGENT_INFO",
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XAUTHORITY",
        "DBUS_SESSION_BUS_ADDRESS",
        "XDG_RUNTIME_DIR",
        "XDG_SESSION_ID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
    }
)
"""Variables that name something of this host session (a socket, a display, a process, a
session) that does not exist in the guest, or that the guest's shell sets itself."""


def guest_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """What of `environment` crosses into the guest: names a shell can export, minus
    ENVIRONMENT_KEPT_OUT and exported shell functions."""
    return {
        name: value
        for name, value in environment.items()
        if _NAME.match(name) and name not in ENVIRONMENT_KEPT_OUT and "\0" not in value
    }


def command_script(command: str, environment: Mapping[str, str], workdir: str) -> str:
    """The script the agent runs as the caller: the environment, the working directory, then
    `command` as a `sh -c` line."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(environment.items())]
    lines.append(f"cd -- {shlex.quote(workdir)} || exit 1")
    lines.append(f"exec /bin/sh -c {shlex.quote(command)}")
    return "\n".join(lines) + "\n"


def parse_status(text: str, token: str) -> int | None:
    """The status of a `status` file that carries `token`, else None."""
    found = re.fullmatch(rf"{re.escape(token)} (\d{{1,3}})\n?", text)
    if found is None or int(found.group(1)) > 255:
        return None
    return int(found.group(1))


class ControlDirectory:
    """One run's control directory: writes the request, relays output, feeds input, passes
    signals, reads the status. `close()` removes it."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="kvmlet-sandbox-")
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def write_request(
        self,
        command: str,
        *,
        environment: Mapping[str, str],
        workdir: str,
        uid: int,
        gid: int,
        groups: Sequence[int],
        mounts: Iterable[tuple[str, str, str]],
        stream_stdin: bool,
    ) -> None:
        triples = " ".join(f"{kind} {tag} {path}" for kind, tag, path in mounts)
        request = {
            "token": self.token,
            "uid": str(uid),
            "gid": str(gid),
            "groups": ",".join(str(group) for group in (groups or [gid])),
            "workdir": workdir,
            "stdin": "stream" if stream_stdin else "null",
            "mounts": triples,
        }
        text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in request.items())
        self._write("request", text.encode())
        self._write("command", command_script(command, environment, workdir).encode())
        for name in ("stdout", "stderr"):
            self._write(name, b"")

    def _write(self, name: str, data: bytes) -> None:
        """Put file `name` in place whole (the guest never sees it half written)."""
        staging = os.path.join(self.path, f".{name}.partial")
        with open(staging, "wb") as file:
            file.write(data)
        os.rename(staging, os.path.join(self.path, name))

    def relay_output(self, sinks: Mapping[str, Callable[[bytes], None]]) -> None:
        """Pass what the guest appends to stdout and stderr to `sinks[name]`, as it comes,
        until `finish()`."""
        thread = threading.Thread(
            target=self._relay, args=(sinks,), name="sandbox-output", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _relay(self, sinks: Mapping[str, Callable[[bytes], None]]) -> None:
        offsets = dict.fromkeys(sinks, 0)
        while True:
            stopping = self._stop.is_set()  # one more full pass after the guest stopped
            for name, sink in sinks.items():
                offsets[name] += self._pass_on(name, offsets[name], sink)
            if stopping:
                return
            self._stop.wait(POLL_INTERVAL)

    def _pass_on(self, name: str, offset: int, sink: Callable[[bytes], None]) -> int:
        try:
            file = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        passed = 0
        try:
            while data := os.pread(file, 1 << 16, offset + passed):
                sink(data)
                passed += len(data)
        finally:
            os.close(file)
        return passed

    def feed_stdin(self, fd: int) -> None:
        """Pass what arrives on `fd` to the guest in chunks, and its end, until `finish()`."""
        thread = threading.Thread(target=self._feed, args=(fd,), name="sandbox-input", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _feed(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        chunks = 0
        while not self._stop.is_set():
            if not poller.poll(INPUT_POLL_MS):
                continue
            try:
                data = os.read(fd, STDIN_CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            self._write(f"stdin.{chunks}", data)
            chunks += 1
        self._write("stdin.end", f"{chunks}\n".encode())

    def write_input(self, data: bytes) -> None:
        """All of the command's standard input at once."""
        if data:
            self._write("stdin.0", data)
        self._write("stdin.end", f"{1 if data else 0}\n".encode())

    def send_signal(self, name: str = "INT") -> None:
        """Ask the agent to send signal `name` to the command."""
        self._write("signal", name.encode())

    def finish(self) -> None:
        """Stop relaying and feeding, after one last pass over the output."""
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    def started(self) -> bool:
        """Whether the agent got as far as starting the command."""
        return os.path.exists(os.path.join(self.path, "started"))

    def status(self) -> int | None:
        """The command's exit status, if the agent reported one with this run's token."""
        try:
            with open(os.path.join(self.path, "status"), "rb") as file:
                text = file.read(64).decode(errors="replace")
        except OSError:
            return None
        return parse_status(text, self.token)

    def close(self) -> None:
        self.finish()
        shutil.rmtree(self.path, ignore_errors=True)


def check_directory(path: str, what: str) -> str:
    """`path` made absolute, or a KvmletError if it is not a directory."""
    absolute = os.path.abspath(path)
    if not os.path.isdir(absolute):
        raise KvmletError(f"{what} {path}: not a directory")
    return absolute
