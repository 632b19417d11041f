"""Queue workers: threads that wait on doorbell eventfds and serve the devices' queues.

A guest's kick is a write to a notify address that KVM turns into an eventfd signal (an
ioeventfd) without leaving the kernel. A `QueueWorker` waits on the eventfds of its doorbells
with epoll, reads each signalled counter and runs a bounded round of the queue
(`VirtioDevice.serve`); a queue with work left after its round goes to the back of the line,
so the worker looks at its other doorbells and at stop and pause requests between rounds
whatever the guest put in its rings. A kick that reached a transport register instead (no
ioeventfd for it) rings the same doorbell (`connect_kick`), so queues are only ever served
here, never on a vCPU.

The machine runs one worker per device (`workers_per_device`): devices are served
independently, a slow disk never holds up the console. A worker made with `threads > 1` has
helper threads: while a queue's requests are slow (host I/O), a round asks for a hand and a
helper takes the next request, so up to `threads` requests of the queue are in flight at once.

Other eventfds can be watched too (`watch`), e.g. the resample eventfd of a level-triggered
irqfd line or a vhost backend's call eventfd, and so can descriptors that are not eventfds,
such as a network backend's socket or tap (`watch_readiness`): the owner of such a
`ReadinessWatch` says whether it wants to read or write, and is called while the descriptor is
ready for that. Every callback runs on the poller thread.

A device that raises never kills the worker: the error is counted and logged (rate-limited),
the device is put in DEVICE_NEEDS_RESET, and the other doorbells keep being served. `pause()`
holds every thread of the worker between two rounds (a paused machine's devices touch no guest
memory); kicks that arrive meanwhile stay counted in their eventfds and are served after
`resume()`. `stop()` wakes the threads and joins them; it says whether they all ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from kvmlet.errors import LazyLogger, RateLimitedLog
from kvmlet.virtio.device import VirtioDevice

log = LazyLogger(__name__)


def new_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Doorbell:
    """The eventfd KVM signals when the guest kicks queue `queue_index` of `device`.

    `kicks` counts the guest writes the eventfd counted: more than `wakeups` when kicks were
    coalesced."""

    def __init__(self, device: VirtioDevice, queue_index: int, eventfd: int):
        self.device = device
        self.queue_index = queue_index
        self.eventfd = eventfd
        self.wakeups = 0
        self.kicks = 0

    def __repr__(self) -> str:
        return f"Doorbell({self.device.name!r}, queue {self.queue_index}, fd {self.eventfd})"

    def fileno(self) -> int:
        return self.eventfd

    def ring(self) -> None:
        """Signal the doorbell as KVM does for a guest's notify write."""
        if self.eventfd >= 0:
            os.eventfd_write(self.eventfd, 1)

    def close(self) -> None:
        if self.eventfd >= 0:
            os.close(self.eventfd)
            self.eventfd = -1


def doorbell(device: VirtioDevice, queue_index: int) -> Doorbell:
    """A fresh doorbell for one queue; give `.eventfd` to the transport's `add_doorbell`."""
    if not 0 <= queue_index < device.queue_count:
        raise ValueError(f"{device.name} has no queue {queue_index}")
    return Doorbell(device, queue_index, new_eventfd())


class ReadinessWatch:
    """A descriptor the worker polls for readiness (level-triggered, nothing drained).

    The owner chooses what it waits for with `want(readable, writable)` (nothing at first) and
    is called as `callback(readable, writable, hangup)` on the poller thread while the
    descriptor is ready for it. The kernel reports an error or a hang-up even when nothing is
    wanted, so the owner must `close()` the watch (or stop wanting) once the peer is gone.
    """

    def __init__(
        self,
        epoll: select.epoll,
        targets: dict,
        fd: int,
        callback: Callable[[bool, bool, bool], None],
    ):
        self.fd = fd
        self.callback = callback
        self.events = 0
        self._epoll = epoll
        self._targets = targets

    def __repr__(self) -> str:
        return f"ReadinessWatch(fd {self.fd}, events {self.events:#x})"

    def want(self, readable: bool, writable: bool) -> None:
        """Wait for the descriptor to become readable and/or writable (neither: pause)."""
        events = (select.EPOLLIN if readable else 0) | (select.EPOLLOUT if writable else 0)
        if events != self.events and self.fd in self._targets:
            with contextlib.suppress(ValueError):  # the worker stopped and closed its epoll
                self._epoll.modify(self.fd, events)
            self.events = events

    def close(self) -> None:
        """Stop watching (before the owner closes the descriptor)."""
        if self._targets.pop(self.fd, None) is not None:
            with contextlib.suppress(ValueError):  # the worker stopped and closed its epoll
                self._epoll.unregister(self.fd)


