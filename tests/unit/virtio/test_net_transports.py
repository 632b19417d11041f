"""virtio-net behind both transports, as a driver probes them: identity, configuration space,
a link change as a configuration interrupt, and frames both ways through the registers."""

from __future__ import annotations

import socket

from kvmlet.bus.pci import config_space as cfg
from kvmlet.virtio import mmio
from kvmlet.virtio import pci_layout as layout
from kvmlet.virtio.net.device import RECEIVE_QUEUE, TRANSMIT_QUEUE, VirtioNet
from kvmlet.virtio.net.stream import StreamBackend
from tests.helpers.net import MAC, ethernet_frame, header, read_stream_frames, stream_message
from tests.unit.virtio.test_pci import MSI_ADDRESS, LinuxLikeDriver
from tests.unit.virtio.test_virtio_mmio import MmioHarness


def stream_device(memory):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = VirtioNet(memory, StreamBackend(ours), MAC, on_link_change=lambda *report: None)
    return device, peer


def test_virtio_net_over_pci(memory):
    device, peer = stream_device(memory)
    pci = LinuxLikeDriver(device, memory)
    try:
        pci.probe()
        assert pci.config_read(cfg.DEVICE_ID, 2) == 0x1041
        assert pci.config_read(cfg.REVISION_ID, 4) >> 8 == 0x020000  # Ethernet controller
        pci.initialize()
        device_cfg = pci.bar + pci.virtio_caps[layout.DEVICE_CFG]["offset"]
        mac = b"".join(pci.mmio.read(device_cfg + i, 1).to_bytes(1, "little") for i in range(6))
        assert mac == MAC
        assert pci.mmio.read(device_cfg + 6, 2) == 1  # LINK_UP

        pci.rings.post_data(TRANSMIT_QUEUE, [header(), ethernet_frame(90)], [])
        pci.kick(TRANSMIT_QUEUE)
        assert read_stream_frames(peer, 1) == [ethernet_frame(90)]

        device.set_link(False)
        assert pci.mmio.read(device_cfg + 6, 2) == 0
        assert pci.msi.vectors[0].fired[-1] == (MSI_ADDRESS, 0x30)  # the config vector
    finally:
        device.close()
        peer.close()


def test_virtio_net_over_mmio(memory):
    device, peer = stream_device(memory)
    harness = MmioHarness(device, memory)
    try:
        assert harness.read(mmio.DEVICE_ID) == 1
        harness.initialize()
        config = [harness.read(mmio.CONFIG + i, size=1) for i in range(6)]
        assert bytes(config) == MAC
        head, addresses = harness.driver.post_data(RECEIVE_QUEUE, [], [2048])
        harness.write(mmio.QUEUE_NOTIFY, RECEIVE_QUEUE)
        peer.sendall(stream_message(ethernet_frame(70)))
        device.backend_ready(True, False, False)
        [completion] = harness.driver.collect(RECEIVE_QUEUE)
        assert completion.head == head and completion.length == 12 + 70
        assert memory.read(addresses[0] + 12, 70) == ethernet_frame(70)
        assert harness.read(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_USED_BUFFER

        device.set_link(False)
        assert harness.read(mmio.CONFIG + 6, size=2) == 0
        assert harness.read(mmio.INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG_CHANGE
    finally:
        device.close()
        peer.close()
