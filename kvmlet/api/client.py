"""The Python client of the control API: `kvmlet.connect(NAME_OR_SOCKET)`.

    with kvmlet.connect("web") as machine:
        print(machine.describe().state)        # "running"
        machine.pause(); machine.resume()
        machine.set_balloon(64 << 20)          # take 64 MiB from the guest
        machine.snapshot("web.snap")           # kvmlet run --restore web.snap goes on
        print(machine.stats().vcpus[0].exits)  # {"io": ..., "mmio": ..., ...}
        machine.stop()                         # ask the guest, then stop it from the host

Results are typed (frozen dataclasses; `raw` keeps the whole JSON document); a refusal by the
machine, or no machine to talk to, is a `KvmletError` with the reason in one line.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass, field

from kvmlet.api.names import check_name, running_names, socket_path
from kvmlet.errors import KvmletError

DEFAULT_TIMEOUT = 30.0
"""Seconds to wait for an answer (a stop waits its grace period on top)."""


@dataclass(frozen=True)
class MachineInfo:
    name: str
    pid: int
    state: str  # "running", "paused" or "stopped"
    vcpus: int
    memory_bytes: int
    uptime_seconds: float
    paused_seconds: float
    api_socket: str
    kernel: str | None
    cmdline: str
    devices: tuple[dict, ...]
    versions: dict[str, object]
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_document(cls, document: dict) -> MachineInfo:
        return cls(
            name=document["name"],
            pid=document["pid"],
            state=document["state"],
            vcpus=document["vcpus"],
            memory_bytes=document["memory_bytes"],
            uptime_seconds=document["uptime_seconds"],
            paused_seconds=document["paused_seconds"],
            api_socket=document["api_socket"],
            kernel=document["kernel"],
            cmdline=document["cmdline"],
            devices=tuple(document["devices"]),
            versions=document["versions"],
            raw=document,
        )


@dataclass(frozen=True)
class StopResult:
    reason: str  # a StopReason's name in lower case: "reset", "host_quit", ...
    message: str
    clean: bool  # the guest stopped by itself (it was not stopped from the host)
    exit_status: int

    @classmethod
    def from_document(cls, document: dict) -> StopResult:
        return cls(
            document["reason"], document["message"], document["clean"], document["exit_status"]
        )


@dataclass(frozen=True)
class BalloonInfo:
    target_bytes: int
    actual_bytes: int  # as the guest's driver reports it
    inflated_bytes: int  # as the device counted the pages it released
    reported_bytes: int  # released through free page reporting
    guest_memory_bytes: int
    statistics: dict[str, int]  # the guest's own figures: free_memory, available_memory, ...
    statistics_age_seconds: float | None
    counters: dict[str, int]

    @classmethod
    def from_document(cls, document: dict) -> BalloonInfo:
        names = cls.__dataclass_fields__
        return cls(**{name: document[name] for name in names})


@dataclass(frozen=True)
class VcpuStats:
    id: int
    exits: dict[str, int]


@dataclass(frozen=True)
class Stats:
    vcpus: tuple[VcpuStats, ...]
    memory: dict[str, int]  # rss_bytes, guest_ram_rss_bytes, monitor_rss_bytes, threads
    balloon: BalloonInfo | None
    raw: dict = field(repr=False, compare=False)  # with port_io, mmio, legacy, virtio, api

    @classmethod
    def from_document(cls, document: dict) -> Stats:
        balloon = document.get("balloon")
        return cls(
            vcpus=tuple(VcpuStats(vcpu["id"], vcpu["exits"]) for vcpu in document["vcpus"]),
            memory=document["memory"],
            balloon=None if balloon is None else BalloonInfo.from_document(balloon),
            raw=document,
        )


@dataclass(frozen=True)
class SnapshotInfo:
    path: str
    file_bytes: int  # the file's size (its RAM area is sparse: it takes less on disk)
    ram_bytes: int  # guest RAM written (its zero pages are not)
    seconds: float  # from the request to the file in place
    paused_seconds: float  # how long the guest was held for it
    state: str  # the machine's state afterwards: "running", "paused" or "stopped"

    @classmethod
    def from_document(cls, document: dict) -> SnapshotInfo:
        names = cls.__dataclass_fields__
        return cls(**{name: document[name] for name in names})


@dataclass(frozen=True)
class ConsoleTail:
    text: str
    bytes: int
    total_bytes: int  # everything the guest has written to its console


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("kvmlet", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            self.sock = None
            raise


class Client:
    """A connection to one machine's control API (made by `connect`)."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, name: str | None = None):
        self.path = path
        self.name = name
        self.timeout = timeout
        self._connection = _UnixConnection(path, timeout)
        try:
            self._connection.connect()
        except OSError as error:
            raise self._error(error) from None

    def describe(self) -> MachineInfo:
        return MachineInfo.from_document(self.request("GET", "/v1/vm"))

    def pause(self) -> MachineInfo:
        return MachineInfo.from_document(self.request("PUT", "/v1/vm/pause"))

    def resume(self) -> MachineInfo:
        return MachineInfo.from_document(self.request("PUT", "/v1/vm/resume"))

    def stop(self, force: bool = False, grace_seconds: float = 10.0) -> StopResult:
        """Ask the guest to stop (Ctrl-Alt-Del) and give it `grace_seconds`, then stop it
        from the host; `force` skips the asking."""
        body = {"force": force, "grace_seconds": grace_seconds}
        document = self.request("PUT", "/v1/vm/stop", body, self.timeout + grace_seconds)
        return StopResult.from_document(document)

    def stats(self) -> Stats:
        return Stats.from_document(self.request("GET", "/v1/vm/stats"))

    def balloon(self) -> BalloonInfo:
        return BalloonInfo.from_document(self.request("GET", "/v1/balloon"))

    def set_balloon(self, target_bytes: int) -> BalloonInfo:
        """Ask the guest to give `target_bytes` of its memory to the balloon (0: all back)."""
        document = self.request("PUT", "/v1/balloon", {"target_bytes": target_bytes})
        return BalloonInfo.from_document(document)

    def snapshot(self, path: str, then: str = "resume") -> SnapshotInfo:
        """Save the machine to the snapshot file `path` (made absolute), then "resume",
        "pause" or "stop" it; `kvmlet run --restore FILE` or `Machine.restore` starts it
        again."""
        body = {"path": os.path.abspath(path), "then": then}
        return SnapshotInfo.from_document(self.request("PUT", "/v1/vm/snapshot", body))

    def console(self, size: int = 4096) -> ConsoleTail:
        """The last `size` bytes the guest wrote to its console."""
        document = self.request("GET", f"/v1/vm/console?bytes={size}")
        return ConsoleTail(document["text"], document["bytes"], document["total_bytes"])

    def request(
        self, method: str, path: str, body: dict | None = None, timeout: float | None = None
    ) -> dict:
        """One API call: the JSON document of a 2xx answer, else KvmletError(its message)."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if payload is not None else {}
        connection = self._connection
        connection.timeout = timeout or self.timeout
        if connection.sock is not None:
            connection.sock.settimeout(connection.timeout)
        for attempt in range(2):
            reused = connection.sock is not None
            try:
                connection.request(method, path, payload, headers)
                response = connection.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected) as error:
                connection.close()
                if not reused or attempt:  # a fresh connection failed: the machine is gone
                    raise self._error(error) from None
            except TimeoutError:
                connection.close()
                raise KvmletError(
                    f"the machine at {self.path} did not answer within {connection.timeout:g} s"
                ) from None
            except OSError as error:
                connection.close()
                raise self._error(error) from None
        try:
            document = json.loads(data)
        except ValueError:
            raise KvmletError(f"{self.path} answered {response.status} with no JSON") from None
        if response.status >= 300:
            message = document.get("error") if isinstance(document, dict) else None
            raise KvmletError(message or f"{method} {path} failed with {response.status}")
        return document

    def _error(self, error: OSError) -> KvmletError:
        if isinstance(error, FileNotFoundError | ConnectionRefusedError):
            if self.name is not None:
                return KvmletError(f"no machine named {self.name} is running")
            return KvmletError(f"no machine is running at {self.path}")
        if isinstance(error, PermissionError):
            return KvmletError(f"permission denied on {self.path} (it belongs to another user)")
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return KvmletError(f"lost the connection to {self.path}: {reason}")

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(name_or_socket: str, timeout: float = DEFAULT_TIMEOUT) -> Client:
    """A client of the machine called `name_or_socket`, or listening on that socket path
    (anything with a '/'); KvmletError when no such machine is running."""
    name = None if "/" in name_or_socket else check_name(name_or_socket)
    return Client(socket_path(name_or_socket), timeout, name)


def list_machines(timeout: float = 5.0) -> list[MachineInfo]:
    """Every running machine of this user that answers within `timeout` seconds, by name."""
    machines = []
    for name in running_names():
        try:
            with connect(name, timeout) as client:
                machines.append(client.describe())
        except KvmletError:
            continue  # it stopped meanwhile, or is too busy to answer
    return machines
