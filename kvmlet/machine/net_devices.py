"""The guest's NICs (`MachineConfig.nets`): a virtio-net device each, and what serves it.

Every NIC is a virtio-net device on the machine's virtio transport (PCI or MMIO, like the other
virtio devices), with a MAC from `,mac=` or derived from the machine's name. Its data path is
one of three:

- `user`: passt, started here on a private socket and supervised (`kvmlet.host.passt`), speaks
  the stream protocol with the device's Python data path (`StreamBackend`). passt dying takes
  the link down (the guest sees LINK_UP cleared and a configuration interrupt), said once; the
  guest keeps running.
- `tap` with vhost (the default where /dev/vhost-net opens): the kernel's vhost-net moves the
  frames between the rings and the tap (`VhostNet`): Python never sees a packet. The device
  shows the same configuration space and offers the same virtio-net features as the Python
  one (`kvmlet.virtio.net.config`); vhost-net itself is given only the ring features and
  mergeable buffers, and the tap, which carries the 12-byte virtio-net header, is told which
  offloads the driver accepted each time the driver starts.
- `tap` with `vhost=off`: the Python data path on the tap (`TapBackend`).

How each is wired to its worker (`connect`): a Python data path gets doorbells on the worker,
like any device, and a readiness watch on its backend's descriptor. A vhost NIC's doorbells are
its kick eventfds, which vhost-net reads (no worker touches them); its calls are attached to the
queues' MSI-X vectors as KVM irqfds by virtio-pci, else relayed by the worker, which also
watches the err eventfds (`VhostDevice.connect_worker`). For a tap
NIC the worker also watches rtnetlink for the interface's deletion (`LinkRemovals`): the link
then goes down as for passt, whether or not a driver was using the tap at the time.

Stopping (`VirtioDevices.close`): the workers first, then passt (`stop_helpers`: so its exit is
not news), then the devices, then the taps (`close`: vhost-net holds a tap until its device is
closed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError, LazyLogger
from kvmlet.vhost.device import TRANSPORT_FEATURES, VhostDevice
from kvmlet.vhost.frontend import VhostError
from kvmlet.vhost.kernel import KernelVhostNet
from kvmlet.virtio.net.config import (
    VIRTIO_ID_NET,
    VIRTIO_NET_F_MRG_RXBUF,
    broken_dependency,
    config_space,
    device_features,
    tap_offloads,
)
from kvmlet.virtio.net.device import QUEUE_SIZE, VirtioNet
from kvmlet.virtio.net.option import NetConfig, format_mac

if TYPE_CHECKING:
    from kvmlet.host.processes import HelperProcess
    from kvmlet.host.tap import LinkRemovals, TapDevice
    from kvmlet.memory import GuestMemory
    from kvmlet.virtio.device import VirtioDevice
    from kvmlet.virtio.mmio import VirtioMmio
    from kvmlet.virtio.pci import VirtioPci
    from kvmlet.virtio.worker import QueueWorker, ReadinessWatch

log = LazyLogger(__name__)

VHOST_NET_DEVICE = "/dev/vhost-net"


class TapVhostNet(KernelVhostNet):
    """/dev/vhost-net on a tap that learns, with the features, which offloads the guest took:
    vhost-net passes the virtio-net header between the rings and the tap untouched, so the tap
    must deliver only the segmentation and checksum offloads the driver accepted."""

    def __init__(self, tap: TapDevice, path: str = VHOST_NET_DEVICE):
        super().__init__(tap.fileno(), name=f"vhost-net on tap {tap.name}", path=path)
        self.tap = tap

    def set_features(self, features: int) -> None:
        super().set_features(features)
        try:
            self.tap.set_offloads(tap_offloads(features) & self.tap.supported_offloads)
        except OSError as error:
            raise VhostError(f"{self.name}: TUNSETOFFLOAD failed: {error.strerror}") from None


class VhostNet(VhostDevice):
    """virtio-net served by the kernel's vhost-net on a tap.

    The driver is offered what the Python device offers on a tap (MAC, status, MTU, the
    offloads the tap supports) and, from vhost-net, the ring features and mergeable receive
    buffers. `set_link` is the Python device's: the guest sees LINK_UP go."""

    def __init__(self, memory: GuestMemory, frontend: TapVhostNet, mac: bytes, mtu: int):
        own = device_features(True, frontend.tap.supported_offloads, mergeable=False)
        super().__init__(
            memory,
            frontend,
            name="virtio-net",
            device_id=VIRTIO_ID_NET,
            queue_sizes=[QUEUE_SIZE, QUEUE_SIZE],
            features_mask=TRANSPORT_FEATURES | 1 << VIRTIO_NET_F_MRG_RXBUF,
            own_features=own,
            config=config_space(mac, True, mtu),
        )
        self.mac = bytes(mac)
        self.mtu = mtu
        self.link_up = True
        self.on_link_change: Callable[[bool, str], None] | None = None

    def _features_ok(self) -> bool:
        return super()._features_ok() and broken_dependency(self.driver_features) is None

    def set_link(self, up: bool, reason: str = "") -> None:
        with self._lock:
            if up == self.link_up:
                return
            self.link_up = up
            self.update_config(config_space(self.mac, up, self.mtu))
        message = reason or f"{self.name}: link {'up' if up else 'down'}"
        if self.on_link_change is not None:
            self.on_link_change(up, message)
        else:
            log.warning("%s", message)

    def stats(self) -> dict[str, object]:
        return {**super().stats(), "link_up": self.link_up}


