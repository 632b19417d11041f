"""How a virtio device serves its queues: bounded rounds, requests, completions.

A round (`serve`) takes chains from one queue and hands each to the device as a `Request`,
until the queue is empty or the round's budget (`ROUND_REQUESTS` chains, `ROUND_BYTES` bytes
moved) is spent; then it returns whether work is left, and the caller (a queue worker) comes back
after it has looked at its other queues and at stop requests. So one kick, whatever the guest
wrote into its rings (even a ring that re-arms itself from the data it reads), is bounded work.

Every chain taken from a ring is completed exactly once: `handle_request` returns the bytes it
wrote into the chain, or `DEFERRED` when the device completes it later (`Request.complete`,
from any thread); when a handler raises, `request_failed` completes it the device's way (an
error status) and the device goes on. Completions may come in any order (a split ring's used
ring carries heads).

Locks: the device's register lock (`VirtioDevice._lock`) is never held here; each queue's ring
lock (`Virtqueue.lock`) is held only to take a chain or return one, never across host I/O or a
handler; interrupts are fired with no lock held. Several threads may run rounds of one queue at
once (a worker's helpers, `lend_hand`), up to the device's `concurrency`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmlet.errors import GuestMemoryError, LazyLogger, RateLimitedLog
from kvmlet.virtio.queue import DescriptorChain, VirtqueueError

if TYPE_CHECKING:
    from kvmlet.virtio.device import QueueStats
    from kvmlet.virtio.queue import Virtqueue

log = LazyLogger("kvmlet.virtio.device")

ROUND_REQUESTS = 256
"""Chains one round takes at most (a split ring holds at most 32768; ours 64-256)."""
ROUND_BYTES = 32 << 20
"""Bytes one round moves at most (`bytes_read` plus written); a round always takes one chain."""
SLOW_REQUEST_NS = 50_000
"""When even the quickest of a queue's last SERVICE_SAMPLES requests took longer than this,
its requests wait on the host (a disk, fdatasync) rather than on Python, and a second thread
taking the next one overlaps the waits; below it, handing requests between threads costs more
than it saves. The quickest, not the average: a thread the host preempted once must not make
a fast queue look slow."""
SERVICE_SAMPLES = 4
DEFERRED = object()
"""What `handle_request` returns for a request the device will complete later."""


class Request:
    """A chain taken from queue `queue_index`; the device completes it exactly once."""

    __slots__ = ("chain", "device", "done", "epoch", "queue_index")

    def __init__(self, device: RequestServing, queue_index: int, chain: DescriptorChain, epoch):
        self.device = device
        self.queue_index = queue_index
        self.chain = chain
        self.epoch = epoch
        self.done = False

    def __repr__(self) -> str:
        return f"Request({self.device.name}, queue {self.queue_index}, head {self.chain.head})"

    def complete(self, written: int) -> None:
        """Return the chain to the driver with `written` bytes written into it, and interrupt
        the driver unless it suppressed that (any thread; for DEFERRED requests)."""
        if self.device.complete_request(self, written):
            self.device.signal_used(self.queue_index)


class RequestServing:
    """The serving half of `VirtioDevice` (which provides queues, stats, `running`, `fail`,
    `signal_used`); device models override `handle_request` and maybe `request_failed`."""

    name: str
    concurrency = 1
    """Requests of one queue the device may serve at once, on as many threads."""
    queues: list[Virtqueue]
    queue_stats: list[QueueStats]
    running: bool
    fail: Callable[..., None]
    signal_used: Callable[[int], None]

    def _init_serving(self) -> None:
        self.device_errors = 0
        self.guest_log = RateLimitedLog(log)
        self._service_ns = [[0] * SERVICE_SAMPLES for _ in self.queues]
        self._service_next = [0] * len(self.queues)

    def handle_request(self, request: Request) -> int | object:
        """Serve one request: the bytes written into the chain, or DEFERRED."""
        raise NotImplementedError

    def request_failed(self, request: Request, error: Exception) -> int:
        """The handler raised: complete the request the device's way (the bytes written, e.g.
        an error status). The default writes nothing."""
        return 0

    def serve(self, queue_index: int, lend_hand: Callable[[], None] | None = None) -> bool:
        """One bounded round of queue `queue_index`; True when chains are left for later.

        `lend_hand()`, when given, asks the caller for another thread to run a round of this
        queue too; it is called when more chains wait and this queue's requests are slow
        (SLOW_REQUEST_NS)."""
        queue = self.queues[queue_index]
        requests = moved = 0
        completed = False
        try:
            while requests < ROUND_REQUESTS and moved < ROUND_BYTES:
                if not self.running:
                    return False
                more = False
                with queue.lock:
                    if not queue.active:
                        return False
                    epoch = queue.epoch
                    try:
                        chain = self._take(queue)
                    except (VirtqueueError, GuestMemoryError) as error:
                        chain, broken = None, error
                    else:
                        broken = None
                        if chain is not None:
                            queue.in_flight += 1
                            more = lend_hand is not None and queue.has_available()
                if chain is None:
                    if broken is not None:
                        self.fail(f"queue {queue_index}: {broken}", queue_index, epoch)
                    return False
                if more and min(self._service_ns[queue_index]) > SLOW_REQUEST_NS:
                    lend_hand()  # type: ignore[misc]
                requests += 1
                written = self._run(Request(self, queue_index, chain, epoch), lend_hand is not None)
                if written is not DEFERRED:
                    moved += self.bytes_read(chain) + written  # type: ignore[operator]
                    completed = True
            return True
        finally:
            if completed:
                self.signal_used(queue_index)

    def _take(self, queue: Virtqueue) -> DescriptorChain | None:
        """The next chain (ring lock held); when there is none, ask the driver to kick again
        and look once more, past the barrier, for a chain posted meanwhile."""
        queue.disable_notifications()
        chain = queue.pop()
        if chain is None and queue.enable_notifications():
            chain = queue.pop()
        return chain

    def _run(self, request: Request, measure: bool) -> int | object:
        """Handle one request and complete it unless deferred; with `measure`, keep the
        queue's recent service times (whether lending a hand pays)."""
        started = time.perf_counter_ns() if measure else 0
        broken = None
        try:
            written = self.handle_request(request)
        except (VirtqueueError, GuestMemoryError) as error:  # the driver's fault, found late
            written, broken = self._failed(request, error), error
        except Exception as error:  # a bug of the device: the guest still gets its request
            written = self._failed(request, error)
            self.device_errors += 1
            self.guest_log.error(
                (self.name, type(error)),
                "%s: request on queue %d failed",
                self.name,
                request.queue_index,
                exc_info=True,
            )
        if written is DEFERRED:
            return written
        self.complete_request(request, written)  # type: ignore[arg-type]
        if broken is not None:  # only now: fail() takes the register lock, which a reset
            # holds while it waits for this request
            self.fail(f"queue {request.queue_index}: {broken}", request.queue_index, request.epoch)
        if measure:
            index = request.queue_index
            sample = self._service_next[index]
            self._service_ns[index][sample] = time.perf_counter_ns() - started
            self._service_next[index] = (sample + 1) % SERVICE_SAMPLES
        return written

    def _failed(self, request: Request, error: Exception) -> int:
        try:
            return self.request_failed(request, error)
        except Exception:
            return 0

    def complete_request(self, request: Request, written: int) -> bool:
        """Push a request's chain to the used ring (ring lock held); False when its queue was
        reset since it was taken (the chain belongs to a driver that is gone) or it was
        already completed. The caller signals the driver."""
        queue = self.queues[request.queue_index]
        chain = request.chain
        written = max(0, min(written, chain.writable_length))
        with queue.lock:
            if request.done:
                return False
            request.done = True
            queue.in_flight -= 1
            if not queue.in_flight:
                queue.idle.notify_all()
            if not queue.active or queue.epoch != request.epoch:
                return False
            queue.push(chain.head, written)
            stats = self.queue_stats[request.queue_index]
            stats.requests += 1
            stats.bytes_from_guest += self.bytes_read(chain)
            stats.bytes_to_guest += written
        return True

    def bytes_read(self, chain: DescriptorChain) -> int:
        """Bytes of a completed chain's readable part the device consumed (for the stats)."""
        return chain.readable_length

    def drain(self, timeout: float) -> bool:
        """Wait until no request taken from any queue is still being served; False on
        timeout (register lock held by the caller, ring locks not)."""
        deadline = time.monotonic() + timeout
        for queue in self.queues:
            with queue.lock:
                while queue.in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not queue.idle.wait(remaining):
                        return not queue.in_flight
        return True
