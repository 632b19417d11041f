"""virtio-net against the mock driver, over a socketpair backend: both directions, mergeable
receive buffers, offload headers, link changes, backpressure and frames that must be dropped."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from kvmlet.virtio.device import COMMON_FEATURES, FEATURES_OK, InterruptKind
from kvmlet.virtio.net import device as net_device
from kvmlet.virtio.net.config import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
)
from kvmlet.virtio.net.device import RECEIVE_QUEUE, TRANSMIT_QUEUE
from kvmlet.virtio.net.frames import TapBackend
from kvmlet.virtio.worker import QueueWorker, doorbell
from tests.helpers.net import (
    MAC,
    NetRig,
    ethernet_frame,
    header,
    read_stream_frames,
    stream_message,
    wait_for,
)

OFFLOADS = 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4
PLAIN = COMMON_FEATURES | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MTU
MERGEABLE = PLAIN | 1 << VIRTIO_NET_F_MRG_RXBUF


@pytest.fixture
def stream(memory):
    rig = NetRig.stream(memory)
    yield rig
    rig.close()


@pytest.fixture
def vnet(memory):
    """A socketpair standing in for a tap: frames behind the header, CSUM and TSO4 offloads."""
    rig = NetRig.datagram(memory, vnet_header=True, offloads=TUN_F_CSUM | TUN_F_TSO4)
    yield rig
    rig.close()


def received(rig, posted):
    """(header, frame) of each frame delivered, from the used ring and the posted buffers,
    following num_buffers across merged chains."""
    completions = rig.driver.collect(RECEIVE_QUEUE)
    frames = []
    while completions:
        first = completions.pop(0)
        data = rig.memory.read(posted[first.head], first.length)
        count = struct.unpack_from("<H", data, 10)[0]
        for _ in range(count - 1):
            more = completions.pop(0)
            data += rig.memory.read(posted[more.head], more.length)
        frames.append((data[:12], data[12:]))
    return frames


# Features and configuration --------------------------------------------------------------------


def test_a_stream_backend_gets_no_offloads_and_the_usual_features(stream):
    offered = stream.device.device_features_word(0) | stream.device.device_features_word(1) << 32
    assert offered == MERGEABLE


def test_a_vnet_backend_offers_what_it_can_take_and_deliver(vnet):
    offered = vnet.device.device_features_word(0)
    assert offered & (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4)
    assert offered & (1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4)
    assert not offered & 1 << VIRTIO_NET_F_GUEST_TSO6  # the backend cannot deliver it


def test_the_configuration_space_shows_mac_link_pairs_and_mtu(memory):
    rig = NetRig.stream(memory, mtu=9000)
    try:
        read = rig.device.read_config
        assert read(0, 4) | read(4, 2) << 32 == int.from_bytes(MAC, "little")
        assert (read(6, 2), read(8, 2), read(10, 2)) == (1, 1, 9000)
    finally:
        rig.close()


def test_a_driver_breaking_a_feature_dependency_is_refused(vnet):
    vnet.driver.negotiate(PLAIN | 1 << VIRTIO_NET_F_GUEST_TSO4)  # TSO4 in without GUEST_CSUM
    assert not vnet.device.status & FEATURES_OK
    vnet.driver.negotiate(PLAIN | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_CSUM)
    assert vnet.device.status & FEATURES_OK


# Transmit ----------------------------------------------------------------------------------------


def test_transmitted_frames_reach_the_stream_peer_with_their_length(stream):
    stream.start()
    frames = [ethernet_frame(60, 1), ethernet_frame(1514, 2), ethernet_frame(700, 3)]
    heads = stream.transmit(*frames)
    assert read_stream_frames(stream.peer, 3) == frames
    completions = stream.driver.collect(TRANSMIT_QUEUE)
    assert [(c.head, c.length) for c in completions] == [(head, 0) for head in heads]
    counters = stream.device.counters
    assert (counters.tx_frames, counters.tx_bytes) == (3, 60 + 1514 + 700)
    assert stream.driver.interrupts[-1] == (InterruptKind.QUEUE, TRANSMIT_QUEUE)


def test_a_frame_may_share_its_buffer_with_the_header(stream):
    stream.start()
    frame = ethernet_frame(100)
    stream.driver.post_data(TRANSMIT_QUEUE, [header() + frame], [])
    stream.driver.kick(TRANSMIT_QUEUE)
    assert read_stream_frames(stream.peer, 1) == [frame]


@pytest.mark.parametrize(
    ("chain", "counter"),
    [
        ([header()], "tx_dropped_malformed"),  # no frame at all
        ([header(), ethernet_frame(13)], "tx_dropped_malformed"),  # a runt
        ([header(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM), ethernet_frame(60)], "tx_dropped_malformed"),
        ([header(flags=VIRTIO_NET_HDR_F_DATA_VALID), ethernet_frame(60)], "tx_dropped_malformed"),
        ([header(), ethernet_frame(1500 + 18 + 1)], "tx_dropped_too_big"),
        ([b"\0" * 5, b"\0" * 7, ethernet_frame(1518)], None),  # header split: fine, fits
    ],
)
def test_frames_that_must_not_go_out_are_dropped_counted_and_completed(stream, chain, counter):
    stream.start()
    head, _ = stream.driver.post_data(TRANSMIT_QUEUE, chain, [])
    stream.driver.kick(TRANSMIT_QUEUE)
    assert [c.head for c in stream.driver.collect(TRANSMIT_QUEUE)] == [head]
    counters = vars(stream.device.counters)
    if counter is None:
        assert counters["tx_frames"] == 1
        read_stream_frames(stream.peer, 1)
    else:
        assert counters[counter] == 1 and counters["tx_frames"] == 0


def test_a_gso_header_without_the_negotiated_feature_is_dropped(stream):
    stream.start()
    gso = header(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1448)
    stream.transmit(ethernet_frame(3000), head=gso)
    assert stream.device.counters.tx_dropped_malformed == 1
    assert len(stream.driver.collect(TRANSMIT_QUEUE)) == 1


def test_offload_headers_pass_through_to_a_vnet_backend(vnet):
    vnet.start()
    offload = header(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, buffers=0
    )
    frame = ethernet_frame(20000)
    vnet.transmit(frame, head=offload)
    assert vnet.peer.recv(1 << 17) == offload + frame
    assert vnet.device.counters.tx_bytes == len(frame)


@pytest.mark.parametrize(
    ("wanted", "head"),
    [
        (PLAIN | OFFLOADS, header(VIRTIO_NET_HDR_F_DATA_VALID)),  # receive-only flag
        (PLAIN | OFFLOADS, header(0x80 | VIRTIO_NET_HDR_F_NEEDS_CSUM)),  # unknown flag
        (PLAIN | OFFLOADS, header(1, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 54, 1448)),
        (PLAIN | OFFLOADS, header(1, VIRTIO_NET_HDR_GSO_TCPV6, 74, 1428)),
        (PLAIN | OFFLOADS, header(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 0)),  # no segment size
        (PLAIN | 1 << VIRTIO_NET_F_CSUM, header(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448)),
        (PLAIN, header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16)),
    ],
)
def test_transmit_headers_asking_for_what_was_not_negotiated_are_dropped(vnet, wanted, head):
    vnet.start(wanted)
    vnet.transmit(ethernet_frame(3000), head=head)
    assert vnet.device.counters.tx_dropped_malformed == 1
    assert len(vnet.driver.collect(TRANSMIT_QUEUE)) == 1


def test_a_partial_checksum_beyond_the_frame_is_dropped(vnet):
    vnet.start()
    vnet.transmit(ethernet_frame(60), head=header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 50, 16))
    assert vnet.device.counters.tx_dropped_malformed == 1


def test_a_backend_that_cannot_take_more_stops_transmit_until_writable(memory):
    rig = NetRig.stream(memory)
    try:
        rig.backend.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        rig.start()
        frames = [ethernet_frame(1514, seed) for seed in range(100)]
        rig.transmit(*frames)
        assert rig.backend.blocked and rig.watch.writable
        taken = len(rig.driver.collect(TRANSMIT_QUEUE))
        assert taken < len(frames), "a blocked backend must leave chains in the ring"
        expected = b"".join(stream_message(frame) for frame in frames)
        data = bytearray()
        rig.peer.settimeout(2)
        while len(data) < len(expected):  # a peer reading what is there, as passt does
            data += rig.peer.recv(1 << 20)
            rig.pump()
        assert data == expected
        assert taken + len(rig.driver.collect(TRANSMIT_QUEUE)) == len(frames)
        assert not rig.watch.writable
    finally:
        rig.close()


def test_a_wakeup_takes_a_bounded_number_of_chains_and_carries_on(stream, monkeypatch):
    monkeypatch.setattr(net_device, "TX_CHAINS_PER_WAKEUP", 4)
    stream.start()
    frames = [ethernet_frame(100, seed) for seed in range(10)]
    stream.transmit(*frames)
    assert len(stream.driver.collect(TRANSMIT_QUEUE)) == 4
    assert stream.watch.writable  # more to do: carry on when the backend is writable
    assert stream.pump() == 2
    assert len(stream.driver.collect(TRANSMIT_QUEUE)) == 6
    assert read_stream_frames(stream.peer, 10) == frames


# Receive -----------------------------------------------------------------------------------------


def test_a_received_frame_lands_behind_a_zero_header(stream):
    stream.start(MERGEABLE)
    posted = stream.post_receive_buffers(4, 2048)
    frame = ethernet_frame(1514)
    stream.peer.sendall(stream_message(frame))
    stream.pump()
    assert received(stream, posted) == [(header(buffers=1), frame)]
    assert stream.driver.interrupts[-1] == (InterruptKind.QUEUE, RECEIVE_QUEUE)
    assert (stream.device.counters.rx_frames, stream.device.counters.rx_bytes) == (1, 1514)


@pytest.fixture
def jumbo(memory):
    rig = NetRig.stream(memory, mtu=9000)
    yield rig
    rig.close()


def test_a_large_frame_is_merged_across_receive_buffers(jumbo):
    jumbo.start(MERGEABLE)
    posted = jumbo.post_receive_buffers(16, 1536)
    frame = ethernet_frame(5000)
    jumbo.peer.sendall(stream_message(frame) + stream_message(ethernet_frame(64)))
    jumbo.pump()
    completions = jumbo.driver.collect(RECEIVE_QUEUE)
    assert [c.length for c in completions] == [1536, 1536, 1536, 404, 76]
    first = jumbo.memory.read(posted[completions[0].head], 12)
    assert struct.unpack_from("<H", first, 10)[0] == 4
    data = b"".join(jumbo.memory.read(posted[c.head], c.length) for c in completions[:4])
    assert data[12:] == frame


def test_without_mergeable_buffers_a_frame_needs_one_chain_big_enough(stream):
    stream.start(PLAIN)
    posted = stream.post_receive_buffers(1, 12 + 1518)
    stream.peer.sendall(stream_message(ethernet_frame(1600)) + stream_message(ethernet_frame(80)))
    stream.pump()
    # the 1,600-byte frame is above the MTU: dropped; the chain waits for the next frame
    assert received(stream, posted) == [(header(buffers=1), ethernet_frame(80))]
    assert stream.device.counters.rx_dropped_too_big == 1


def test_a_frame_bigger_than_the_chain_is_dropped_and_the_chain_kept(jumbo):
    jumbo.start(PLAIN)
    posted = jumbo.post_receive_buffers(1, 12 + 1518)
    jumbo.peer.sendall(stream_message(ethernet_frame(4000)) + stream_message(ethernet_frame(70)))
    jumbo.pump()
    assert received(jumbo, posted) == [(header(buffers=1), ethernet_frame(70))]
    assert jumbo.device.counters.rx_dropped_too_big == 1


def test_no_receive_buffers_is_backpressure_not_loss(stream):
    stream.start(MERGEABLE)
    frames = [ethernet_frame(300, seed) for seed in range(5)]
    stream.peer.sendall(b"".join(stream_message(frame) for frame in frames))
    stream.pump()
    assert not stream.watch.readable, "no buffers: stop reading the backend"
    assert stream.device.counters.rx_stalls == 1
    posted = stream.post_receive_buffers(2, 2048)  # kicks the receive queue
    stream.pump()
    posted.update(stream.post_receive_buffers(8, 2048))
    stream.pump()
    assert [frame for _, frame in received(stream, posted)] == frames
    counters = stream.device.counters
    assert counters.rx_dropped_too_big == counters.rx_dropped_malformed == 0
    assert stream.watch.readable


def test_a_merged_frame_waits_for_enough_buffers(jumbo):
    jumbo.start(MERGEABLE)
    posted = jumbo.post_receive_buffers(2, 1024)
    jumbo.peer.sendall(stream_message(ethernet_frame(3000)))
    jumbo.pump()
    assert jumbo.driver.collect(RECEIVE_QUEUE) == []  # two buffers held, a third needed
    posted.update(jumbo.post_receive_buffers(2, 1024))
    jumbo.pump()
    assert [frame for _, frame in received(jumbo, posted)] == [ethernet_frame(3000)]


def test_runts_from_the_peer_are_dropped(stream):
    stream.start(MERGEABLE)
    posted = stream.post_receive_buffers(4, 2048)
    frames = [b"", ethernet_frame(13), ethernet_frame(14)]
    stream.peer.sendall(b"".join(stream_message(frame) for frame in frames))
    stream.pump()
    assert received(stream, posted) == [(header(buffers=1), ethernet_frame(14))]
    assert stream.device.counters.rx_dropped_malformed == 2


@pytest.mark.parametrize(
    ("features", "too_small"),
    [(PLAIN, 20), (MERGEABLE, 8)],
    ids=["without-mergeable-buffers", "too-small-for-any-frame"],
)
def test_a_chain_no_frame_fits_is_returned_empty(stream, features, too_small):
    stream.start(features)
    stream.post_receive_buffers(1, too_small)
    stream.post_receive_buffers(1, 2048)
    stream.peer.sendall(stream_message(ethernet_frame(100)))
    stream.pump()
    completions = stream.driver.collect(RECEIVE_QUEUE)
    assert [c.length for c in completions] == [0, 112]
    assert stream.device.counters.rx_bad_buffers == 1


def test_received_offload_headers_pass_through_when_negotiated(vnet):
    vnet.start()
    posted = vnet.post_receive_buffers(40, 2048)
    offload = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    frame = ethernet_frame(30000)
    vnet.peer.send(offload + frame)
    vnet.pump()
    [(got_header, got_frame)] = received(vnet, posted)
    assert got_header[:10] == offload[:10] and got_frame == frame


def test_received_offloads_the_driver_refused_are_dropped(vnet):
    vnet.start(MERGEABLE)  # no GUEST_CSUM, no GUEST_TSO4
    posted = vnet.post_receive_buffers(40, 2048)
    gso = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    vnet.peer.send(gso + ethernet_frame(3000))
    vnet.peer.send(header(VIRTIO_NET_HDR_F_DATA_VALID) + ethernet_frame(100))
    vnet.pump()
    # the GSO frame is dropped; DATA_VALID is cleared, not passed to a driver without GUEST_CSUM
    assert received(vnet, posted) == [(header(buffers=1), ethernet_frame(100))]
    assert vnet.device.counters.rx_dropped_malformed == 1


def test_the_tap_is_told_the_offloads_the_driver_accepted(memory):
    class FakeTap:
        name = "tap-test"
        supported_offloads = TUN_F_CSUM | TUN_F_TSO4

        def __init__(self):
            self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.offloads = []

        def fileno(self):
            return self.ours.fileno()

        def set_offloads(self, flags):
            self.offloads.append(flags)

        def close(self):
            self.ours.close()
            self.peer.close()

    tap = FakeTap()
    rig = NetRig(memory, TapBackend(tap), None)
    try:
        rig.start(MERGEABLE | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4)
        assert tap.offloads == [0, TUN_F_CSUM | TUN_F_TSO4]  # reset, then DRIVER_OK
        rig.device.write_status(0)
        assert tap.offloads[-1] == 0
    finally:
        rig.close()


# Link --------------------------------------------------------------------------------------------


def test_link_changes_raise_a_configuration_interrupt(stream):
    stream.start()
    generation = stream.device.config_generation
    stream.device.set_link(False)
    assert stream.device.read_config(6, 2) == 0
    assert stream.driver.interrupts[-1] == (InterruptKind.CONFIG, None)
    stream.device.set_link(False)  # no change, no interrupt
    stream.device.set_link(True)
    assert stream.device.read_config(6, 2) == 1
    assert stream.driver.interrupts.count((InterruptKind.CONFIG, None)) == 2
    assert stream.device.config_generation == generation + 2
    assert [up for up, _ in stream.link_reports] == [False, True]


def test_a_peer_that_closes_takes_the_link_down_once(stream):
    stream.start()
    posted = stream.post_receive_buffers(4, 2048)
    stream.peer.sendall(stream_message(ethernet_frame(80)))
    stream.peer.close()
    stream.pump()
    assert [frame for _, frame in received(stream, posted)] == [ethernet_frame(80)]
    assert not stream.device.link_up and stream.device.read_config(6, 2) == 0
    assert stream.driver.interrupts.count((InterruptKind.CONFIG, None)) == 1
    assert stream.watch.closed and stream.backend.closed
    [(up, message)] = stream.link_reports
    assert not up and message == "virtio-net: test peer closed the connection: link down"
    stream.transmit(ethernet_frame(60))  # the guest keeps running: chains still complete
    assert len(stream.driver.collect(TRANSMIT_QUEUE)) == 1
    assert stream.device.counters.tx_dropped_link_down == 1
    stream.device.set_link(True)  # a closed backend keeps the link down
    assert not stream.device.link_up and len(stream.link_reports) == 1


def test_a_peer_that_goes_while_the_guest_has_no_buffers_takes_the_link_down(stream):
    stream.start()
    stream.peer.sendall(stream_message(ethernet_frame(80)))
    stream.pump()
    assert not stream.watch.readable
    stream.peer.close()
    assert stream.pump() == 1  # the hang-up is reported while nothing is wanted
    assert not stream.device.link_up and stream.watch.closed


def test_a_peer_that_goes_while_transmitting_takes_the_link_down(stream):
    stream.start()
    stream.peer.close()
    stream.transmit(ethernet_frame(60), ethernet_frame(60))
    assert not stream.device.link_up
    assert len(stream.driver.collect(TRANSMIT_QUEUE)) == 2
    assert stream.device.counters.tx_dropped_link_down == 2


# On a worker --------------------------------------------------------------------------------------


def test_a_queue_worker_serves_the_doorbells_and_polls_the_backend(memory):
    rig = NetRig.stream(memory)
    worker = QueueWorker("net-test")
    bells = [doorbell(rig.device, queue) for queue in (RECEIVE_QUEUE, TRANSMIT_QUEUE)]
    try:
        for bell in bells:
            worker.add(bell)
        watch = worker.watch_readiness(rig.backend.fileno(), rig.device.backend_ready)
        rig.device.connect_backend_watch(watch)
        worker.start()
        rig.start()
        frames = [ethernet_frame(200, seed) for seed in range(3)]
        rig.peer.sendall(b"".join(stream_message(frame) for frame in frames))
        time.sleep(0.05)
        assert rig.device.counters.rx_stalls == 1  # no buffers yet: the worker stops polling
        posted = rig.post_receive_buffers(8, 2048, kick=False)
        bells[0].ring()
        wait_for(lambda: rig.device.counters.rx_frames == 3)
        assert [frame for _, frame in received(rig, posted)] == frames
        heads = rig.transmit(*frames, kick=False)
        bells[1].ring()
        assert read_stream_frames(rig.peer, 3) == frames
        wait_for(lambda: rig.device.counters.tx_frames == 3)
        assert [c.head for c in rig.driver.collect(TRANSMIT_QUEUE)] == heads
        rig.peer.close()
        wait_for(lambda: not rig.device.link_up)
        wakeups = worker.wakeups
        time.sleep(0.05)
        assert worker.wakeups == wakeups, "a closed backend must not keep the worker busy"
        assert len(rig.link_reports) == 1
    finally:
        worker.stop()
        for bell in bells:
            bell.close()
        rig.close()