class Nic:
    """One NIC: what it was asked to be, its device and what serves it on the host."""

    def __init__(self, index: int, config: NetConfig, mac: bytes):
        self.index = index
        self.config = config
        self.mac = mac
        self.label = f"net{index} ({config.mode})"
        self.device: VirtioNet | VhostNet | None = None
        self.passt: HelperProcess | None = None
        self.tap: TapDevice | None = None  # a vhost NIC's tap (a Python one's is its backend's)
        self.ifname: str | None = None
        self.tap_index = 0
        self.removals: LinkRemovals | None = None
        self.data_path = "python"
        self._removal_watch: ReadinessWatch | None = None

    def describe(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "network": self.config.mode,
            "mac": format_mac(self.mac),
            "data_path": self.data_path,
            "link_up": self.device.link_up if self.device is not None else False,
        }
        if self.ifname is not None:
            entry["ifname"] = self.ifname
        if self.config.forwards:
            entry["hostfwd"] = [f"{p}:{host}:{guest}" for p, host, guest in self.config.forwards]
        return entry

    def link_lost(self, up: bool, message: str) -> None:
        """The device's report that its link changed: one line, with the NIC's name."""
        device_name = self.device.name if self.device is not None else "virtio-net"
        detail = message.removeprefix(f"{device_name}: ")
        if up:
            log.warning("kvmlet: %s: %s", self.label, detail)
        else:
            log.warning("kvmlet: %s: %s; the guest keeps running", self.label, detail)

    def passt_exited(self, helper: HelperProcess) -> None:
        """passt's monitor thread: passt died while the guest ran."""
        if self.device is not None:
            status = helper.returncode
            how = f"killed by signal {-status}" if status is not None and status < 0 else status
            words = helper.last_words()
            reason = (
                f"passt exited ({how}{'' if words == 'no output' else ': ' + words}): link down"
            )
            self.device.set_link(False, f"{self.device.name}: {reason}")

    def links_removed(self, readable: bool, writable: bool, hangup: bool) -> None:
        """The worker saw rtnetlink news: is this NIC's tap among the deleted interfaces?"""
        from kvmlet.host.tap import interface_exists

        assert self.removals is not None
        removed = self.removals.read()
        if removed is None:  # messages were lost: look
            removed = set() if interface_exists(self.tap_index) else {self.tap_index}
        if self.tap_index not in removed:
            return
        if self._removal_watch is not None:
            self._removal_watch.close()
            self._removal_watch = None
        if self.device is not None:
            reason = f"tap {self.ifname} was deleted: link down"
            self.device.set_link(False, f"{self.device.name}: {reason}")


