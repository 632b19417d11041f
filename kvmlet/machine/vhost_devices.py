"""The machine's devices served outside Python: vhost-user disks, virtiofs shares and vsock.

`VirtioDevices` makes a `VhostDevices` when the configuration asks for one of them, after the
devices Python serves (so disk images come before vhost-user disks in PCI order, /dev/vda
first), and puts each device behind its transport like any other; `wire` then connects what
is particular to a vhost device:

- Each backend queue's doorbell is the device's kick eventfd (`transport.add_doorbell`): KVM
  signals it on the guest's notify write, the bus moves it with the BAR, and the backend
  reads it. No worker ever waits on it. A queue the device keeps (vsock's event queue) gets an
  ordinary doorbell from the caller.
- Each call eventfd is bound by virtio-pci to its queue's MSI-X vector as a KVM irqfd while
  it can be; otherwise, and for every err eventfd, the device's worker watches it
  (`VhostDevice.connect_worker`) and a call becomes the queue's interrupt through the
  transport (a masked vector, INTx or virtio-mmio).
- A vhost-user backend's socket is watched on the worker too, level-triggered and never read
  (through a duplicate of its descriptor, which the watch owns, so the frontend may close
  the socket whenever it fails): readable means the backend hung up or spoke out of turn;
  `check_backend` then puts the device in DEVICE_NEEDS_RESET with one log line, and the watch
  ends. The guest keeps running.

The virtiofsd daemons kvmlet starts (`kvmlet.host.virtiofsd`) are stopped after their devices
are closed (`close`): the close order is workers, devices, then daemons, and memory last.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError, LazyLogger
from kvmlet.vhost.frontend import VhostError

if TYPE_CHECKING:
    from kvmlet.host.processes import HelperProcess
    from kvmlet.machine.machine import Machine
    from kvmlet.machine.vhost_config import FilesystemConfig, VhostUserDiskConfig
    from kvmlet.memory import GuestMemory
    from kvmlet.vhost.device import VhostDevice
    from kvmlet.virtio.mmio import VirtioMmio
    from kvmlet.virtio.pci import VirtioPci
    from kvmlet.virtio.worker import QueueWorker, ReadinessWatch

log = LazyLogger(__name__)

DAEMON_START_TIMEOUT = 30.0
"""Seconds a virtiofsd kvmlet started has to answer its first request (it sets up its
sandbox first; in the test box, under emulation, that takes seconds)."""
DAEMON_EXIT_WAIT = 2.0
"""Seconds to wait for a daemon that broke its connection to exit, to report its last words."""


class VhostDevices:
    """Creates a machine's vhost devices (starting the daemons they need) and wires them."""

    def __init__(self, machine: Machine):
        config = machine.config
        memory = machine.memory
        self.devices: list[VhostDevice] = []
        self.daemons: list[HelperProcess] = []
        self.vsock_cid = config.vsock_cid
        self._backend_watches: list[tuple[ReadinessWatch, int]] = []
        try:
            for disk in config.vhost_user_disks:
                self.devices.append(self._disk(memory, disk))
            for share in config.filesystems:
                daemon = os.fspath(config.virtiofsd) if config.virtiofsd is not None else None
                self.devices.append(self._share(memory, share, daemon))
            if config.vsock_cid is not None:
                self.devices.append(self._vsock(memory, config.vsock_cid))
        except BaseException:
            for device in self.devices:
                device.close()
            self.close()
            raise

    # Making the devices -------------------------------------------------------------------------

    def _disk(self, memory: GuestMemory, disk: VhostUserDiskConfig) -> VhostDevice:
        from kvmlet.vhost.blk import vhost_user_blk_device
        from kvmlet.vhost.user import VhostUserFrontend

        path = os.fspath(disk.socket)
        frontend = VhostUserFrontend.connect(path, name=f"vhost-user-blk at {path}")
        return _device_or_close(frontend, vhost_user_blk_device, memory, frontend, disk.read_only)

    def _share(
        self, memory: GuestMemory, share: FilesystemConfig, daemon: str | None
    ) -> VhostDevice:
        from kvmlet.vhost.fs import virtiofs_device
        from kvmlet.vhost.user import DEFAULT_TIMEOUT, VhostUserFrontend

        if share.socket is not None:
            path = os.fspath(share.socket)
            frontend = VhostUserFrontend.connect(path, name=f"virtiofsd at {path}")
        else:
            from kvmlet.host.virtiofsd import start_virtiofsd

            helper, connection = start_virtiofsd(
                os.fspath(share.source),
                read_only=share.read_only,
                program=daemon,
                name=f"virtiofsd for {share.tag!r}",
                on_exit=_daemon_exited,
            )
            self.daemons.append(helper)
            frontend = _first_answer(helper, connection, share.tag)
            frontend.timeout = DEFAULT_TIMEOUT  # the start-up's grace is over
        return _device_or_close(frontend, virtiofs_device, memory, frontend, share.tag)

    def _vsock(self, memory: GuestMemory, cid: int) -> VhostDevice:
        from kvmlet.vhost.vsock import vsock_device

        try:
            return vsock_device(memory, cid)
        except VhostError as error:
            raise KvmletError(f"--vsock {cid}: {error}") from None

    # Wiring -------------------------------------------------------------------------------------

    def wire(self, device: object, transport: VirtioPci | VirtioMmio, worker: QueueWorker) -> int:
        """Connect a vhost device's eventfds and backend watch; the number of its queues now
        served (the backend's), 0 for a device that is not one of these."""
        if not any(device is own for own in self.devices):
            return 0
        vhost: VhostDevice = device  # type: ignore[assignment]
        for queue in range(vhost.backend_queues):
            transport.add_doorbell(queue, vhost.kick_eventfd(queue))
        vhost.connect_worker(worker)
        self._watch_backend(vhost, worker)
        return vhost.backend_queues

    def _watch_backend(self, device: VhostDevice, worker: QueueWorker) -> None:
        fd = device.frontend.fileno()
        if fd is None:  # the kernel's vhost does not go away
            return
        duplicate = os.dup(fd)
        watch = worker.watch_readiness(duplicate, lambda *_: self._backend_stirred(device, watch))
        self._backend_watches.append((watch, duplicate))
        watch.want(readable=True, writable=False)

    def _backend_stirred(self, device: VhostDevice, watch: ReadinessWatch) -> None:
        """The backend's socket is readable (or hung up): outside an exchange that means it
        is gone; once it is, stop watching (the worker's thread, so no poll is under way)."""
        device.check_backend()
        if device.frontend.fileno() is None:
            self._unwatch(watch)

    def _unwatch(self, watch: ReadinessWatch) -> None:
        for entry in self._backend_watches:
            if entry[0] is watch:
                self._backend_watches.remove(entry)
                watch.close()
                os.close(entry[1])
                return

    # Using and ending them ----------------------------------------------------------------------

    def connect_vsock(self, port: int, timeout: float) -> socket.socket:
        """A stream connection to `port` of the guest (see `Machine.vsock_connect`)."""
        if self.vsock_cid is None:
            raise KvmletError("this machine has no vsock device (--vsock CID)")
        from kvmlet.vhost.vsock import connect_to_guest

        return connect_to_guest(self.vsock_cid, port, timeout)

    def close(self) -> None:
        """After the workers stopped and the devices closed: end the backend watches and stop
        the daemons kvmlet started (their connections closed, they are exiting already)."""
        while self._backend_watches:
            watch, duplicate = self._backend_watches.pop()
            watch.close()
            os.close(duplicate)
        while self.daemons:
            self.daemons.pop().stop()


def _device_or_close(frontend, make, *arguments) -> VhostDevice:
    """`make(*arguments)`, closing `frontend` if the device cannot be made on it."""
    try:
        return make(*arguments)
    except BaseException:
        frontend.close()
        raise


def _first_answer(helper: HelperProcess, connection: socket.socket, tag: str):
    """The vhost-user handshake with a daemon just started; a daemon that died meanwhile is
    reported by its exit status and last words rather than by the broken connection."""
    from kvmlet.vhost.user import VhostUserFrontend

    name = f"virtiofsd for {tag!r} (pid {helper.pid})"
    try:
        frontend = VhostUserFrontend(connection, name=name, timeout=DAEMON_START_TIMEOUT)
    except VhostError as error:
        status = helper.wait(DAEMON_EXIT_WAIT)
        if status is None:
            raise
        raise KvmletError(f"{name} exited with status {status}: {helper.last_words()}") from error
    helper.serving()
    return frontend


def _daemon_exited(helper: HelperProcess) -> None:
    """A daemon died while its device was in use: the device's backend watch says so, once,
    in the line that matters (the device needs a reset, the guest keeps running)."""
    log.debug("%s exited with status %s: %s", helper.name, helper.returncode, helper.last_words())
