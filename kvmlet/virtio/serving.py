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
once (a worker's helpers, `lend_hand`, asked for when more chains wait behind a request the
device says may block on the host: `may_block`), up to the device's `concurrency`.
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

    def handle_request(self, request: Request) -> int | object:
        """Serve one request: the bytes written into the chain, or DEFERRED."""
        raise NotImplementedError

    def request_failed(self, request: Request, error: Exception) -> int:
        """The handler raised: complete the request the device's way (the bytes written, e.g.
        an error status). The default writes nothing."""
        return 0

    def may_block(self, chain: DescriptorChain) -> bool:
        """Whether serving `chain` may wait on the host (a disk, fdatasync, a remote file
        system) rather than run Python: then another thread should take the chains behind it.
        A hint, read before `handle_request`; the default says no."""
        return False

    def serve(self, queue_index: int, lend_hand: Callable[[], None] | None = None) -> bool:
        """One bounded round of queue `queue_index`; True when chains are left for later.

        `lend_hand()`, when given, asks the caller for another thread to run a round of this
        queue too; it is called when more chains wait behind one that `may_block`."""
        if not self.running:
            return False
        queue = self.queues[queue_index]
        lock = queue.lock
        requests = moved = 0
        broken = None
        try:
            while requests < ROUND_REQUESTS and moved < ROUND_BYTES:
                with lock:
                    if not queue.active:
                        return False
                    epoch = queue.epoch
                    try:
                        if not requests:
                            queue.disable_notifications()
                        chain = queue.pop()
                        if chain is None and queue.enable_notifications():
                            chain = queue.pop()
                    except (VirtqueueError, GuestMemoryError) as error:
                        broken = error
                        return False
                    if chain is None:
                        return False
                    queue.in_flight += 1
                    more = lend_hand is not None and queue.has_available()
                if more and self.may_block(chain):
                    lend_hand()  # type: ignore[misc]
                requests += 1
                request = Request(self, queue_index, chain, epoch)
                try:
                    written = self.handle_request(request)
                except Exception as error:
                    written = self._handler_raised(request, error)
                if written is not DEFERRED:
                    consumed = self.bytes_read(chain)
                    self.complete_request(request, written, consumed)  # type: ignore[arg-type]
                    moved += consumed + written  # type: ignore[operator]
            return True
        finally:
            if broken is not None:  # outside the ring lock: fail() takes the register lock
                self.fail(f"queue {queue_index}: {broken}", queue_index, epoch)
            if requests:
                self.signal_used(queue_index)

    def _handler_raised(self, request: Request, error: Exception) -> int:
        """Complete the request the device's way after its handler raised: the driver's fault
        found late (also NEEDS_RESET) or a bug of the device (logged, counted)."""
        try:
            written = self.request_failed(request, error)
        except Exception:
            written = 0
        if isinstance(error, (VirtqueueError, GuestMemoryError)):
            self.complete_request(request, written, 0)
            # Only now: fail() takes the register lock, which a reset holds while it waits for
            # this request to complete.
            self.fail(f"queue {request.queue_index}: {error}", request.queue_index, request.epoch)
            return DEFERRED  # type: ignore[return-value]  # completed already
        self.device_errors += 1
        self.guest_log.error(
            (self.name, type(error)),
            "%s: request on queue %d failed",
            self.name,
            request.queue_index,
            exc_info=True,
        )
        return written

    def complete_request(self, request: Request, written: int, consumed: int | None = None) -> bool:
        """Push a request's chain to the used ring (ring lock held); False when its queue was
        reset since it was taken (the chain belongs to a driver that is gone) or it was
        already completed. `consumed` is what the device read (default `bytes_read`). The
        caller signals the driver."""
        queue = self.queues[request.queue_index]
        chain = request.chain
        if written > chain.writable_length:
            written = chain.writable_length
        if consumed is None:
            consumed = self.bytes_read(chain)
        went_idle = None
        with queue.lock:
            if request.done:
                return False
            request.done = True
            queue.in_flight -= 1
            if not queue.in_flight:
                if queue.draining:
                    queue.idle.notify_all()
                went_idle, queue.on_idle = queue.on_idle, None
            if queue.active and queue.epoch == request.epoch:
                queue.push(chain.head, written)
                stats = self.queue_stats[request.queue_index]
                stats.requests += 1
                stats.bytes_from_guest += consumed
                stats.bytes_to_guest += written
                return True
        if went_idle is not None:
            went_idle()
        return False

    def bytes_read(self, chain: DescriptorChain) -> int:
        """Bytes of a completed chain's readable part the device consumed (for the stats)."""
        return chain.readable_length

    def when_idle(self, queue_index: int, callback: Callable[[], None]) -> None:
        """Call `callback()` once no request of the queue is in flight: now, or when the last
        one completes (on that thread). For releasing what requests in flight still use."""
        queue = self.queues[queue_index]
        with queue.lock:
            if queue.in_flight:
                queue.on_idle = callback
                return
        callback()

    def drain(self, timeout: float) -> bool:
        """Wait until no request taken from any queue is still being served; False on
        timeout (register lock held by the caller, ring locks not)."""
        deadline = time.monotonic() + timeout
        for queue in self.queues:
            with queue.lock:
                queue.draining += 1
                try:
                    while queue.in_flight:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or not queue.idle.wait(remaining):
                            return not queue.in_flight
                finally:
                    queue.draining -= 1
        return True
