"""virtio-vsock (virtio 1.2 §5.10) served by the kernel's vhost-vsock: the host reaches the
guest with `socket(AF_VSOCK)` at (CID, port), the guest reaches the host at CID 2.

Queues 0 (rx) and 1 (tx) are the kernel's; the event queue (2) stays with the device, which
has no event to send (they announce a transport reset after migration). The configuration
space is the guest's CID.
"""

from __future__ import annotations

import errno
import socket
import time

from kvmlet.errors import KvmletError
from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import TRANSPORT_FEATURES, VhostDevice
from kvmlet.vhost.kernel import KernelVhostVsock

VIRTIO_ID_VSOCK = 19
QUEUE_SIZE = 128
"""As QEMU's vhost-vsock-pci."""
MSIX_VECTORS = 3
"""As QEMU's vhost-vsock-pci (`vectors`): fewer than the 3 queues and configuration need, so
Linux's driver shares one vector among its queues. Its queues' callbacks only schedule work,
so separate vectors buy nothing; a shared one lets the kernel's tx and rx calls, made close
together, reach the guest as one interrupt (KVM coalesces an MSI already pending) instead of
two guest wake-ups per round trip."""
VIRTIO_VSOCK_F_SEQPACKET = 1
HOST_CID = 2
CONNECT_RETRY_INTERVAL = 0.05
_NOT_YET = (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT)
"""A guest with nothing listening yet resets the connection; one whose driver has not started
lets it time out (vsock's own 2 s)."""


def vsock_device(
    memory: GuestMemory, cid: int, queue_size: int = QUEUE_SIZE, path: str | None = None
) -> VhostDevice:
    """The guest's virtio-vsock at context id `cid`; VhostError (one line) when the host has
    no /dev/vhost-vsock or another VM holds the CID."""
    frontend = KernelVhostVsock(cid, path=path)
    try:
        device = VhostDevice(
            memory,
            frontend,
            name="vhost-vsock",
            device_id=VIRTIO_ID_VSOCK,
            queue_sizes=[queue_size] * 3,
            backend_queues=2,
            features_mask=TRANSPORT_FEATURES | 1 << VIRTIO_VSOCK_F_SEQPACKET,
            config=cid.to_bytes(8, "little"),
        )
    except BaseException:
        frontend.close()
        raise
    device.msix_vectors = MSIX_VECTORS
    return device


def connect_to_guest(cid: int, port: int, timeout: float = 10.0) -> socket.socket:
    """A stream connection to `port` of the guest at `cid`, waiting up to `timeout` seconds
    for something in the guest to listen there (a guest without a listener refuses at once);
    KvmletError when nothing did."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.connect((cid, port))
        except OSError as error:
            sock.close()
            retry = error.errno in _NOT_YET
            if not retry or time.monotonic() >= deadline:
                reason = (error.strerror or str(error)).lower()
                raise KvmletError(f"cannot connect to vsock {cid}:{port}: {reason}") from None
            time.sleep(CONNECT_RETRY_INTERVAL)
            continue
        sock.settimeout(None)
        return sock
