"""Throughput of virtio-net's Python data path alone, driven by the mock driver (no KVM).

Each case moves frames of one size through the device for a few seconds, between the mock
driver (playing the guest) and a peer process on the other end of a socketpair: a sink that
reads and discards (transmit cases) or a source that writes as fast as it can (receive cases).
Backends: `stream` is QEMU's stream protocol as passt speaks it; `vnet` is a seqpacket socket
with the virtio-net header, which is what a tap with IFF_VNET_HDR looks like to the device.

The device's own work (`notify` for transmit, `backend_ready` for receive) is timed with the
thread's CPU clock, apart from the mock driver's; frames/s and MiB/s are per CPU-second of
that work, i.e. what one core spent on the Python path sustains. `wall_*` is the rate the
whole loop reached (driver included). The reference is a bare Python loop moving the same
frames over the same kind of socket in the same run (sendmsg of a batch; recv of a length
then the frame), the floor for any Python data path.

Prints JSON lines. Usage: python3 benchmarks/net_model.py [--seconds 2] [--case NAME]
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.memory import GuestMemory
from kvmlet.virtio.net.config import (
    HEADER,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
)
from kvmlet.virtio.net.device import RECEIVE_QUEUE, TRANSMIT_QUEUE
from kvmlet.virtio.net.frames import DatagramBackend
from kvmlet.virtio.net.stream import StreamBackend
from tests.helpers.net import NetRig, ethernet_frame

MIB = 1 << 20
RECEIVE_BUFFER = 4096  # a page per receive buffer, as Linux posts them at a large MTU
TRANSMIT_BATCH = 64

SINK = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
buffer = bytearray(1 << 20)
while s.recv_into(buffer):
    pass
"""

SOURCE = """
import socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
size, stream = int(sys.argv[2]), sys.argv[3] == "stream"
frame = b"\\xff" * 6 + b"\\x52\\x54\\x00\\x12\\x34\\x56" + b"\\x08\\x00" + bytes(size - 14)
try:
    if stream:
        chunk = (struct.pack(">I", size) + frame) * max(1, (1 << 18) // (size + 4))
        while True:
            s.sendall(chunk)
    else:
        message = bytes(12) + frame
        while True:
            s.send(message)
except OSError:
    pass
"""

CASES = {
    "tx_stream_1514": ("tx", "stream", 1514),
    "tx_stream_65534": ("tx", "stream", 65534),
    "tx_vnet_1514": ("tx", "vnet", 1514),
    "tx_vnet_gso_65534": ("tx", "vnet", 65534),
    "rx_stream_1514": ("rx", "stream", 1514),
    "rx_stream_65534": ("rx", "stream", 65534),
    "rx_vnet_1514": ("rx", "vnet", 1514),
    # The same without mergeable buffers: each frame in one indirect chain of 17 pages, as
    # Linux posts "big packets" when the device does not offer VIRTIO_NET_F_MRG_RXBUF.
    "rx_stream_65534_big_buffers": ("rx", "stream", 65534),
}
BIG_PACKET_PAGES = 17


def socket_pair(backend_kind):
    kind = socket.SOCK_STREAM if backend_kind == "stream" else socket.SOCK_SEQPACKET
    ours, peer = socket.socketpair(socket.AF_UNIX, kind)
    for sock in (ours, peer):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return ours, peer


def start_peer(script, peer, *arguments):
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(peer.fileno()), *map(str, arguments)],
        pass_fds=[peer.fileno()],
    )
    peer.close()
    return process


def make_rig(memory, backend_kind, ours, mergeable=True):
    if backend_kind == "stream":
        backend = StreamBackend(ours, "benchmark peer")
    else:
        backend = DatagramBackend(ours, "benchmark peer", vnet_header=True, offloads=0x0F)
    rig = NetRig(memory, backend, None, mtu=65520)
    offered = rig.device.device_features_word(0) | rig.device.device_features_word(1) << 32
    rig.start(offered if mergeable else offered & ~(1 << VIRTIO_NET_F_MRG_RXBUF))
    return rig


def wait_ready(rig):
    """Block until the backend is ready for what the device waits for (as the worker does)."""
    wanted = ([rig.backend.fileno()] if rig.watch.readable else [], [rig.backend.fileno()])
    select.select(wanted[0], wanted[1] if rig.watch.writable else [], [], 0.1)


