"""What the control API's threads may take from the guest.

They share one interpreter with the guest's threads: a vCPU thread needs the interpreter lock
for every exit it handles, so a flood of requests would slow an exit-heavy guest. `CpuBudget`
bounds what the server takes: its threads may use a share of one CPU on average (with a small
burst); past that they wait, requests queue up, and their latency, not the guest, pays. They
also run nicer than the monitor (`lower_priority`), so under CPU pressure the guest's vCPU and
device threads come first.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

NICENESS_INCREMENT = 5
"""The server's threads run this much nicer than the monitor: under CPU pressure the guest's
vCPU and device threads come first."""


class CpuBudget:
    """CPU time the server may still use: it accrues at `share` CPU seconds per second up to
    `burst`; threads pay what they used (`time.thread_time`) and sleep while in debt."""

    def __init__(self, share: float, burst: float):
        self.share = share
        self.burst = burst
        self._balance = burst
        self._updated = time.monotonic()
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds threads slept to stay in budget

    def pay(self, cpu_seconds: float) -> None:
        with self._lock:
            now = time.monotonic()
            self._balance = min(self.burst, self._balance + (now - self._updated) * self.share)
            self._updated = now
            self._balance -= cpu_seconds
            debt = -self._balance
        if debt > 0:
            pause = debt / self.share
            self.waited += pause
            time.sleep(pause)


def lower_priority() -> None:
    """Make the calling thread NICENESS_INCREMENT nicer (where the host lets it)."""
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread) + NICENESS_INCREMENT
        os.setpriority(os.PRIO_PROCESS, thread, niceness)
