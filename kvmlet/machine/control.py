"""The operations the control API (kvmlet/api) uses on a running `Machine`: pause, resume,
shutdown, snapshot, describe, stats; a base class of `Machine`, kept apart so the wiring in
machine.py stays a list of parts.

Pause holds every vCPU where the watchpoints park them for a break (outside KVM_RUN, at an
instruction boundary, after any port I/O or MMIO completed), then every virtio device's worker
between two rounds with no request in flight, then freezes the guest's kvmclock
(vstate/clock.py); resume undoes the three in the other order. Shutdown asks first
(Ctrl-Alt-Del on the i8042) and stops from the host after a grace period.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from kvmlet import __version__
from kvmlet.errors import KvmletError
from kvmlet.host.process import memory_usage
from kvmlet.kvm.ioctls import KVM_API_VERSION
from kvmlet.vstate.clock import FrozenClock, freeze_clock, thaw_clock
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason

if TYPE_CHECKING:
    from kvmlet.machine.machine import Machine
    from kvmlet.machine.snapshot import SnapshotResult

PAUSE_TIMEOUT = 5.0
"""Seconds `pause()` waits for the vCPUs and the devices' workers to reach a safe point."""


class Controls:
    """Pause, resume, shutdown and describe, for `Machine` (which provides the parts)."""

    def _init_controls(self) -> None:
        self._control = threading.Lock()  # one pause, resume or shutdown at a time
        self._frozen_clock: FrozenClock | None = None
        self.paused_at: float | None = None  # set while paused by `pause()`
        self.paused_seconds = 0.0  # time spent paused before the current pause

    def pause(self: Machine, timeout: float = PAUSE_TIMEOUT) -> None:
        """Hold every vCPU outside the guest at an instruction boundary (each parks in the run
        loop's interruption callback, watchpoints.py), every device's worker between rounds,
        and freeze the guest's kvmclock (vstate/clock.py); returns once all of it holds, so
        call it from outside the vCPU threads (a watch callback returns BREAK instead).
        Pausing a paused machine does nothing; KvmletError when it is not running or a vCPU
        or device did not reach its safe point within `timeout` (the machine then runs on)."""
        with self._control:
            if self.paused_at is not None:
                return
            self._require_running("pause")
            self.watchpoints.pause()
            try:
                self.watchpoints.wait_for_break(timeout)
            except KvmletError:
                self.watchpoints.resume()
                self._require_running("pause")
                raise KvmletError(
                    f"a vCPU did not stop within {timeout:g} s; the guest runs on"
                ) from None
            if not self.virtio.pause(timeout):
                self.virtio.resume()
                self.watchpoints.resume()
                raise KvmletError(f"a device stayed busy for {timeout:g} s; the guest runs on")
            self._frozen_clock = freeze_clock(self.vm)
            self.paused_at = time.monotonic()

    def resume(self: Machine) -> None:
        """Let a paused machine (by `pause()` or a watch's break) run again, the guest's
        kvmclock going on from where it was frozen. Resuming a running machine does nothing;
        KvmletError when it has stopped."""
        with self._control:
            if not self.paused:
                self._require_running("resume")
                return
            if self.paused_at is not None:
                thaw_clock(self.vm, self.vcpus, self._frozen_clock)
                self.virtio.resume()
                self.paused_seconds += time.monotonic() - self.paused_at
                self.paused_at = None
            self.watchpoints.resume()

    def _require_running(self: Machine, action: str) -> None:
        if not self.running:
            raise KvmletError(f"cannot {action}: the machine is {self.state}")

    def shutdown(self: Machine, grace: float = 0.0) -> GuestStop:
        """End the guest and say how it ended. With `grace` > 0, ask it first (Ctrl-Alt-Del
        on the i8042, which a Linux guest turns into a reboot through `reboot=k`, or the
        orderly shutdown its init makes of it) and give it that many seconds to stop by
        itself; then stop it from the host. A paused machine can only be stopped from the
        host (KvmletError with a grace period)."""
        with self._control:
            if self.paused and grace > 0:
                raise KvmletError("the machine is paused: resume it first, or stop it with force")
        if self.running and grace > 0 and self.legacy.press_ctrl_alt_del():
            self._stopped.wait(grace)
        self.stop(StopReason.HOST_QUIT, "stopped through the control API")
        assert self._stop is not None
        return self._stop

    @property
    def paused(self: Machine) -> bool:
        """Paused by `pause()` or by a watch's break, and not stopped since."""
        paused = self.paused_at is not None or self.watchpoints.paused
        return paused and not self._stopped.is_set()

    @property
    def state(self: Machine) -> str:
        """ "created" (not started), "running", "paused" or "stopped"."""
        if self.started is None:
            return "created"
        if self._stopped.is_set():
            return "stopped"
        return "paused" if self.paused else "running"

    @property
    def uptime(self: Machine) -> float:
        """Seconds since `start()` (0 before)."""
        return 0.0 if self.started is None else time.monotonic() - self.started

    def stats(self: Machine) -> dict[str, object]:
        """Counters of the vCPUs (exits by reason), the bus (per region), the legacy and virtio
        devices (per queue), the user's devices' workers, and the monitor's memory."""
        stats: dict[str, object] = {
            "vcpus": [
                {"id": vcpu.id, "exits": counts.snapshot()}
                for vcpu, counts in zip(self.vcpus, self.exit_counts, strict=True)
            ],
            "port_io": self.io.stats(),
            "mmio": self.mmio.stats(),
            "legacy": self.legacy.stats(),
            "virtio": self.virtio.stats(),
            "memory": memory_usage(self._ram_ranges),
        }
        if self._devices is not None:
            stats["devices"] = {
                placed.name: {
                    "jobs": sum(worker.completed for worker in placed.context.workers),
                    "job_errors": sum(worker.errors for worker in placed.context.workers),
                }
                for placed in self._devices
            }
        if self.recorder is not None:
            stats["recorded_events"] = self.recorder.writer.events
        return stats

    def snapshot(self: Machine, path: str, then: str = "resume") -> SnapshotResult:
        """Save the machine to a snapshot file: pause it, save every vCPU, the VM, every
        device and guest RAM, then "resume" (default), stay paused ("pause") or "stop"
        (snapshot.py). `Machine.restore(path)` builds it again, in this or another process.
        KvmletError (one line) when it cannot be saved; the machine goes on as it was."""
        from kvmlet.machine.snapshot import take_snapshot

        return take_snapshot(self, path, then)

    @property
    def balloon(self: Machine):
        """The virtio-balloon (`config.balloon`), or None."""
        return self.virtio.balloon

    def describe(self: Machine) -> dict[str, object]:
        """What the machine is: state, resources, devices, the host directory it booted from
        (type 9p or virtiofs), versions (the API's `describe`)."""
        from kvmlet.machine.file_transport import root_filesystem
        from kvmlet.machine.shares import ROOT_TAG

        config = self.config
        paused_now = time.monotonic() - self.paused_at if self.paused_at is not None else 0.0
        return {
            "pid": os.getpid(),
            "state": self.state,
            "vcpus": config.cpus,
            "memory_bytes": config.memory,
            "uptime_seconds": round(self.uptime, 3),
            "paused_seconds": round(self.paused_seconds + paused_now, 3),
            "kernel": None if config.kernel is None else os.fspath(config.kernel),
            "initrd": None if config.initrd is None else os.fspath(config.initrd),
            "cmdline": self.cmdline,
            "console": config.console,
            "host_profile": self.profile.name,
            "disks": [
                {"path": os.fspath(disk.path), "read_only": disk.read_only, "direct": disk.direct}
                for disk in config.disks
            ],
            "devices": self.legacy.describe() + self.virtio.describe(),
            "root_filesystem": root_filesystem(config, ROOT_TAG),
            "versions": {
                "kvmlet": __version__,
                "python": "{}.{}.{}".format(*sys.version_info[:3]),
                "kvm_api": KVM_API_VERSION,
                "host_kernel": os.uname().release,
            },
        }
