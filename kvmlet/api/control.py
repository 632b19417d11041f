"""The control API's view of one `Machine`: the router's `Target`.

Each operation is one call on the machine (which does the work and raises `KvmletError` when
its state does not allow it), shaped into the JSON documents docs/api.yaml describes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvmlet.api.router import ApiError
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

BALLOON_PAGE = 4096
STATISTICS_TIMEOUT = 1.0
"""Seconds a balloon read waits for the guest's fresh statistics before answering with the
last ones it has."""


def stop_document(stop: GuestStop) -> dict[str, object]:
    """How a machine ended, for a client: `clean` unless it had to be stopped from the host."""
    return {
        "state": "stopped",
        "reason": stop.reason.name.lower(),
        "message": str(stop),
        "clean": stop.reason is not StopReason.HOST_QUIT,
        "exit_status": stop.reason.exit_status,
    }


class MachineControl:
    """Describe, pause, resume, stop, snapshot, statistics, balloon and console of one
    machine."""

    def __init__(
        self,
        machine: Machine,
        name: str,
        socket_path: str,
        server_counters: Callable[[], dict[str, int]] = dict,
    ):
        self.machine = machine
        self.name = name
        self.socket_path = socket_path
        self.server_counters = server_counters

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "api_socket": self.socket_path, **self.machine.describe()}

    def pause(self) -> dict[str, object]:
        self.machine.pause()
        return self.describe()

    def resume(self) -> dict[str, object]:
        self.machine.resume()
        return self.describe()

    def stop(self, force: bool, grace_seconds: float) -> dict[str, object]:
        return stop_document(self.machine.shutdown(0.0 if force else grace_seconds))

    def stats(self) -> dict[str, object]:
        stats = self.machine.stats()
        balloon = self.machine.balloon
        stats["balloon"] = None if balloon is None else self._balloon_document(refresh=False)
        stats["api"] = dict(self.server_counters())
        return stats

    def balloon(self) -> dict[str, object]:
        return self._balloon_document(refresh=True)

    def set_balloon(self, target_bytes: int) -> dict[str, object]:
        balloon = self._require_balloon()
        memory = self.machine.config.memory
        if target_bytes > memory:
            raise ApiError(409, f"target_bytes {target_bytes} is more than the guest's {memory}")
        if self.machine.state not in ("running", "paused"):
            raise ApiError(409, f"the machine is {self.machine.state}")
        balloon.set_target(target_bytes // BALLOON_PAGE)
        return self._balloon_document(refresh=False)

    def console(self, size: int) -> dict[str, object]:
        data, total = self.machine.console.tail(size)
        return {"text": data.decode(errors="replace"), "bytes": len(data), "total_bytes": total}

    def snapshot(self, path: str, then: str) -> dict[str, object]:
        result = self.machine.snapshot(path, then)
        return {
            "path": result.path,
            "file_bytes": result.file_bytes,
            "ram_bytes": result.ram_bytes,
            "seconds": round(result.seconds, 6),
            "paused_seconds": round(result.paused_seconds, 6),
            "state": result.state,
        }

    def _require_balloon(self):
        balloon = self.machine.balloon
        if balloon is None:
            raise ApiError(409, "this machine has no balloon (start it with --balloon)")
        return balloon

    def _balloon_document(self, refresh: bool) -> dict[str, object]:
        balloon = self._require_balloon()
        if refresh and self.machine.state == "running":
            balloon.request_statistics(STATISTICS_TIMEOUT)
        counters = balloon.stats()
        updated = balloon.statistics_updated
        return {
            "target_bytes": counters["target_pages"] * BALLOON_PAGE,
            "actual_bytes": counters["actual_pages"] * BALLOON_PAGE,
            "inflated_bytes": counters["inflated_pages"] * BALLOON_PAGE,
            "reported_bytes": counters["reported_bytes"],
            "guest_memory_bytes": self.machine.config.memory,
            "statistics": dict(balloon.statistics),
            "statistics_age_seconds": (
                None if updated is None else round(time.monotonic() - updated, 3)
            ),
            "counters": {
                name: counters[name]
                for name in (
                    "inflate_requests",
                    "deflate_requests",
                    "ignored_pfns",
                    "duplicate_pfns",
                    "discard_errors",
                )
            },
        }
