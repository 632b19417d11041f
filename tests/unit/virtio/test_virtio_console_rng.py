"""virtio-console (both directions, pending input, resize) and virtio-rng."""

from __future__ import annotations

import threading

from kvmlet.virtio.console import (
    MAX_OUTPUT_CHUNK,
    MAX_PENDING_INPUT,
    RECEIVE_QUEUE,
    TRANSMIT_QUEUE,
    VirtioConsole,
)
from kvmlet.virtio.device import InterruptKind
from kvmlet.virtio.rng import MAX_BYTES_PER_REQUEST, VirtioRng
from tests.helpers.virtio_driver import MockDriver


def start_console(memory):
    output = []
    console = VirtioConsole(memory, output.append)
    driver = MockDriver(console, memory, 0x1000, 3 << 20)
    return console, driver, output


def test_guest_output_is_handed_over_once_per_chain(memory):
    console, driver, output = start_console(memory)
    driver.initialize()
    driver.post_data(TRANSMIT_QUEUE, [b"hello ", b"world\n"], [])
    driver.post_data(TRANSMIT_QUEUE, [b"second"], [], indirect=True)
    driver.kick(TRANSMIT_QUEUE)
    assert output == [b"hello world\n", b"second"]
    assert [c.length for c in driver.collect(TRANSMIT_QUEUE)] == [0, 0]
    assert console.stats()["queues"][TRANSMIT_QUEUE]["bytes_from_guest"] == 18


def test_host_input_fills_posted_receive_buffers(memory):
    console, driver, _ = start_console(memory)
    driver.initialize()
    _, (first,) = driver.post_data(RECEIVE_QUEUE, [], [4])
    _, (second,) = driver.post_data(RECEIVE_QUEUE, [], [4])
    driver.kick(RECEIVE_QUEUE)
    assert driver.collect(RECEIVE_QUEUE) == []
    assert console.receive(b"abcdef") == 6
    assert [c.length for c in driver.collect(RECEIVE_QUEUE)] == [4, 2]
    assert memory.read(first, 4) == b"abcd" and memory.read(second, 2) == b"ef"
    assert (InterruptKind.QUEUE, RECEIVE_QUEUE) in driver.interrupts
    assert console.pending_input == 0


def test_input_waits_for_buffers_and_is_capped(memory):
    console, driver, _ = start_console(memory)
    assert console.receive(b"early") == 5, "accepted before the driver is up"
    driver.initialize()
    assert console.receive(b"x" * MAX_PENDING_INPUT) == MAX_PENDING_INPUT - 5
    assert console.receive(b"more") == 0
    _, (buffer,) = driver.post_data(RECEIVE_QUEUE, [], [8])
    driver.kick(RECEIVE_QUEUE)
    assert memory.read(buffer, 8) == b"earlyxxx"
    assert console.pending_input == MAX_PENDING_INPUT - 8


def test_receive_queue_asks_for_a_kick_when_input_is_pending(memory):
    console, driver, _ = start_console(memory)
    driver.initialize()
    driver.post_data(RECEIVE_QUEUE, [], [16])
    driver.kick(RECEIVE_QUEUE)
    console.receive(b"x")
    console.receive(b"abc")
    assert console.pending_input == 3
    driver.post_data(RECEIVE_QUEUE, [], [16])
    assert driver.should_kick(RECEIVE_QUEUE, event_index=True), "avail_event moved on"
    driver.kick(RECEIVE_QUEUE)
    assert [c.length for c in driver.collect(RECEIVE_QUEUE)] == [1, 3]


def test_resize_updates_config_and_raises_a_config_interrupt(memory):
    console, driver, _ = start_console(memory)
    assert (console.read_config(0, 2), console.read_config(2, 2)) == (80, 25)
    driver.initialize()
    console.resize(132, 43)
    assert (console.read_config(0, 2), console.read_config(2, 2)) == (132, 43)
    assert driver.interrupts == [(InterruptKind.CONFIG, None)]


def test_rng_fills_writable_buffers_up_to_the_cap(memory):
    rng = VirtioRng(memory)
    driver = MockDriver(rng, memory, 0x1000, 3 << 20)
    driver.initialize()
    _, (small,) = driver.post_data(0, [], [32])
    _, big = driver.post_data(0, [], [MAX_BYTES_PER_REQUEST, 4096])
    driver.post_data(0, [b"read-only"], [])
    driver.kick(0)
    assert [c.length for c in driver.collect(0)] == [32, MAX_BYTES_PER_REQUEST, 0]
    assert memory.read(small, 32) != b"\xee" * 32
    assert memory.read(big[1], 4096) == b"\xee" * 4096, "nothing past the cap"


def test_huge_output_chain_is_handed_over_in_bounded_pieces(memory):
    _, driver, output = start_console(memory)
    driver.initialize()
    driver.post_data(TRANSMIT_QUEUE, [b"a" * MAX_OUTPUT_CHUNK, b"b" * 10], [])
    driver.kick(TRANSMIT_QUEUE)
    assert output == [b"a" * MAX_OUTPUT_CHUNK, b"b" * 10]


def test_input_from_a_host_thread_races_safely_with_the_guest(memory):
    console, driver, _ = start_console(memory)
    driver.initialize()
    chunks = [bytes([65 + i % 26]) * 7 for i in range(300)]
    accepted = []
    feeder = threading.Thread(target=lambda: accepted.extend(map(console.receive, chunks)))
    free_buffers = [driver.allocate(16) for _ in range(8)]
    posted = {}
    received = bytearray()
    feeder.start()
    while feeder.is_alive() or console.pending_input:
        while free_buffers:
            address = free_buffers.pop()
            posted[driver.post(RECEIVE_QUEUE, [], [(address, 16)])] = address
        driver.kick(RECEIVE_QUEUE)
        for completion in driver.collect(RECEIVE_QUEUE):
            address = posted.pop(completion.head)
            received += memory.read(address, completion.length)
            free_buffers.append(address)
    feeder.join()
    assert sum(accepted) == 7 * len(chunks)
    assert bytes(received) == b"".join(chunks)
