"""virtio-net (virtio 1.2 §5.1) with its data path in Python, between the guest and a backend.

One receive queue (0) and one transmit queue (1); no control queue, since no backend here
needs one (offloads are fixed when the driver starts, the MAC is set by the host, and the
driver's receive filters have nothing to filter: every frame a backend delivers is meant for
this NIC). The configuration space, the feature set and the header live in `config.py`, shared
with a vhost-net data path.

Transmit runs on a doorbell: each round takes at most `TX_CHAINS_PER_WAKEUP` chains,
in batches the backend writes with one call, and completes every chain it takes, whether the
frame went out or was dropped (too short, too big for the MTU, a header that asks for an
offload the driver did not negotiate). More work left, or output the backend could not write,
makes the device wait for the backend's descriptor to be writable and carry on from there.

Receive (receive.py) runs while the backend's descriptor is readable, the driver is running and
the guest has posted buffers; a guest without room holds frames back in the backend.

The data path has two entry points, both on the device's worker thread: `serve` (a round of
a kicked queue) and `backend_ready` (the worker saw the backend's descriptor ready, through the
`ReadinessWatch` given to `connect_backend_watch`). They, and what the driver's register writes
change under them (status, reset, a queue disabled) and `set_link`, are serialised by the
device's data lock (`_data`), taken after the register lock and before a ring lock; the data
path never takes the register lock while it holds the data lock, so what it must report with
it (a broken ring, a lost backend) it reports once it has let go. A peer that goes away takes
the link down: status LINK_UP cleared, a configuration interrupt, one report, and the guest
goes on without a network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from kvmlet.errors import GuestMemoryError, KvmletError, LazyLogger
from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.net.backend import BackendClosed, Frame, NetBackend
from kvmlet.virtio.net.config import (
    DEFAULT_MTU,
    ETHERNET_HEADER_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    VIRTIO_ID_NET,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VLAN_TAG_SIZE,
    broken_dependency,
    config_space,
    device_features,
    tap_offloads,
    transmit_header_ok,
)
from kvmlet.virtio.net.receive import NetReceive
from kvmlet.virtio.queue import DescriptorChain, VirtqueueError, slice_views

log = LazyLogger(__name__)

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 256
# Work one round may do, before the worker serves anything else; what is left goes on at the
# next readiness of the backend (see the module's docstring).
TX_CHAINS_PER_WAKEUP = 128
TX_BATCH_FRAMES = 64
TX_BATCH_BYTES = 256 * 1024


class ReadinessWatch(Protocol):
    """How the device asks its worker to poll the backend (kvmlet.virtio.worker has one)."""

    def want(self, readable: bool, writable: bool) -> None: ...

    def close(self) -> None: ...


class NetCounters:
    """The device's frame counters for the statistics dump."""

    def __init__(self) -> None:
        self.rx_frames = 0
        self.rx_bytes = 0
        self.tx_frames = 0
        self.tx_bytes = 0
        self.rx_stalls = 0  # the guest had no buffer: reading paused until it posted some
        self.rx_dropped_too_big = 0  # bigger than the MTU or than every buffer the guest has
        self.rx_dropped_malformed = 0  # runt, or an offload the guest did not accept
        self.rx_bad_buffers = 0  # chains no frame fits in (no room for the header)
        self.tx_dropped_too_big = 0
        self.tx_dropped_malformed = 0
        self.tx_dropped_link_down = 0
        self.tx_refused = 0  # the backend refused the frame (a tap that is down)
        self.link_changes = 0