class NetDevices:
    """The machine's NICs: made (host side first) in `MachineConfig.nets` order."""

    def __init__(self, memory: GuestMemory, nets: tuple[NetConfig, ...], machine_name: str | None):
        self.nics: list[Nic] = []
        try:
            for index, config in enumerate(net for net in nets if net.mode != "none"):
                nic = Nic(index, config, config.mac_address(machine_name, index))
                self.nics.append(nic)
                if config.mode == "user":
                    self._user(memory, nic)
                else:
                    self._tap(memory, nic)
                nic.device.on_link_change = nic.link_lost
        except BaseException:
            for device in self.devices:
                device.close()
            self.close()
            raise

    @property
    def devices(self) -> list[VirtioDevice]:
        return [nic.device for nic in self.nics if nic.device is not None]

    def _user(self, memory: GuestMemory, nic: Nic) -> None:
        from kvmlet.host.passt import start_passt
        from kvmlet.virtio.net.stream import StreamBackend

        config = nic.config
        forwards = [(f.protocol, f.host_port, f.guest_port) for f in config.forwards]
        nic.passt, sock = start_passt(forwards, config.effective_mtu, on_exit=nic.passt_exited)
        backend = StreamBackend(sock, "passt")
        nic.device = VirtioNet(memory, backend, nic.mac, config.effective_mtu)

    def _tap(self, memory: GuestMemory, nic: Nic) -> None:
        from kvmlet.host.tap import LinkRemovals, open_tap

        config = nic.config
        nic.removals = LinkRemovals()
        nic.tap = tap = open_tap(config.ifname)  # closed by `close` until a backend owns it
        nic.ifname, nic.tap_index = tap.name, tap.index
        if config.vhost is not False:
            try:
                frontend = TapVhostNet(tap)
            except VhostError as error:
                if config.vhost:
                    raise KvmletError(f"{nic.label}: vhost=on: {error}") from None
            else:
                try:
                    nic.device = VhostNet(memory, frontend, nic.mac, config.effective_mtu)
                except BaseException:
                    frontend.close()
                    raise
                nic.data_path = "vhost-net"
                return
        from kvmlet.virtio.net.frames import TapBackend

        nic.device = VirtioNet(memory, TapBackend(tap), nic.mac, config.effective_mtu)
        nic.tap = None  # the device's backend owns it now, and closes it

    def nic_of(self, device: VirtioDevice) -> Nic | None:
        for nic in self.nics:
            if nic.device is device:
                return nic
        return None

    def connect(
        self, nic: Nic, transport: VirtioPci | VirtioMmio, worker: QueueWorker
    ) -> list[int]:
        """Wire a NIC's device, on `transport`, to its `worker`; returns the doorbell queues
        the caller must add to the worker as for any device (a Python data path's)."""
        device = nic.device
        if isinstance(device, VhostNet):
            for queue in range(device.queue_count):
                transport.add_doorbell(queue, device.kick_eventfd(queue))
            device.connect_worker(worker)
            queues = []
        else:
            assert isinstance(device, VirtioNet)
            watch = worker.watch_readiness(device.backend.fileno(), device.backend_ready)
            device.connect_backend_watch(watch)
            queues = list(range(device.queue_count))
        if nic.removals is not None:
            nic._removal_watch = worker.watch_readiness(nic.removals.fileno(), nic.links_removed)
            nic._removal_watch.want(True, False)
        return queues

    def describe(self, device: VirtioDevice) -> dict[str, object]:
        nic = self.nic_of(device)
        return nic.describe() if nic is not None else {}

    def stop_helpers(self) -> None:
        """Stop passt (after the workers, before the devices: its exit is then no news)."""
        for nic in self.nics:
            if nic.passt is not None:
                nic.passt.stop()

    def close(self) -> None:
        """Stop the helpers and close the taps the devices did not own (after the devices and
        their workers)."""
        self.stop_helpers()
        for nic in self.nics:
            if nic.tap is not None:
                nic.tap.close()
            if nic.removals is not None:
                nic.removals.close()
