"""virtio-rng (virtio 1.2 §5.4): entropy from the host's getrandom(2).

The single request queue carries writable buffers; each chain is filled with random bytes, at
most `MAX_BYTES_PER_REQUEST` of them, so one request cannot make the monitor produce gigabytes.
"""

from __future__ import annotations

import os

from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.serving import Request

VIRTIO_ID_ENTROPY = 4
QUEUE_SIZE = 64
MAX_BYTES_PER_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    """A virtio entropy device."""

    device_id = VIRTIO_ID_ENTROPY
    name = "virtio-rng"

    def __init__(self, memory: GuestMemory):
        super().__init__(memory, [QUEUE_SIZE], 0, b"")

    def handle_request(self, request: Request) -> int:
        chain = request.chain
        wanted = min(chain.writable_length, MAX_BYTES_PER_REQUEST)
        return chain.write(os.getrandom(wanted)) if wanted else 0
