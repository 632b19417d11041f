"""A virtio device whose data path is a vhost backend: Python keeps the control plane only.

`VhostDevice` is a `VirtioDevice` (features, status, config space, queue registers, so any
transport serves it) that never pops a descriptor. When the driver sets DRIVER_OK it hands
every ready queue to its `VhostFrontend`: the negotiated features, the memory table, then per
queue its size, base (the next available index), the host addresses of its rings (validated by
`Virtqueue.activate` first) and three eventfds the device owns:

- kick: the queue's doorbell. The wiring registers it with the transport (`add_doorbell`), so
  KVM signals it on the guest's notify write and the backend wakes without Python; a kick that
  does reach Python (`notify`) is passed on to it. It is never a worker's doorbell (the backend
  reads it): `connect_kick` refuses a backend queue.
- call: the queue's interrupt (`call_eventfd`, a `CallEventfd`). The backend signals it when
  it used buffers (it applied the driver's suppression itself). virtio-pci binds it to the
  queue's MSI-X vector as a KVM irqfd while that vector is enabled and unmasked; otherwise the
  device's worker watches it (`connect_worker`) and `relay_call` raises the transport's queue
  interrupt (a masked vector's pending bit, INTx, virtio-mmio).
- err: the backend found the ring broken; watched too, it puts the device in NEEDS_RESET.

A driver reset, and a queue disabled (virtio-mmio), takes the rings back with GET_VRING_BASE
(after `stop`), then `reset` returns the backend to its initial state; the next DRIVER_OK hands
them over again with the features the driver accepted then. The configuration space is the
backend's (GET_CONFIG, refreshed at each reset, writes forwarded with SET_CONFIG) when the
device asks for `config_size` bytes from it, else the `config` the caller built.

A backend that fails, refuses a request or goes away (`check_backend`, called when the
frontend's `fileno()` is readable) puts the device in DEVICE_NEEDS_RESET with a configuration
interrupt; the guest keeps running and kvmlet logs it once (again only after the backend has
worked since). During a reset the status stays 0, as the driver waits for it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError, LazyLogger
from kvmlet.memory import GuestMemory
from kvmlet.vhost.frontend import VhostError, VhostFrontend, VringAddresses, memory_table
from kvmlet.virtio.call import CallEventfd
from kvmlet.virtio.device import (
    COMMON_FEATURES,
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    VIRTIO_F_VERSION_1,
    InterruptKind,
    VirtioDevice,
)
from kvmlet.virtio.queue import DESCRIPTOR_SIZE

if TYPE_CHECKING:
    from kvmlet.virtio.worker import QueueWorker

log = LazyLogger(__name__)

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
RING_STATE_ONLY = {
    VIRTIO_ID_NET: "frames the backend holds are the network's (it may drop any)",
    VIRTIO_ID_BLOCK: "GET_VRING_BASE has the backend finish its requests in flight first",
}
"""Device types whose backend keeps nothing the guest relies on but its rings, so a snapshot
carries them: the rings' positions (GET_VRING_BASE, then SET_VRING_BASE into the backend of
the restored machine) and the rest in guest RAM. Others are refused: a vhost-vsock's
connections live in the host kernel, a vhost-user-fs daemon's FUSE session (inode numbers,
open files) in the daemon, and neither can be saved from here."""
TRANSPORT_FEATURES = COMMON_FEATURES
"""Ring features a backend may offer the driver: VERSION_1, EVENT_IDX, INDIRECT_DESC (no
packed rings: the queues are validated as split rings before the backend gets them)."""


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class VhostDevice(VirtioDevice):
    """A virtio device served by a vhost backend (vhost-user daemon or kernel vhost)."""

    def __init__(
        self,
        memory: GuestMemory,
        frontend: VhostFrontend,
        *,
        name: str,
        device_id: int,
        queue_sizes: Sequence[int],
        backend_queues: int | None = None,
        features_mask: int = TRANSPORT_FEATURES,
        own_features: int = 0,
        config: bytes = b"",
        config_size: int = 0,
    ):
        """`backend_queues`: the first that many queues go to the backend (default all; the
        rest stay idle with the device). The driver is offered the backend's features within
        `features_mask`, plus `own_features` the device implements itself. `config_size`
        takes that many bytes of configuration space from a backend that keeps one
        (vhost-user's CONFIG); otherwise the device shows `config`. Once made, the device owns
        `frontend` (`close` closes it)."""
        backend_queues = len(queue_sizes) if backend_queues is None else backend_queues
        if not 0 < backend_queues <= len(queue_sizes):
            raise ValueError(f"{name}: {backend_queues} backend queues of {len(queue_sizes)}")
        if frontend.max_vrings is not None and frontend.max_vrings < backend_queues:
            raise VhostError(
                f"{name}: the backend serves {frontend.max_vrings} queues, "
                f"the device needs {backend_queues}"
            )
        if frontend.needs_memory_fds and not memory.shareable:
            raise VhostError(f"{name}: a vhost-user backend needs guest RAM in a memfd")
        offered = frontend.guest_features() & features_mask
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise VhostError(f"{name}: the backend does not offer VIRTIO_F_VERSION_1")
        backend_config = frontend.read_config(config_size) if config_size else None
        if backend_config is not None:
            config = backend_config
        elif config_size and not config:
            raise VhostError(f"{name}: the backend does not give its configuration space")
        super().__init__(memory, list(queue_sizes), 0, config)
        self.name = name
        self.device_id = device_id
        self.device_features = offered | own_features
        self.frontend = frontend
        self.backend_queues = backend_queues
        self.backend_error: str | None = None
        self.vring_bases: dict[int, int] = {}
        # Bytes of configuration space the backend keeps (0: the device shows its own).
        self._config_size = config_size if backend_config is not None else 0
        self._handed: set[int] = set()
        self._paused_rings: list[int] = []
        self._started = False
        self._log_failure = True
        self._kick_fds: list[int] = []
        self._err_fds: list[int] = []
        self.calls: list[CallEventfd] = []
        try:
            for fds in (self._kick_fds, self._err_fds):
                fds.extend(_eventfd() for _ in range(backend_queues))
            for index in range(backend_queues):
                relay = functools.partial(self.relay_call, index)
                self.calls.append(CallEventfd(f"{name} queue {index}", relay))
        except OSError:
            self._close_eventfds()
            raise

    # What the wiring connects ----------------------------------------------------------------

    def kick_eventfd(self, queue_index: int) -> int:
        """The doorbell of a backend queue: give it to the transport's `add_doorbell` (and to
        no worker: the backend reads it)."""
        return self._kick_fds[queue_index]

    def call_eventfd(self, queue_index: int) -> CallEventfd | None:
        """The interrupt eventfd of a backend queue, signalled by the backend (None for a queue
        the device keeps)."""
        return self.calls[queue_index] if 0 <= queue_index < len(self.calls) else None

    def connect_worker(self, worker: QueueWorker) -> None:
        """Watch the backend's eventfds on the device's worker: each call eventfd while it is
        relayed (see `CallEventfd`), each err eventfd (the ring is broken: NEEDS_RESET)."""
        for call in self.calls:
            call.connect_watch(worker.watch_readiness(call.fd, call.ready))
        for index, fd in enumerate(self._err_fds):
            worker.watch(fd, functools.partial(self.vring_error, index))

    def connect_kick(self, queue_index: int, kick: Callable[[], None] | None) -> None:
        """A worker's doorbell for a queue the device keeps; the backend's queues have their
        kick eventfd, which the backend reads (a worker draining it would steal its kicks)."""
        if queue_index < self.backend_queues:
            raise ValueError(f"{self.name}: queue {queue_index} is kicked through its backend")
        super().connect_kick(queue_index, kick)

    def serve(self, queue_index: int, lend_hand: Callable[[], None] | None = None) -> bool:
        """Python never pops a descriptor: the backend serves its queues, the others stay idle."""
        return False

    def relay_call(self, queue_index: int) -> None:
        """The backend signalled queue `queue_index`'s call eventfd and it is not bound (its
        `CallEventfd` read it): interrupt the driver through the transport. No lock: a control
        request in flight on a vCPU must not hold up interrupts."""
        if self.status & DRIVER_OK and self._interrupt is not None:
            self.queue_stats[queue_index].interrupts += 1
            self._interrupt(InterruptKind.QUEUE, queue_index)

    def vring_error(self, queue_index: int) -> None:
        """The backend signalled queue `queue_index`'s err eventfd."""
        with self._lock:
            self._backend_failed(VhostError(f"the backend found queue {queue_index} broken"))

    def check_backend(self) -> None:
        """The frontend's `fileno()` became readable: see whether the backend went away."""
        with self._lock:
            self._guarded(self.frontend.check_connection)

    # Kicks that reach Python -------------------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        """A notify write that exited to Python (no ioeventfd there yet): the backend's queues
        get it through their kick eventfd, the device's own queues just count it."""
        if not 0 <= queue_index < self.queue_count:
            return
        self.queue_stats[queue_index].notifications += 1
        if queue_index < self.backend_queues and self._kick_fds:
            os.eventfd_write(self._kick_fds[queue_index], 1)

    # Handing queues over and taking them back ---------------------------------------------------

    def activate(self) -> None:
        """DRIVER_OK: features, memory table, then every queue the driver readied."""
        if self.running:
            self._guarded(self._start_backend)

    def _start_backend(self) -> None:
        frontend = self.frontend
        frontend.set_features(self.driver_features & frontend.guest_features())
        frontend.set_mem_table(memory_table(self.memory))
        self._started = True
        ready = [i for i in range(self.backend_queues) if self.queues[i].active]
        for index in ready:
            self._hand_over(index)
        frontend.start(ready)
        self._log_failure = True

    def _hand_over(self, index: int) -> None:
        queue, frontend, memory = self.queues[index], self.frontend, self.memory
        size = queue.size
        addresses = VringAddresses(
            descriptor=memory.host_address(queue.descriptor_table, DESCRIPTOR_SIZE * size),
            used=memory.host_address(queue.used_ring, 6 + 8 * size),
            available=memory.host_address(queue.available_ring, 6 + 2 * size),
        )
        frontend.set_vring_num(index, size)
        frontend.set_vring_base(index, queue.last_available)
        frontend.set_vring_addr(index, addresses)
        frontend.set_vring_kick(index, self._kick_fds[index])
        frontend.set_vring_call(index, self.calls[index].fd)
        frontend.set_vring_err(index, self._err_fds[index])
        self._handed.add(index)

    def _take_back(self, indexes: Sequence[int]) -> None:
        """Stop rings `indexes` and record where the backend got to in each."""
        self.frontend.stop(indexes)
        for index in indexes:
            self.vring_bases[index] = self.frontend.get_vring_base(index)
            self._handed.discard(index)

    def set_queue_ready(self, index: int, ready: bool) -> None:
        """A queue readied after DRIVER_OK goes to the backend at once; a queue disabled
        (virtio-mmio) comes back from it first."""
        with self._lock:
            if not ready and index in self._handed:
                self._guarded(self._take_back, [index])
            super().set_queue_ready(index, ready)
            if (
                ready
                and self._started
                and self.running
                and index < self.backend_queues
                and self.queues[index].active
            ):
                self._guarded(self._start_queue, index)

    def _start_queue(self, index: int) -> None:
        self._hand_over(index)
        self.frontend.start([index])

    def reset_device(self) -> None:
        """Driver reset: take every ring back, reset the backend, refresh its config space."""
        if self._started:
            self._guarded(self._stop_backend)
        self._started = False
        self._handed.clear()
        if self._config_size:
            self._guarded(self._refresh_config)

    def _stop_backend(self) -> None:
        self._take_back(sorted(self._handed))
        self.frontend.reset()

    def _refresh_config(self) -> None:
        config = self.frontend.read_config(self._config_size)
        if config is not None:
            self.update_config(config)

    # Pausing and snapshots ---------------------------------------------------------------------

    def pause_backend(self) -> None:
        """Take every ring back from the backend (GET_VRING_BASE) and keep where it got to in
        the queues: a paused machine's backend touches no guest RAM, and the queues' state is
        then what a snapshot saves. `resume_backend` hands them back."""
        with self._lock:
            handed = sorted(self._handed)
            if not handed or not self._guarded(self._take_back, handed):
                return
            for index in handed:
                queue = self.queues[index]
                queue.last_available = self.vring_bases[index] & 0xFFFF
                queue.used_index = self.memory.read_u16(queue.used_ring + 2)
                queue._signalled_used = queue.used_index
            self._paused_rings = handed

    def resume_backend(self) -> None:
        """Hand the rings `pause_backend` took back to the backend, from where it stopped."""
        with self._lock:
            paused, self._paused_rings = self._paused_rings, []
            if paused and self.running:
                self._guarded(self._restart_rings, paused)

    def _restart_rings(self, indexes: Sequence[int]) -> None:
        for index in indexes:
            self._hand_over(index)
        self.frontend.start(indexes)

    def save_state(self) -> dict[str, object]:
        """The device's state, its backend paused; KvmletError for a device type whose
        backend keeps state of its own (`RING_STATE_ONLY`)."""
        with self._lock:
            if self.device_id not in RING_STATE_ONLY:
                raise KvmletError(
                    f"the state of its vhost backend {self.frontend.name} (device type "
                    f"{self.device_id}) lives outside kvmlet and cannot be saved"
                )
            if self._handed:
                raise KvmletError("its backend still runs the rings: pause the backend first")
            return {**super().save_state(), "backend_rings": list(self._paused_rings)}

    def load_state(self, state: dict) -> None:
        """Take a saved state; a running device hands its rings to the (new) backend with
        the saved positions (SET_VRING_BASE) at once, its memory table first, then signals
        each ring's call once: a completion the old backend signalled while its machine
        was paused may have been waiting in a call eventfd of the old process (a relayed
        call), and its interrupt must not be lost; a driver ignores one with nothing new."""
        with self._lock:
            if self.device_id not in RING_STATE_ONLY:
                raise KvmletError(f"a vhost device of type {self.device_id} cannot be restored")
            super().load_state(state)
            self._paused_rings = []
            if self.running and self._guarded(self._start_backend):
                for index in sorted(self._handed):
                    os.eventfd_write(self.calls[index].fd, 1)

    # Configuration space -----------------------------------------------------------------------

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Writes go to the backend when the configuration space is the backend's."""
        if not self._config_size or offset < 0 or size <= 0 or offset + size > self.config_size:
            super().write_config(offset, size, value)
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        with self._lock:
            if self._guarded(self.frontend.write_config, offset, data):
                self._config[offset : offset + size] = data

    # Failures ----------------------------------------------------------------------------------

    def _guarded(self, work: Callable[..., None], *arguments: object) -> bool:
        """Run backend work; a `VhostError` becomes NEEDS_RESET instead of an exception."""
        try:
            work(*arguments)
        except VhostError as error:
            self._backend_failed(error)
            return False
        return True

    def _backend_failed(self, error: VhostError) -> None:
        reason = str(error).removeprefix(f"{self.frontend.name}: ")
        self.backend_error = reason
        if self._log_failure:
            self._log_failure = False
            log.warning(
                "%s: vhost backend %s: %s; the device needs a reset, the guest keeps running",
                self.name,
                self.frontend.name,
                reason,
            )
        if self.status:
            self.last_error = reason
            self.status |= DEVICE_NEEDS_RESET
            if self.status & DRIVER_OK:
                self.signal_config()

    # Life cycle and counters -------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """The device's counters (its queues' `requests` stay 0: Python never pops), plus the
        backend's name, its last failure, where it stopped each ring last and how each call
        eventfd reaches the guest (`CallEventfd.stats`: irqfd or relay). Read without
        the register lock, as every device's: a control request stuck on the backend must not
        hold up the statistics."""
        return {
            **super().stats(),
            "backend": self.frontend.name,
            "backend_error": self.backend_error,
            "vring_bases": dict(self.vring_bases),
            "calls": [call.stats() for call in self.calls],
        }

    def close(self) -> None:
        """Stop the backend's rings (best effort: it may be gone), close it and the eventfds."""
        with self._lock:
            if self._handed:
                with contextlib.suppress(VhostError):
                    self._take_back(sorted(self._handed))
            self.frontend.close()
            self._close_eventfds()
            super().close()

    def _close_eventfds(self) -> None:
        for call in self.calls:
            call.close()
        self.calls.clear()
        for fds in (self._kick_fds, self._err_fds):
            for fd in fds:
                os.close(fd)
            fds.clear()
