"""virtio-console (virtio 1.2 §5.3) with a single port: the guest's hvc0.

Queue 0 (receiveq) carries host input into buffers the guest posted; queue 1 (transmitq)
carries guest output, handed to `on_output` once per chain (in 64 KiB pieces for a huge one).
There is no multiport support. Host input arrives through `receive()` from a terminal
thread: what cannot be delivered yet (the guest has posted no buffer, or is not running) waits
in a bounded pending buffer, and is delivered when the guest posts receive buffers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.queue import DescriptorChain

VIRTIO_ID_CONSOLE = 3
VIRTIO_CONSOLE_F_SIZE = 0

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 128
MAX_PENDING_INPUT = 64 * 1024
MAX_OUTPUT_CHUNK = 64 * 1024

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
        with self._lock:
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

    def queue_notified(self, queue_index: int) -> None:
        if queue_index == TRANSMIT_QUEUE:
            self.process_available(TRANSMIT_QUEUE, self._transmit)
        else:
            self._deliver_input()

    def _transmit(self, chain: DescriptorChain) -> int:
        total = chain.readable_length
        for start in range(0, total, MAX_OUTPUT_CHUNK):
            self.on_output(chain.read(start, min(total, start + MAX_OUTPUT_CHUNK)))
        return 0

    def _deliver_input(self) -> None:
        queue = self.queues[RECEIVE_QUEUE]
        if self._pending_input and self.running and queue.active:
            self.guarded(RECEIVE_QUEUE, self._fill_receive_buffers)

    def _fill_receive_buffers(self, queue_index: int) -> None:
        queue = self.queues[queue_index]
        stats = self.queue_stats[queue_index]
        while self._pending_input:
            chain = queue.pop()
            if chain is None:
                if not queue.enable_notifications():
                    break
                continue
            written = chain.write(self._pending_input)
            del self._pending_input[:written]
            queue.push(chain.head, written)
            stats.requests += 1
            stats.bytes_to_guest += written
        self.signal_used(queue_index)
