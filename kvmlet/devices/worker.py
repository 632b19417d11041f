"""A device's worker thread: slow work off the vCPU thread, its result applied under the lock.

A register handler runs on the vCPU thread that made the access, with the device's lock held:
anything slow there (hashing a large buffer, a host file, a network round trip) stalls that
vCPU. `submit(work, done)` queues a job instead: `work()` runs on the worker's thread without
the lock (it may read and write guest memory through `context.memory`, but must not touch the
device's registers); then `done(result)` runs with the device lock held, where it updates
registers and raises the interrupt. Jobs run one at a time, in the order submitted.

While recording, each job's completion is journaled; a replay runs the job at that point of
the guest's accesses, so a model with a worker replays deterministically. A job whose `work`
raises is logged and counted (`errors`) and completes without calling `done`.

A job that waits (a timer) calls `worker.sleep(seconds)`: it ends the job (no `done`) when the
machine closes, and returns at once in a replay, where the recorded clock readings drive the
job instead of time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmlet.devices.context import enter_job, leave_job
from kvmlet.errors import LazyLogger

if TYPE_CHECKING:
    from kvmlet.devices.context import DeviceContext

log = LazyLogger("kvmlet.devices")
_STOP = object()


class JobCancelled(Exception):
    """Raised by `DeviceWorker.sleep` in a job when the machine closes: the job ends."""


class DeviceWorker:
    """One thread running a device's jobs; see the module docstring."""

    def __init__(self, context: DeviceContext, index: int = 0):
        self.context = context
        self.name = f"{context.name}-worker{index}"
        self.submitted = 0
        self.completed = 0
        self.errors = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def submit(self, work: Callable[[], Any], done: Callable[[Any], Any] | None = None) -> int:
        """Queue a job; returns its number (counted from 1 per device, across its workers)."""
        context = self.context
        job = next(context.job_numbers)
        self.submitted += 1
        journal = context.journal
        if journal is not None and journal.replaying:
            journal.defer(context.name, job, lambda: self._run(job, work, done))
        elif context.worker_mode == "inline":
            self._run(job, work, done)
        else:
            self._queue.put((job, work, done))
        return job

    def _run(self, job: int, work: Callable[[], Any], done: Callable[[Any], Any] | None) -> None:
        context = self.context
        previous = enter_job(context, job)
        try:
            try:
                result = work()
                apply = (lambda: done(result)) if done is not None else _nothing
            except JobCancelled:
                return
            except Exception:
                self.errors += 1
                log.exception("%s: job %d failed", self.name, job)
                apply = _nothing
            with context.lock:
                journal = context.journal
                if journal is None:
                    apply()
                else:
                    journal.done(context.name, job, apply)
            self.completed += 1
        finally:
            leave_job(previous)

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` in a job; see the module docstring."""
        journal = self.context.journal
        if journal is not None and journal.replaying:
            return
        if self._closing.wait(max(0.0, seconds)):
            raise JobCancelled

    def start(self) -> None:
        """Start the thread (jobs submitted before wait in the queue)."""
        if self._thread is None and self.context.worker_mode == "thread":
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._run(*item)
            except Exception:  # a `done` that raised: the device's bug, not the machine's end
                self.errors += 1
                log.exception("%s: a job's completion failed", self.name)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted job has completed (tests); False on timeout."""
        if self._thread is None:
            return self._queue.empty()
        drained = threading.Event()
        self._queue.put(drained)
        return drained.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs (a sleeping one ends at once) and stop the thread."""
        self._closing.set()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None


def _nothing(*_: Any) -> None:
    """A job part with nothing to do."""