def _drain(fd: int) -> int:
    """Read and reset an eventfd counter (0 when it was not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class QueueWorker:
    """A poller thread serving a set of doorbells (and watched descriptors), with
    `threads - 1` helper threads it lends to slow queues."""

    def __init__(self, name: str = "virtio-worker", threads: int = 1):
        self.name = name
        self.threads = max(1, threads)
        self.wakeups = 0
        self.notifications = 0
        self.rounds = 0
        self.hands_lent = 0
        self.device_errors = 0
        self._epoll = select.epoll()
        self._stop_fd = new_eventfd()
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        # What a signalled descriptor means: a Doorbell, a watched eventfd's callback, a
        # readiness watch, or None (the control eventfd: a stop or a pause).
        self._targets: dict[int, Doorbell | ReadinessWatch | Callable[[], None] | None] = {
            self._stop_fd: None
        }
        self._ready: deque[Doorbell] = deque()  # queues with work left after their round
        self._hand_wanted: deque[Doorbell] = deque()
        self._idle_helpers = 0
        self._serving_helpers = 0  # helpers inside a round (not at a safe point)
        # Guards the helpers' hand-offs and the pause; its waiters are helpers and `pause`.
        self._helping = threading.Condition(threading.Lock())
        self._pause_requested = False
        self._parked = False  # the poller holds for a pause
        self._hands: dict[Doorbell, Callable[[], None] | None] = {}
        self._log = RateLimitedLog(log)
        self._all: list[threading.Thread] = []
        self._stopping = False
        self._closed = False
        self.doorbells: list[Doorbell] = []

    def add(self, bell: Doorbell) -> None:
        """Serve `bell` from now on (before or after `start`); kicks of its queue that reach
        a transport register ring it too (a device may refuse: ValueError)."""
        bell.device.connect_kick(bell.queue_index, bell.ring)
        self.doorbells.append(bell)
        self._targets[bell.eventfd] = bell
        self._hands[bell] = (lambda: self._lend_hand(bell)) if self.threads > 1 else None
        self._epoll.register(bell.eventfd, select.EPOLLIN)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` on the poller thread whenever `fd` (an eventfd) is signalled."""
        self._targets[fd] = callback
        self._epoll.register(fd, select.EPOLLIN)

    def watch_readiness(
        self, fd: int, callback: Callable[[bool, bool, bool], None]
    ) -> ReadinessWatch:
        """Poll `fd` (a socket, a tap) for readiness; see `ReadinessWatch`."""
        watch = ReadinessWatch(self._epoll, self._targets, fd, callback)
        self._targets[fd] = watch
        self._epoll.register(fd, 0)
        return watch

    @property
    def _thread(self) -> threading.Thread | None:
        """The poller thread (None before `start`)."""
        return self._all[0] if self._all else None

    def start(self) -> None:
        if self._all:
            raise RuntimeError(f"{self.name} already started")
        self._all.append(threading.Thread(target=self._poll, name=self.name, daemon=True))
        for index in range(1, self.threads):
            name = f"{self.name}-{index}"
            self._all.append(threading.Thread(target=self._help, name=name, daemon=True))
        for thread in self._all:
            thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Wake the threads and wait for them; True once every one has ended. The selector is
        released then (doorbells stay open); with a thread still running (stuck in host I/O),
        nothing it may use is released, and a later `stop` tries again."""
        if self._closed:
            return True
        with self._helping:
            self._stopping = True
            self._helping.notify_all()
        os.eventfd_write(self._stop_fd, 1)
        for thread in self._all:
            thread.join(timeout)
        alive = [thread.name for thread in self._all if thread.is_alive()]
        if alive:
            log.warning("%s: %s did not stop within %.1f s", self.name, ", ".join(alive), timeout)
            return False
        self._closed = True
        self._epoll.close()
        os.close(self._stop_fd)
        return True

    def pause(self, timeout: float = 5.0) -> bool:
        """Hold every thread of the worker once the round it is in is done, and wait until no
        request taken from its queues is in flight; False if that takes longer than `timeout`
        (the worker then stays asked to pause: call `resume()`)."""
        deadline = time.monotonic() + timeout
        with self._helping:
            self._pause_requested = True
            if not self._all or self._stopping:
                return True
        os.eventfd_write(self._stop_fd, 1)
        with self._helping:
            held = self._helping.wait_for(
                lambda: self._parked and not self._serving_helpers, timeout
            )
        if not held:
            return False
        while any(bell.device.queues[bell.queue_index].in_flight for bell in self.doorbells):
            if time.monotonic() >= deadline:  # completed later by a thread of the device's
                return False
            time.sleep(0.005)
        return True

    def resume(self) -> None:
        """Let a paused worker serve its doorbells again."""
        with self._helping:
            self._pause_requested = False
            self._helping.notify_all()

    def _hold_while_paused(self) -> None:
        with self._helping:
            if not self._pause_requested:
                return
            self._parked = True
            self._helping.notify_all()
            while self._pause_requested and not self._stopping:
                self._helping.wait()
            self._parked = False

    def _poll(self) -> None:
        poll, targets, ready, control = self._epoll.poll, self._targets, self._ready, self._stop_fd
        while not self._stopping:
            if self._pause_requested:
                self._hold_while_paused()
                continue
            for fd, events in poll(0 if ready else -1):
                if fd == control:  # a stop or a pause: looked at on the next turn
                    _drain(fd)
                    continue
                target = targets.get(fd)
                if target is None:  # unwatched since the poll returned
                    continue
                self.wakeups += 1
                if type(target) is ReadinessWatch:
                    self._call_ready(target, events)
                    continue
                count = _drain(fd)
                if not count:
                    continue
                if type(target) is Doorbell:
                    target.kicks += count
                    target.wakeups += 1
                    self.notifications += 1
                    target.device.queue_stats[target.queue_index].notifications += 1
                    if target not in ready:
                        ready.append(target)
                else:
                    self._call(target)
            for _ in range(len(ready)):
                if self._stopping or self._pause_requested:
                    break
                bell = ready.popleft()
                if self._serve(bell) and bell not in ready:
                    ready.append(bell)

    def _serve(self, bell: Doorbell) -> bool:
        """One round of a doorbell's queue; True when work is left."""
        self.rounds += 1
        device = bell.device
        try:
            return device.serve(bell.queue_index, self._hands[bell])
        except Exception as error:  # a device bug must not stop the other devices
            self._log.error(
                (device.name, type(error)),
                "%s: queue %d failed",
                device.name,
                bell.queue_index,
                exc_info=True,
            )
            device.fail(f"queue {bell.queue_index}: {type(error).__name__}: {error}")
            # Counted last: whoever sees the count also sees the device marked failed.
            self.device_errors += 1
            return False

    def _lend_hand(self, bell: Doorbell) -> None:
        """A round of `bell`'s queue saw more slow requests waiting: wake an idle helper."""
        with self._helping:
            if self._idle_helpers > len(self._hand_wanted):
                self._hand_wanted.append(bell)
                self.hands_lent += 1
                self._helping.notify()

    def _help(self) -> None:
        while True:
            with self._helping:
                self._idle_helpers += 1
                while (not self._hand_wanted or self._pause_requested) and not self._stopping:
                    self._helping.wait()
                self._idle_helpers -= 1
                if self._stopping:
                    return
                bell = self._hand_wanted.popleft()
                self._serving_helpers += 1
            try:
                while not self._stopping:
                    if self._pause_requested:  # the poller takes the queue up after resume
                        bell.ring()
                        break
                    if not self._serve(bell):
                        break
            finally:
                with self._helping:
                    self._serving_helpers -= 1
                    self._helping.notify_all()

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception as error:
            self.device_errors += 1
            self._log.error(
                (callback, type(error)),
                "%s: watched descriptor callback failed",
                self.name,
                exc_info=True,
            )

    def _call_ready(self, watch: ReadinessWatch, events: int) -> None:
        hangup = bool(events & (select.EPOLLHUP | select.EPOLLERR))
        try:
            watch.callback(bool(events & select.EPOLLIN), bool(events & select.EPOLLOUT), hangup)
        except Exception as error:
            self.device_errors += 1
            self._log.error(
                (watch.callback, type(error)),
                "%s: readiness callback for fd %d failed",
                self.name,
                watch.fd,
                exc_info=True,
            )
            watch.close()  # a level-triggered descriptor would call the broken callback forever

    def stats(self) -> dict[str, int]:
        return {
            "wakeups": self.wakeups,
            "notifications": self.notifications,
            "rounds": self.rounds,
            "hands_lent": self.hands_lent,
            "device_errors": self.device_errors,
        }


def workers_per_device(doorbells: Iterable[Doorbell]) -> list[QueueWorker]:
    """One (unstarted) worker per device, each serving that device's doorbells with as many
    threads as the device serves requests at once."""
    by_device: dict[int, QueueWorker] = {}
    for bell in doorbells:
        worker = by_device.get(id(bell.device))
        if worker is None:
            name = f"virtio-{bell.device.name}"
            worker = by_device[id(bell.device)] = QueueWorker(name, bell.device.concurrency)
        worker.add(bell)
    return list(by_device.values())
