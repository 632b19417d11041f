"""virtio-console (virtio 1.2 §5.3) with a single port: the guest's hvc0.

Queue 0 (receiveq) carries host input into buffers the guest posted; queue 1 (transmitq)
carries guest output, handed to `on_output` once per chain (in 64 KiB pieces for a huge one),
at most `MAX_OUTPUT_PER_CHAIN` bytes of it: descriptors may all point at the same big buffer,
and what the console moves must not grow with how often the guest repeats one address (the
rest is dropped and counted). There is no multiport support. Host input arrives through
`receive()` from a terminal thread: what cannot be delivered yet (the guest has posted no
buffer, or is not running) waits in a bounded pending buffer, and is delivered when the guest
posts receive buffers.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from kvmlet.errors import GuestMemoryError
from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.queue import DescriptorChain, VirtqueueError
from kvmlet.virtio.serving import Request

VIRTIO_ID_CONSOLE = 3
VIRTIO_CONSOLE_F_SIZE = 0

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 128
MAX_PENDING_INPUT = 64 * 1024
MAX_OUTPUT_CHUNK = 64 * 1024
MAX_OUTPUT_PER_CHAIN = 1 << 20

# cols, rows, max_nr_ports, emerg_wr.
_CONFIG = struct.Struct("<HHII")


class VirtioConsole(VirtioDevice):
    """A one-port virtio console between the guest's hvc0 and a host callback."""

    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(
        self,
        memory: GuestMemory,
        on_output: Callable[[bytes], None],
        columns: int = 80,
        rows: int = 25,
    ):
        self.on_output = on_output
        self._pending_input = bytearray()
        self._input_lock = threading.Lock()
        self.output_dropped = 0
        super().__init__(
            memory,
            [QUEUE_SIZE, QUEUE_SIZE],
            1 << VIRTIO_CONSOLE_F_SIZE,
            _CONFIG.pack(columns, rows, 1, 0),
        )

    @property
    def pending_input(self) -> int:
        """Host input bytes accepted but not yet delivered to the guest."""
        return len(self._pending_input)

    def resize(self, columns: int, rows: int) -> None:
        """The host terminal changed size: tell the guest through a config change."""
        self.update_config(_CONFIG.pack(columns & 0xFFFF, rows & 0xFFFF, 1, 0))

    def receive(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted (not dropped)."""
        with self._input_lock:
            accepted = min(len(data), MAX_PENDING_INPUT - len(self._pending_input))
            self._pending_input += data[:accepted]
        self._deliver_input()
        return accepted

    def save_state(self) -> dict[str, object]:
        """The device's, plus host input accepted and not yet delivered."""
        with self._lock:
            return {**super().save_state(), "pending_input": bytes(self._pending_input)}

    def load_state(self, state: dict) -> None:
        with self._lock:
            super().load_state(state)
            self._pending_input = bytearray(bytes(state["pending_input"])[:MAX_PENDING_INPUT])

    def activate(self) -> None:
        self._deliver_input()

    def serve(self, queue_index: int, lend_hand: Callable[[], None] | None = None) -> bool:
        if queue_index == TRANSMIT_QUEUE:
            return super().serve(queue_index, lend_hand)
        self._deliver_input()  # the guest posted receive buffers
        return False

    def handle_request(self, request: Request) -> int:
        chain = request.chain
        total = min(chain.readable_length, MAX_OUTPUT_PER_CHAIN)
        for start in range(0, total, MAX_OUTPUT_CHUNK):
            self.on_output(chain.read(start, min(total, start + MAX_OUTPUT_CHUNK)))
        self.output_dropped += chain.readable_length - total
        return 0

    def bytes_read(self, chain: DescriptorChain) -> int:
        return min(chain.readable_length, MAX_OUTPUT_PER_CHAIN)

    def _deliver_input(self) -> None:
        """Move pending input into the receive buffers the guest posted (any thread; lock
        order: register lock, input lock, ring lock)."""
        queue = self.queues[RECEIVE_QUEUE]
        stats = self.queue_stats[RECEIVE_QUEUE]
        delivered, broken = False, None
        with self._input_lock:
            if not self._pending_input or not self.running:
                return
            with queue.lock:
                epoch = queue.epoch
                try:
                    while self._pending_input and queue.active:
                        chain = queue.pop()
                        if chain is None and not queue.enable_notifications():
                            break
                        if chain is None:
                            continue
                        written = chain.write(self._pending_input)
                        del self._pending_input[:written]
                        queue.push(chain.head, written)
                        stats.requests += 1
                        stats.bytes_to_guest += written
                        delivered = True
                except (VirtqueueError, GuestMemoryError) as error:
                    broken = error
        if broken is not None:
            self.fail(f"queue {RECEIVE_QUEUE}: {broken}", RECEIVE_QUEUE, epoch)
        if delivered:
            self.signal_used(RECEIVE_QUEUE)

    def stats(self) -> dict[str, object]:
        return {**super().stats(), "output_dropped": self.output_dropped}
