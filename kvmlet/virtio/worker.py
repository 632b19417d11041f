"""Queue workers: threads that wait on doorbell eventfds and run the devices' queue work.

A guest's kick is a write to a notify address that KVM turns into an eventfd signal (an
ioeventfd) without leaving the kernel. A `QueueWorker` waits on the eventfds of any number of
doorbells with epoll, reads each signalled counter and calls
`device.notify(queue_index)`. One worker can serve every device, or the machine can start one per
device (`workers_per_device`). Other eventfds can be watched too (`watch`), e.g. the resample
eventfd of a level-triggered irqfd line, and so can descriptors that are not eventfds, such as a
network backend's socket or tap (`watch_readiness`): the owner of such a `ReadinessWatch` says
whether it wants to read or write, and is called while the descriptor is ready for that.

A device that raises never kills the worker: the error is logged and counted, the device is put
in DEVICE_NEEDS_RESET, and the other doorbells keep being served. `stop()` wakes the thread
through its own eventfd and joins it. `pause()` holds the thread between two notifications (a
paused machine's devices touch no guest memory); kicks that arrive meanwhile stay counted in
their eventfds and are served after `resume()`.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterable

from kvmlet.errors import LazyLogger
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
    is called as `callback(readable, writable, hangup)` on the worker thread while the
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
    """One thread serving a set of doorbells (and other watched descriptors)."""

    def __init__(self, name: str = "virtio-worker"):
        self.name = name
        self.wakeups = 0
        self.notifications = 0
        self.device_errors = 0
        self._epoll = select.epoll()
        self._stop_fd = new_eventfd()
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        # What a signalled descriptor means: a Doorbell, a watched eventfd's callback, a
        # readiness watch, or None (stop).
        self._targets: dict[int, Doorbell | ReadinessWatch | Callable[[], None] | None] = {
            self._stop_fd: None
        }
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pause = threading.Condition()
        self._pause_requested = False
        self._parked = False
        self.doorbells: list[Doorbell] = []

    def add(self, bell: Doorbell) -> None:
        """Serve `bell` from now on (before or after `start`)."""
        self.doorbells.append(bell)
        self._targets[bell.eventfd] = bell
        self._epoll.register(bell.eventfd, select.EPOLLIN)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` on this thread whenever `fd` (an eventfd) is signalled."""
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

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def pause(self, timeout: float = 5.0) -> bool:
        """Hold the thread once the notification it is serving is done; False if it is still
        busy after `timeout` (it then stays asked to pause: call `resume()`)."""
        with self._pause:
            self._pause_requested = True
            if self._thread is None or self._stopping:
                return True
            os.eventfd_write(self._stop_fd, 1)
            return self._pause.wait_for(lambda: self._parked, timeout)

    def resume(self) -> None:
        """Let a paused thread serve its doorbells again."""
        with self._pause:
            self._pause_requested = False
            self._pause.notify_all()

    def _hold_while_paused(self) -> None:
        with self._pause:
            if not self._pause_requested:
                return
            self._parked = True
            self._pause.notify_all()
            while self._pause_requested and not self._stopping:
                self._pause.wait()
            self._parked = False

    def stop(self, timeout: float = 5.0) -> None:
        """Wake the thread, wait for it, release the selector (doorbells stay open)."""
        if self._stopping:
            return
        with self._pause:
            self._stopping = True
            self._pause.notify_all()
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s did not stop within %.1f s", self.name, timeout)
                return
        self._epoll.close()
        os.close(self._stop_fd)

    def _run(self) -> None:
        poll, targets = self._epoll.poll, self._targets
        while not self._stopping:
            for fd, events in poll():
                target = targets.get(fd)
                if target is None:  # the control eventfd: a stop or a pause
                    _drain(fd)
                    self._hold_while_paused()
                    break
                self.wakeups += 1
                if type(target) is ReadinessWatch:
                    self._call_ready(target, events)
                    continue
                count = _drain(fd)
                if not count:
                    continue
                if type(target) is Doorbell:
                    target.kicks += count
                    self._ring(target)
                else:
                    self._call(target)

    def _ring(self, bell: Doorbell) -> None:
        bell.wakeups += 1
        self.notifications += 1
        try:
            bell.device.notify(bell.queue_index)
        except Exception as error:  # a device bug must not stop the other devices
            log.exception("%s: queue %d failed", bell.device.name, bell.queue_index)
            bell.device.fail(f"queue {bell.queue_index}: {type(error).__name__}: {error}")
            # Counted last: whoever sees the count also sees the device marked failed.
            self.device_errors += 1

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.device_errors += 1
            log.exception("%s: watched descriptor callback failed", self.name)

    def _call_ready(self, watch: ReadinessWatch, events: int) -> None:
        hangup = bool(events & (select.EPOLLHUP | select.EPOLLERR))
        try:
            watch.callback(bool(events & select.EPOLLIN), bool(events & select.EPOLLOUT), hangup)
        except Exception:
            self.device_errors += 1
            log.exception("%s: readiness callback for fd %d failed", self.name, watch.fd)
            watch.close()  # a level-triggered descriptor would call the broken callback forever

    def stats(self) -> dict[str, int]:
        return {
            "wakeups": self.wakeups,
            "notifications": self.notifications,
            "device_errors": self.device_errors,
        }


def workers_per_device(doorbells: Iterable[Doorbell]) -> list[QueueWorker]:
    """One (unstarted) worker per device, each serving that device's doorbells."""
    by_device: dict[int, QueueWorker] = {}
    for bell in doorbells:
        worker = by_device.get(id(bell.device))
        if worker is None:
            worker = by_device[id(bell.device)] = QueueWorker(f"virtio-{bell.device.name}")
        worker.add(bell)
    return list(by_device.values())
