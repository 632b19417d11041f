"""virtio-9p: a 9P2000.L server's transport (virtio device id 9, Linux's `trans=virtio`).

The device has one request queue. Each chain is one request: the T-message in its readable
buffers, room for the R-message in its writable ones; the used length is the reply's. With
VIRTIO_9P_MOUNT_TAG the configuration space holds the tag the guest mounts by: a 16-bit length
and that many bytes, not NUL-terminated (`struct virtio_9p_config`).

The file server is given, not built here (`kvmlet.ninep.Server` in the machine's wiring): all
the device needs is `handle(readable, writable) -> reply length`, a self-contained call that is
safe on several threads at once, plus `reset()`, `close()` and `stats()`. Linux's data pages
arrive as buffers of their own, so reads and writes move between guest memory and the file
directly.

Requests wait on the host's file system, and one may wait long (a read of a FIFO, a lock), so
up to `concurrency` requests are served at once, each on a thread of the device's worker, and
each completes when its reply is ready, in whatever order (the driver matches replies by tag,
and a Tflush is answered while the request it names is still served). A request that finishes
after the driver reset the device is dropped, not pushed into the new driver's ring; the
server is reset once every request in flight has finished.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.queue import DescriptorChain
from kvmlet.virtio.serving import Request

VIRTIO_ID_9P = 9
VIRTIO_9P_MOUNT_TAG = 0
QUEUE_SIZE = 128
"""Linux's 9p transport never has more than 128 buffers in one request (VIRTQUEUE_NUM)."""
MAX_TAG_BYTES = 255
_TAG_LENGTH = struct.Struct("<H")


class NinePServer(Protocol):
    """What the device needs of a 9P server (`kvmlet.ninep.Server` is one)."""

    def handle(self, readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        """Serve the request in `readable`, write the reply into `writable`, return its length;
        never raises."""

    def reset(self) -> None:
        """Forget the session: the driver reset the device."""

    def close(self) -> None:
        """Release the server's host resources."""

    def stats(self) -> dict[str, int]:
        """Counters for the statistics dump."""


def check_tag(tag: str) -> bytes:
    """The tag as the configuration space carries it; a KvmletError for one the guest could not
    mount by (empty, too long, a NUL or a comma in it)."""
    encoded = tag.encode()
    if not encoded or len(encoded) > MAX_TAG_BYTES or b"\0" in encoded or b"," in encoded:
        raise KvmletError(f"9p mount tag {tag!r}: 1 to {MAX_TAG_BYTES} bytes, no NUL or comma")
    return encoded


class Virtio9p(VirtioDevice):
    """A virtio-9p device serving one 9P server under one mount tag."""

    device_id = VIRTIO_ID_9P
    name = "virtio-9p"
    concurrency = 4
    """Requests in flight at once: Linux's 9p client keeps several (one per task waiting on
    the share), a blocked one must not hold up the rest, and each takes a host thread."""

    def __init__(self, memory: GuestMemory, tag: str, server: NinePServer):
        encoded = check_tag(tag)
        self.tag = tag
        self.server = server
        config = _TAG_LENGTH.pack(len(encoded)) + encoded
        super().__init__(memory, [QUEUE_SIZE], 1 << VIRTIO_9P_MOUNT_TAG, config)
        for queue in self.queues:  # the server takes views of the buffers, never an iovec
            queue.wants_iovec = False

    def handle_request(self, request: Request) -> int:
        chain = request.chain
        return self.server.handle(chain.readable_views, chain.writable_views)

    def may_block(self, chain: DescriptorChain) -> bool:
        """Every 9P request may wait on the host's file system."""
        return True

    def save_state(self) -> dict[str, object]:
        """The device's state, while the guest has no 9P session: a session's fids are open
        host files and walked paths, which a snapshot cannot carry (QEMU refuses to migrate
        a mounted virtio-9p for the same reason). KvmletError while one is open."""
        server = self.server.stats()
        if server.get("fids") or server.get("msize"):
            raise KvmletError(
                f"the guest has the 9p share {self.tag!r} mounted ({server.get('fids', 0)} "
                "fids open): its open files cannot be saved; unmount it first"
            )
        return super().save_state()

    def reset_device(self) -> None:
        self.server.reset()

    def close(self) -> None:
        super().close()
        self.server.close()

    def stats(self) -> dict[str, object]:
        stats = super().stats()
        stats["server"] = self.server.stats()
        return stats
