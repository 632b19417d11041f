"""virtio-net's receive path: frames from the backend into the buffers the guest posted.

Receive runs while the backend's descriptor is readable, the driver is running and the guest
has posted buffers: each frame goes into one chain, or with VIRTIO_NET_F_MRG_RXBUF into as many
chains as it needs (`num_buffers` in the header). When the guest has no room, the frame stays in
the backend and the device stops polling it until the guest kicks the receive queue: the peer
sees backpressure, nothing is dropped. A frame no guest buffer could take is dropped and counted.

These are `VirtioNet`'s methods (device.py), run on its data path with the data lock held.
"""

from __future__ import annotations

import struct

from kvmlet.virtio.net.backend import BackendClosed
from kvmlet.virtio.net.config import (
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_GSO_NONE,
    ZERO_HEADER,
    receive_header_ok,
)

# Frames one round may deliver before the worker serves anything else; the rest goes on at the
# next readiness of the backend.
RX_FRAMES_PER_WAKEUP = 64

NUM_BUFFERS = struct.Struct("<H")


class NetReceive:
    """The receive half of `VirtioNet`'s data path (a base class of it)."""

    def _receive(self, queue_index: int) -> None:
        """Move frames from the backend into the guest's buffers while both have some."""
        queue = self.queues[queue_index]
        if not (self.link_up and queue.active) or self._rx_stalled or self._lost is not None:
            return
        with queue.lock:
            queue.disable_notifications()
        try:
            for _ in range(RX_FRAMES_PER_WAKEUP):
                frame = self.backend.receive()
                if frame is None:
                    break
                if not self._deliver(queue_index, frame):
                    self._rx_stalled = True
                    self.counters.rx_stalls += 1
                    break
                self.backend.consume()
        except BackendClosed as error:
            self._lost = error
        finally:
            self.signal_used(queue_index)

    def _deliver(self, queue_index: int, frame: memoryview) -> bool:
        """Copy one frame into receive chains, or drop it (counted); False when the guest has
        not posted room for it yet."""
        header_length = HEADER_SIZE if self.backend.vnet_header else 0
        payload = frame[header_length:]
        header = self._incoming_header(frame[:header_length], len(payload))
        if header is None:
            return True
        needed = HEADER_SIZE + len(payload)
        room = self._take_room(queue_index, needed)
        if room is None:
            return False
        if not room:
            self.counters.rx_dropped_too_big += 1
            return True
        held, used, room = self._rx_held, 0, 0
        while room < needed:
            room += held[used].writable_length
            used += 1
        NUM_BUFFERS.pack_into(header, NUM_BUFFERS_OFFSET, used)
        queue, stats = self.queues[queue_index], self.queue_stats[queue_index]
        held[0].write(header)
        copied, total, skip = 0, len(payload), HEADER_SIZE
        lengths = []
        for chain in held[:used]:
            written = skip
            for view in chain.writable_views:  # straight into each buffer: no slicing helper
                if skip >= len(view):
                    skip -= len(view)
                    continue
                count = min(len(view) - skip, total - copied)
                view[skip : skip + count] = payload[copied : copied + count]
                copied += count
                written += count
                skip = 0
                if copied == total:
                    break
            skip = 0
            lengths.append(written)
        with queue.lock:
            for chain, written in zip(held, lengths, strict=False):
                queue.push(chain.head, written)
        del held[:used]
        stats.requests += used
        stats.bytes_to_guest += needed
        self.counters.rx_frames += 1
        self.counters.rx_bytes += len(payload)
        return True

    def _take_room(self, queue_index: int, needed: int) -> bool | None:
        """Hold receive chains until they have `needed` bytes of room: True when they do, None
        when the guest has posted too few so far, False when no chain set ever could (one
        chain without mergeable buffers, or the whole ring)."""
        queue = self.queues[queue_index]
        held = self._rx_held
        limit = queue.size if self.negotiated(VIRTIO_NET_F_MRG_RXBUF) else 1
        room = sum(chain.writable_length for chain in held)
        with queue.lock:
            while room < needed:
                if len(held) >= limit:
                    return False
                chain = queue.pop()
                if chain is None:
                    if queue.enable_notifications():
                        continue
                    return None
                if chain.writable_length < (HEADER_SIZE + MIN_FRAME_SIZE if not held else 1):
                    queue.push(chain.head, 0)  # no frame fits: give it back empty
                    self.counters.rx_bad_buffers += 1
                    continue
                held.append(chain)
                room += chain.writable_length
        return True

    def _incoming_header(self, vnet_header: memoryview, payload_length: int) -> bytearray | None:
        """The header the guest gets with a frame, or None (counted) for a frame it must not
        get: a runt, a frame above the MTU, or offloads the driver did not accept."""
        if payload_length < MIN_FRAME_SIZE:
            self.counters.rx_dropped_malformed += 1
            return None
        if not vnet_header:
            header, gso_type = bytearray(ZERO_HEADER), VIRTIO_NET_HDR_GSO_NONE
        else:
            header = bytearray(vnet_header)
            flags, gso_type = header[0], header[1]
            if not self.negotiated(VIRTIO_NET_F_GUEST_CSUM):
                header[0] = flags = flags & ~VIRTIO_NET_HDR_F_DATA_VALID
            if not receive_header_ok(self.driver_features, flags, gso_type):
                self.counters.rx_dropped_malformed += 1
                return None
        if payload_length > (MAX_FRAME_SIZE if gso_type else self._largest_plain_frame()):
            self.counters.rx_dropped_too_big += 1
            return None
        return header