class VirtioNet(NetReceive, VirtioDevice):
    """A virtio network device whose frames go through Python to a `NetBackend`."""

    device_id = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(
        self,
        memory: GuestMemory,
        backend: NetBackend,
        mac: bytes,
        mtu: int = DEFAULT_MTU,
        on_link_change: Callable[[bool, str], None] | None = None,
    ):
        self.backend = backend
        self.mac = bytes(mac)
        self.mtu = mtu
        self.link_up = True
        self.counters = NetCounters()
        self.on_link_change = on_link_change
        self._watch: ReadinessWatch | None = None
        self._rx_held: list[DescriptorChain] = []  # receive chains taken for the next frame
        self._rx_stalled = False
        self._tx_more = False  # chains left over when a round's budget ran out
        self._data = threading.RLock()
        self._lost: BackendClosed | None = None  # found on the data path, reported after it
        super().__init__(
            memory,
            [QUEUE_SIZE, QUEUE_SIZE],
            device_features(backend.vnet_header, backend.offloads),
            config_space(self.mac, True, mtu),
        )

    # Wiring and link state ---------------------------------------------------------------------

    def connect_backend_watch(self, watch: ReadinessWatch) -> None:
        """Called once by the wiring: the worker's watch on `backend.fileno()`, whose callback
        is `backend_ready`."""
        with self._data:
            self._watch = watch
            self._update_interest()

    def set_link(self, up: bool, reason: str = "") -> None:
        """Change the link status the guest sees (a configuration interrupt when it changes);
        a link whose backend closed stays down."""
        with self._lock, self._data:
            up = up and not self.backend.closed
            if up == self.link_up:
                return
            self.link_up = up
            self.counters.link_changes += 1
            self.update_config(config_space(self.mac, up, self.mtu))
            self._update_interest()
        message = reason or f"{self.name}: link {'up' if up else 'down'}"
        if self.on_link_change is not None:
            self.on_link_change(up, message)
        else:
            log.warning("%s", message)

    def _backend_lost(self, error: BackendClosed) -> None:
        """Close the backend and take the link down (the data lock not held, or held with the
        register lock)."""
        with self._lock, self._data:
            self._lost = None
            if self.backend.closed:
                return
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            self.backend.close()
        self.set_link(False, f"{self.name}: {error}: link down")

    def _update_interest(self) -> None:
        """Poll the backend for what the device can use now."""
        if self._watch is None:
            return
        usable = self.link_up and self.running
        readable = usable and self.queues[RECEIVE_QUEUE].active and not self._rx_stalled
        writable = usable and (self.backend.blocked or self._tx_more)
        self._watch.want(readable, writable)

    # Snapshots ---------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The device's, plus the link, the receive chains held for the next frame (by head:
        the rings are in guest RAM) and where receive and transmit stopped. Frames inside
        the backend (a tap's queue, passt's socket) stay with the backend."""
        with self._lock:
            return {
                **super().save_state(),
                "link_up": self.link_up,
                "rx_held": [chain.head for chain in self._rx_held],
                "rx_stalled": self._rx_stalled,
                "tx_more": self._tx_more,
            }

    def load_state(self, state: dict) -> None:
        """Take a saved state; held receive chains are walked again from their heads, and a
        running device tells its backend the offloads the driver accepted."""
        with self._lock:
            super().load_state(state)
            queue = self.queues[RECEIVE_QUEUE]
            held = [int(head) for head in state["rx_held"]]
            if held and not queue.active:
                raise ValueError("receive chains held on an inactive queue")
            try:
                self._rx_held = [queue.chain_at(head) for head in held]
            except VirtqueueError as error:
                raise KvmletError(f"a held receive chain: {error}") from None
            self.link_up = bool(state["link_up"])
            self._rx_stalled = bool(state["rx_stalled"])
            self._tx_more = bool(state["tx_more"])
            if self.running:
                self._call_backend(self.backend.set_offloads, tap_offloads(self.driver_features))
            self._update_interest()
        if self.link_up and self.backend.closed:
            self.set_link(False, f"{self.name}: its backend is gone: link down")

    # Feature negotiation and driver state ------------------------------------------------------

    def _features_ok(self) -> bool:
        return super()._features_ok() and broken_dependency(self.driver_features) is None

    def write_status(self, value: int) -> None:
        with self._lock, self._data:
            super().write_status(value)

    def reset(self) -> None:
        with self._lock, self._data:  # no round under way: the held chains are the driver's
            super().reset()

    def activate(self) -> None:
        """DRIVER_OK: the backend gets the offloads, and the worker polls it for frames."""
        self._call_backend(self.backend.set_offloads, tap_offloads(self.driver_features))
        self._update_interest()

    def reset_device(self) -> None:
        self._rx_held.clear()
        self._rx_stalled = self._tx_more = False
        self._call_backend(self.backend.set_offloads, 0)
        self._update_interest()

    def set_queue_ready(self, index: int, ready: bool) -> None:
        with self._lock, self._data:
            if index == RECEIVE_QUEUE and not ready:
                self._rx_held.clear()
            super().set_queue_ready(index, ready)
            self._update_interest()

    def close(self) -> None:
        with self._lock, self._data:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            if not self.backend.closed:
                self.backend.close()
            self._rx_held.clear()
            super().close()

    def _call_backend(self, operation: Callable[..., object], *arguments: object) -> None:
        """A backend operation on the register side (register and data locks held)."""
        if self.backend.closed:
            return
        try:
            operation(*arguments)
        except BackendClosed as error:
            self._backend_lost(error)

    # Entry points --------------------------------------------------------------------------------

    def serve(self, queue_index: int, lend_hand: Callable[[], None] | None = None) -> bool:
        """A round of a kicked queue: transmit what the guest posted, or receive into the
        buffers it posted. Work left over goes on when the backend is ready (never True)."""
        with self._data:
            if not self.running:
                return False
            queue = self.queues[queue_index]
            epoch = queue.epoch
            try:
                if queue_index == TRANSMIT_QUEUE:
                    self._transmit(queue_index)
                elif queue_index == RECEIVE_QUEUE:
                    self._rx_stalled = False
                    self._receive(queue_index)
            except (VirtqueueError, GuestMemoryError) as error:
                broken = error
            else:
                broken = None
            finally:
                self._update_interest()
            lost = self._lost
        self._report(queue_index, epoch, broken, lost)
        return False

    def backend_ready(self, readable: bool, writable: bool, hangup: bool) -> None:
        """The worker saw the backend's descriptor ready (or its peer gone)."""
        queue_index, broken = TRANSMIT_QUEUE, None
        with self._data:
            epoch = self.queues[queue_index].epoch
            try:
                if writable and self.running:
                    self.counters.tx_refused += self.backend.flush()
                    self._transmit(TRANSMIT_QUEUE)
                queue_index = RECEIVE_QUEUE
                epoch = self.queues[queue_index].epoch
                if (readable or hangup) and self.running:
                    self._receive(RECEIVE_QUEUE)
                if hangup:  # what the peer sent before it went is delivered: now it is gone
                    raise BackendClosed(f"{self.backend.description} hung up")
            except BackendClosed as error:
                self._lost = self._lost or error  # the first cause is the one reported
            except (VirtqueueError, GuestMemoryError) as error:
                broken = error
            finally:
                self._update_interest()
            lost = self._lost
        self._report(queue_index, epoch, broken, lost)

    def _report(
        self,
        queue_index: int,
        epoch: int,
        broken: Exception | None,
        lost: BackendClosed | None,
    ) -> None:
        """What the data path found, reported with the data lock let go (both take the
        register lock)."""
        if broken is not None:
            self.fail(f"queue {queue_index}: {broken}", queue_index, epoch)
        if lost is not None:
            self._backend_lost(lost)

    # Transmit ------------------------------------------------------------------------------------

    def _transmit(self, queue_index: int) -> None:
        """Send what the guest posted, at most `TX_CHAINS_PER_WAKEUP` chains of it; every chain
        taken is completed, even when the ring turns out broken behind it."""
        queue = self.queues[queue_index]
        stats = self.queue_stats[queue_index]
        budget = TX_CHAINS_PER_WAKEUP
        broken = None
        while budget and broken is None and not (self.backend.blocked and self.link_up):
            chains: list[DescriptorChain] = []
            frames: list[Frame] = []
            batch_bytes = 0
            with queue.lock:
                if not queue.active:
                    break
                epoch = queue.epoch
                queue.disable_notifications()
                try:
                    while len(chains) < min(budget, TX_BATCH_FRAMES):
                        if batch_bytes >= TX_BATCH_BYTES:
                            break
                        chain = queue.pop()
                        if chain is None:
                            break
                        chains.append(chain)
                        frame = self._outgoing_frame(chain)
                        if frame is not None:
                            frames.append(frame)
                            batch_bytes += chain.readable_length
                    again = not chains and queue.enable_notifications()
                except (VirtqueueError, GuestMemoryError) as error:
                    broken, again = error, False
            if not chains:
                if again:
                    continue
                break
            try:
                self._send(frames)
            finally:
                with queue.lock:
                    if queue.active and queue.epoch == epoch:
                        for chain in chains:
                            queue.push(chain.head, 0)
                stats.requests += len(chains)
                stats.bytes_from_guest += sum(chain.readable_length for chain in chains)
                budget -= len(chains)
        # Out of budget with chains perhaps left: carry on when the backend can take more.
        self._tx_more = budget == 0 and self.link_up
        self.signal_used(queue_index)
        if broken is not None:
            raise broken

    def _send(self, frames: list[Frame]) -> None:
        if not frames:
            return
        if not self.link_up or self._lost is not None:
            self.counters.tx_dropped_link_down += len(frames)
            return
        try:
            refused = self.backend.send(frames)
        except BackendClosed as error:
            self.counters.tx_dropped_link_down += len(frames)
            self._lost = error
            return
        self.counters.tx_refused += refused
        self.counters.tx_frames += len(frames) - refused
        sent = sum(sum(len(part) for part in frame) for frame in frames)
        self.counters.tx_bytes += sent - (
            HEADER_SIZE * len(frames) if self.backend.vnet_header else 0
        )

    def _outgoing_frame(self, chain: DescriptorChain) -> Frame | None:
        """The buffers of the frame a transmit chain carries, as the backend takes it, or None
        (counted) for a frame that must not go out."""
        total = chain.readable_length
        frame_length = total - HEADER_SIZE
        if frame_length < MIN_FRAME_SIZE:
            self.counters.tx_dropped_malformed += 1
            return None
        first = chain.first_view
        header = first[:HEADER_SIZE] if len(first) >= HEADER_SIZE else chain.read(0, HEADER_SIZE)
        flags, gso_type, _, gso_size, csum_start, csum_offset, _ = HEADER.unpack(header)
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and csum_start + csum_offset + 2 > frame_length:
            self.counters.tx_dropped_malformed += 1
            return None
        if not transmit_header_ok(self.driver_features, flags, gso_type, gso_size):
            self.counters.tx_dropped_malformed += 1
            return None
        if frame_length > (MAX_FRAME_SIZE if gso_type else self._largest_plain_frame()):
            self.counters.tx_dropped_too_big += 1
            return None
        start = 0 if self.backend.vnet_header else HEADER_SIZE
        return slice_views(chain.readable_views, start, total)

    def _largest_plain_frame(self) -> int:
        """The largest frame without segmentation either way: the MTU, once negotiated."""
        if self.negotiated(VIRTIO_NET_F_MTU):
            return self.mtu + ETHERNET_HEADER_SIZE + VLAN_TAG_SIZE
        return MAX_FRAME_SIZE

    # Statistics ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Read without a lock, as every device's (a busy data path answers at once)."""
        stats = super().stats()
        stats["link_up"] = self.link_up
        stats["backend"] = self.backend.description
        stats["net"] = {
            **vars(self.counters),
            "rx_dropped_from_peer": self.backend.dropped_from_peer,
        }
        return stats