def run_transmit(rig, size, seconds):
    driver, memory = rig.driver, rig.memory
    gso = size > 1514 and rig.backend.vnet_header
    head = (
        HEADER.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, 0)
        if gso
        else bytes(12)
    )
    buffers = []
    for seed in range(TRANSMIT_BATCH):
        header_address, frame_address = driver.allocate(12), driver.allocate(size, 64)
        memory.write(header_address, head)
        memory.write(frame_address, ethernet_frame(size, seed))
        buffers.append([(header_address, 12), (frame_address, size)])
    frames = cpu = 0.0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for readable in buffers:
            driver.post(TRANSMIT_QUEUE, readable, [])
        before = time.thread_time()
        driver.kick(TRANSMIT_QUEUE)
        while rig.watch.writable:
            cpu += time.thread_time() - before
            wait_ready(rig)
            before = time.thread_time()
            rig.pump(1)
        cpu += time.thread_time() - before
        frames += len(driver.collect(TRANSMIT_QUEUE))
    return frames, cpu, time.perf_counter() - started


def run_receive(rig, size, seconds, pages=1):
    """Keep the receive ring full of chains of `pages` 4 KiB buffers (indirect if several)."""
    driver = rig.driver
    chains = driver.queues[RECEIVE_QUEUE].size // (2 if pages > 1 else 1)
    free = [
        (
            [(driver.allocate(RECEIVE_BUFFER, 4096), RECEIVE_BUFFER) for _ in range(pages)],
            driver.allocate(16 * pages, 16),
        )
        for _ in range(chains)
    ]
    posted = {}
    frames = cpu = 0.0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        while free:
            buffers, table = chain = free.pop()
            head = driver.post(RECEIVE_QUEUE, [], buffers, indirect=pages > 1, table=table)
            posted[head] = chain
        before = time.thread_time()
        driver.kick(RECEIVE_QUEUE)
        rig.device.backend_ready(True, False, False)
        cpu += time.thread_time() - before
        for completion in driver.collect(RECEIVE_QUEUE):
            free.append(posted.pop(completion.head))
        frames = rig.device.counters.rx_frames
    return frames, cpu, time.perf_counter() - started


def reference(direction, backend_kind, size, seconds):
    """A bare Python loop moving the same frames over the same kind of socket."""
    ours, peer = socket_pair(backend_kind)
    frame = ethernet_frame(size)
    process = start_peer(SINK if direction == "tx" else SOURCE, peer, size, backend_kind)
    frames, started, cpu_start = 0, time.perf_counter(), time.thread_time()
    try:
        if direction == "tx":
            batch = (
                [part for _ in range(TRANSMIT_BATCH) for part in (struct.pack(">I", size), frame)]
                if backend_kind == "stream"
                else None
            )
            while time.perf_counter() - started < seconds:
                if batch is not None:
                    ours.sendmsg(batch)
                else:
                    for _ in range(TRANSMIT_BATCH):
                        ours.sendmsg([bytes(12), frame])
                frames += TRANSMIT_BATCH
        else:
            buffer = memoryview(bytearray(size + 64))
            while time.perf_counter() - started < seconds:
                if backend_kind == "stream":
                    ours.recv_into(buffer[:4], 4, socket.MSG_WAITALL)
                    ours.recv_into(buffer, size, socket.MSG_WAITALL)
                else:
                    ours.recv_into(buffer)
                frames += 1
    finally:
        cpu = time.thread_time() - cpu_start
        ours.close()
        process.kill()
        process.wait()
    return frames / cpu


def measure(name, seconds):
    direction, backend_kind, size = CASES[name]
    memory = GuestMemory.anonymous([(0, 64 << 20)])
    ours, peer = socket_pair(backend_kind)
    big_buffers = name.endswith("_big_buffers")
    rig = make_rig(memory, backend_kind, ours, mergeable=not big_buffers)
    process = start_peer(SINK if direction == "tx" else SOURCE, peer, size, backend_kind)
    try:
        if direction == "tx":
            frames, cpu, wall = run_transmit(rig, size, seconds)
        else:
            pages = BIG_PACKET_PAGES if big_buffers else 1
            frames, cpu, wall = run_receive(rig, size, seconds, pages)
    finally:
        process.kill()
        process.wait()
        rig.close()
        memory.close()
    reference_rate = reference(direction, backend_kind, size, seconds)
    rate = frames / cpu
    return {
        "case": name,
        "frame_bytes": size,
        "frames_per_s": round(rate),
        "mib_per_s": round(rate * size / MIB, 1),
        "cpu_us_per_frame": round(1e6 / rate, 2),
        "cpu_ms_per_mib": round(1e3 * MIB / (rate * size), 3),
        "wall_frames_per_s": round(frames / wall),
        "reference_frames_per_s": round(reference_rate),
        "ratio_to_reference": round(rate / reference_rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    arguments = parser.parse_args()
    for name in arguments.case or CASES:
        print(json.dumps(measure(name, arguments.seconds)), flush=True)


if __name__ == "__main__":
    main()
