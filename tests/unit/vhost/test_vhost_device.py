"""VhostDevice with a vhost-user backend written in Python: queues handed over at DRIVER_OK and
taken back at reset, the data path through the backend's own mapping of guest RAM and the
kick/call eventfds (Python pops nothing), and a backend that breaks (NEEDS_RESET, logged once,
the guest unaffected)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmlet.memory import GuestMemory
from kvmlet.vhost import user_protocol as wire
from kvmlet.vhost.device import TRANSPORT_FEATURES, VhostDevice
from kvmlet.vhost.frontend import VhostError
from kvmlet.vhost.user import VhostUserFrontend
from kvmlet.vhost.user_protocol import Request
from kvmlet.virtio.device import DEVICE_NEEDS_RESET, InterruptKind
from kvmlet.virtio.worker import QueueWorker, doorbell
from tests.helpers.vhost_user_backend import (
    BLK_FEATURES,
    SILENCE,
    Answer,
    PythonBackend,
    reply,
)
from tests.helpers.virtio_driver import GUEST_RAM_SIZE, MockDriver

CHECKOUT = Path(__file__).resolve().parents[3]
TIMEOUT = 0.3
CONFIG = bytes(range(64, 128))
HANDSHAKE = 6
"""Messages before the driver's: the handshake (GET_FEATURES ... SET_OWNER), GET_CONFIG."""
HAND_OVER = [
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
    "SET_VRING_ERR",
]


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class Rig:
    """A VhostDevice on memfd guest RAM, its Python backend, a mock driver and a worker that
    relays the backend's call and err eventfds, as the machine's worker would."""

    def __init__(self, backend_options=None, device_options=None, timeout=3.0):
        self.memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend = PythonBackend(theirs, config=CONFIG, **(backend_options or {})).start()
        self.frontend = VhostUserFrontend(ours, name="python-backend", timeout=timeout)
        options = {"config_size": 60, **(device_options or {})}
        self.device = VhostDevice(
            self.memory,
            self.frontend,
            name="vhost-test",
            device_id=2,
            queue_sizes=[16, 16],
            **options,
        )
        self.driver = MockDriver(self.device, self.memory, 0x10000, 1 << 20)
        self.worker = QueueWorker("vhost-test")
        self.device.connect_worker(self.worker)
        self.worker.start()

    def start(self, queues=(0, 1)):
        """The driver's start-up (MockDriver.initialize); the messages from FEATURES_OK on."""
        self.driver.negotiate()
        mark = len(self.backend.messages)
        for index in queues:
            self.driver.setup_queue(index)
        self.device.write_status(15)
        return self.backend.names()[mark:]

    def messages(self, request):
        return [m for m in self.backend.messages if m.request == request]

    def close(self):
        self.worker.stop()
        self.device.close()
        self.backend.stop()
        self.memory.close()
        assert self.backend.error is None, self.backend.error


@pytest.fixture
def rig():
    made = []

    def make(**options):
        made.append(Rig(**options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def queue_interrupts(driver, queue=0):
    return driver.interrupts.count((InterruptKind.QUEUE, queue))


def test_features_and_config_come_from_the_backend(rig):
    r = rig()
    assert r.device.device_features == BLK_FEATURES & TRANSPORT_FEATURES
    assert not r.device.device_features & 1 << 30, "protocol features are not the guest's"
    assert r.device.config_size == 60
    assert r.device.read_config(4, 4) == int.from_bytes(CONFIG[4:8], "little")
    wider = rig(device_options={"features_mask": TRANSPORT_FEATURES | 1 << 9, "own_features": 4})
    assert wider.device.device_features == BLK_FEATURES & (TRANSPORT_FEATURES | 1 << 9) | 4


def test_driver_ok_hands_every_ready_queue_to_the_backend(rig):
    r = rig()
    assert r.start() == [
        "SET_FEATURES",
        "SET_MEM_TABLE",
        *HAND_OVER,
        *HAND_OVER,
        "SET_VRING_ENABLE",
        "SET_VRING_ENABLE",
    ]
    assert r.backend.acked_features == r.device.driver_features | 1 << 30
    fd_counts = [m.fd_count for m in r.backend.messages[HANDSHAKE + 1 :]]
    kick_call_err = [0, 0, 0, 1, 1, 1]
    assert fd_counts == [0, 1, *kick_call_err, *kick_call_err, 0, 0]
    for index, queue in r.driver.queues.items():
        vring = r.backend.vrings[index]
        assert (vring.num, vring.base) == (16, 0)
        assert vring.descriptor == r.memory.host_address(queue.descriptor_table, 1)
        assert vring.available == r.memory.host_address(queue.available_ring, 1)
        assert vring.used == r.memory.host_address(queue.used_ring, 1)
        assert vring.enabled


def test_requests_go_through_the_backend_and_python_pops_nothing(rig):
    r = rig()
    r.driver.initialize()
    head, (answer,) = r.driver.post_data(0, [b"hello ", b"vhost"], [11])
    os.eventfd_write(r.device.kick_eventfd(0), 1)  # what KVM does on the guest's notify write
    wait_until(lambda: queue_interrupts(r.driver) == 1)
    assert [(c.head, c.length) for c in r.driver.collect(0)] == [(head, 11)]
    assert r.memory.read(answer, 11) == b"tsohv olleh"
    assert r.backend.vrings[0].served == [b"hello vhost"]
    stats = r.device.stats()["queues"][0]
    assert stats["requests"] == 0 and stats["notifications"] == 0
    assert stats["interrupts"] == 1


def test_a_call_after_a_reset_is_not_an_interrupt(rig):
    r = rig()
    r.driver.initialize()
    r.device.relay_call(1)
    assert queue_interrupts(r.driver, 1) == 1
    r.device.write_status(0)
    r.device.relay_call(1)
    assert queue_interrupts(r.driver, 1) == 1, "a late call from the backend is dropped"


def test_a_kick_that_reaches_python_is_passed_to_the_backend(rig):
    r = rig()
    r.driver.initialize()
    r.driver.post_data(1, [b"abc"], [3])
    r.driver.kick(1)
    wait_until(lambda: queue_interrupts(r.driver, 1) == 1)
    assert r.device.stats()["queues"][1]["notifications"] == 1


def test_reset_takes_the_rings_back_and_renegotiation_hands_them_over_again(rig):
    r = rig()
    r.driver.initialize()
    r.driver.post_data(0, [b"x"], [1])
    os.eventfd_write(r.device.kick_eventfd(0), 1)
    wait_until(lambda: queue_interrupts(r.driver) == 1)
    before = len(r.backend.messages)
    version_1_only = 1 << 32
    r.driver.negotiate(wanted=version_1_only)
    assert r.device.status & 8, "FEATURES_OK"
    assert r.backend.names()[before:] == [
        "SET_VRING_ENABLE",
        "SET_VRING_ENABLE",
        "GET_VRING_BASE",
        "GET_VRING_BASE",
        "RESET_DEVICE",
        "GET_CONFIG",
    ]
    assert r.device.vring_bases == {0: 1, 1: 0}, "where the backend stopped each ring"
    for index in range(2):
        r.driver.setup_queue(index)
    r.driver.device.write_status(15)
    assert r.backend.acked_features == version_1_only | 1 << 30
    _, (answer,) = r.driver.post_data(0, [b"again"], [5])
    os.eventfd_write(r.device.kick_eventfd(0), 1)
    wait_until(lambda: queue_interrupts(r.driver) == 2)
    assert r.memory.read(answer, 5) == b"niaga"
    assert r.backend.vrings[0].base == 1, "the new ring started from 0"


def test_a_queue_readied_late_is_handed_over_then(rig):
    r = rig()
    assert r.start(queues=[0]) == ["SET_FEATURES", "SET_MEM_TABLE", *HAND_OVER, "SET_VRING_ENABLE"]
    before = len(r.backend.messages)
    r.driver.setup_queue(1)
    assert r.backend.names()[before:] == [*HAND_OVER, "SET_VRING_ENABLE"]
    assert r.messages(Request.SET_VRING_ENABLE)[-1].payload == wire.vring_state(1, 1)


def test_a_disabled_queue_comes_back_from_the_backend(rig):
    r = rig()
    r.driver.initialize()
    before = len(r.backend.messages)
    r.device.set_queue_ready(1, False)
    assert r.backend.names()[before:] == ["SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert r.backend.messages[-1].payload == wire.vring_state(1, 0)
    r.driver.setup_queue(1)
    assert r.backend.names()[before + 2 :] == [*HAND_OVER, "SET_VRING_ENABLE"]


def test_only_the_backend_queues_go_to_the_backend(rig):
    r = rig(device_options={"backend_queues": 1})
    assert r.start() == ["SET_FEATURES", "SET_MEM_TABLE", *HAND_OVER, "SET_VRING_ENABLE"]
    assert [r.device.call_eventfd(index) is None for index in (0, 1)] == [False, True]
    r.driver.post_data(1, [b"held"], [4])
    r.device.notify(1)
    assert r.device.stats()["queues"][1]["notifications"] == 1
    assert r.driver.collect(1) == [], "the device's own queue stays idle"


def test_a_backend_queue_is_never_a_workers_doorbell(rig):
    """The backend reads its kick eventfds: a worker draining one would steal its kicks. A
    queue the device keeps may have a doorbell, and a round of it pops nothing."""
    r = rig(device_options={"backend_queues": 1})
    bells = [doorbell(r.device, queue) for queue in (0, 1)]
    try:
        with pytest.raises(ValueError, match="kicked through its backend"):
            r.worker.add(bells[0])
        assert r.worker.doorbells == []
        r.worker.add(bells[1])
        r.start()
        r.driver.post_data(1, [b"held"], [4])
        bells[1].ring()
        wait_until(lambda: r.worker.notifications == 1)
        assert r.device.serve(1) is False
        assert r.driver.collect(1) == [], "the device's own queue stays idle"
    finally:
        for bell in bells:
            bell.close()


def test_a_backend_without_a_config_space_leaves_the_devices_own(rig):
    plain = {"protocol_features": 1 << wire.PROTOCOL_F_MQ | 1 << wire.PROTOCOL_F_REPLY_ACK}
    r = rig(backend_options=plain, device_options={"config": b"tag\0" + bytes(36)})
    assert r.device.config_size == 40
    assert r.device.read_config(0, 4) == int.from_bytes(b"tag\0", "little")
    r.device.write_config(0, 1, 0x41)
    assert r.messages(Request.SET_CONFIG) == [] and r.device.read_config(0, 1) == ord("t")
    r.driver.initialize()
    assert r.messages(Request.GET_CONFIG) == [], "nothing to refresh at reset"


def test_config_writes_go_to_the_backend(rig):
    r = rig()
    r.device.write_config(20, 2, 0xBEEF)
    assert r.messages(Request.SET_CONFIG)[0].payload == wire.config_access(20, b"\xef\xbe")
    assert r.device.read_config(20, 2) == 0xBEEF
    assert r.backend.config[20:22] == b"\xef\xbe"
    r.device.write_config(59, 2, 0xFFFF)
    assert len(r.messages(Request.SET_CONFIG)) == 1, "a write past the config is ignored"


# A backend that breaks ------------------------------------------------------------------------


def backend_warnings(caplog):
    return [record for record in caplog.records if record.name == "kvmlet.vhost.device"]


def test_a_backend_that_hangs_up_puts_the_device_in_needs_reset_once(rig, caplog):
    caplog.set_level(logging.WARNING)
    r = rig()
    r.driver.initialize()
    r.backend.hang_up()
    r.device.check_backend()
    assert r.driver.needs_reset
    assert r.driver.interrupts[-1] == (InterruptKind.CONFIG, None)
    assert r.device.stats()["backend_error"] == "the backend closed the connection"
    r.device.check_backend()
    r.device.write_status(0)
    assert r.device.status == 0, "a reset completes: the driver waits for status 0"
    r.start()
    assert r.driver.needs_reset
    assert len(backend_warnings(caplog)) == 1
    message = backend_warnings(caplog)[0].getMessage()
    assert message.startswith("vhost-test: vhost backend python-backend: the backend closed")
    assert "the guest keeps running" in message


@pytest.mark.parametrize(
    "answer",
    [SILENCE, Answer(b"\x09\x00\x00"), Answer(reply(2, wire.u64(0))), Answer(reply(9, b"\1"))],
    ids=["silence", "short", "other-request", "bad-size"],
)
def test_a_bad_reply_at_driver_ok_is_needs_reset_not_a_hang(rig, answer, caplog):
    caplog.set_level(logging.WARNING)
    misbehave = lambda request: answer if request == Request.SET_VRING_ADDR else None  # noqa: E731
    r = rig(backend_options={"misbehave": misbehave}, timeout=TIMEOUT)
    started = time.monotonic()
    r.driver.initialize()
    assert time.monotonic() - started < TIMEOUT + 0.5
    assert r.device.status & DEVICE_NEEDS_RESET
    assert (InterruptKind.CONFIG, None) in r.driver.interrupts
    assert r.device.read_config(0, 4) == int.from_bytes(CONFIG[:4], "little")
    assert len(backend_warnings(caplog)) == 1


def test_the_err_eventfd_puts_the_device_in_needs_reset(rig):
    r = rig()
    r.driver.initialize()
    r.backend.signal_error(1)
    wait_until(lambda: r.driver.needs_reset)
    assert r.device.backend_error == "the backend found queue 1 broken"


def test_a_refused_request_is_needs_reset_and_the_next_start_works(rig):
    refuse_once = iter([Answer(reply(5, wire.u64(1)))])
    r = rig(
        backend_options={
            "misbehave": lambda request: next(refuse_once, None) if request == 5 else None
        }
    )
    r.driver.initialize()
    assert r.driver.needs_reset
    assert "refused SET_MEM_TABLE (status 1)" in r.device.backend_error
    r.driver.initialize()
    assert not r.driver.needs_reset and r.device.running


# Construction -------------------------------------------------------------------------------


def test_a_vhost_user_device_needs_shareable_ram():
    memory = GuestMemory.anonymous([(0, GUEST_RAM_SIZE)])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = PythonBackend(theirs).start()
    frontend = VhostUserFrontend(ours, timeout=3.0)
    try:
        with pytest.raises(VhostError, match="needs guest RAM in a memfd"):
            VhostDevice(memory, frontend, name="blk", device_id=2, queue_sizes=[16])
    finally:
        frontend.close()
        backend.stop()
        memory.close()


@pytest.mark.parametrize(
    ("backend_options", "device_options", "error"),
    [
        ({"features": 1 << 29}, {}, "does not offer VIRTIO_F_VERSION_1"),
        ({"protocol_features": 1 << wire.PROTOCOL_F_MQ}, {}, "does not give its configuration"),
        ({"queue_num": 1}, {}, "serves 1 queues, the device needs 2"),
        ({}, {"backend_queues": 3}, "3 backend queues of 2"),
    ],
)
def test_a_backend_that_cannot_serve_the_device_is_refused(backend_options, device_options, error):
    memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = PythonBackend(theirs, **backend_options).start()
    frontend = VhostUserFrontend(ours, timeout=3.0)
    try:
        with pytest.raises((VhostError, ValueError), match=error):
            VhostDevice(
                memory,
                frontend,
                name="blk",
                device_id=2,
                queue_sizes=[16, 16],
                config_size=60,
                **device_options,
            )
    finally:
        frontend.close()
        backend.stop()
        memory.close()


def test_closing_stops_the_rings_and_releases_the_eventfds(rig):
    r = rig()
    r.driver.initialize()
    fds = [r.device.call_eventfd(0).fd, r.device.kick_eventfd(0)]
    r.device.close()
    assert r.backend.names()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]
    assert r.frontend.fileno() is None
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    r.device.notify(0)  # a late kick after close is harmless


# A backend in another process ---------------------------------------------------------------


def test_a_backend_in_another_process_serves_the_guest(tmp_path):
    path = tmp_path / "backend.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.vhost_user_backend", str(path)],
        cwd=CHECKOUT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    memory = GuestMemory.memfd([(0, GUEST_RAM_SIZE)])
    try:
        wait_until(path.exists, timeout=30)
        frontend = VhostUserFrontend.connect(str(path), name="process", timeout=5.0)
        device = VhostDevice(memory, frontend, name="vhost-test", device_id=2, queue_sizes=[16, 16])
        driver = MockDriver(device, memory, 0x10000, 1 << 20)
        driver.initialize()
        head, (answer,) = driver.post_data(0, [b"across processes"], [16])
        os.eventfd_write(device.kick_eventfd(0), 1)
        call = device.call_eventfd(0).fd
        wait_until(lambda: _readable(call))
        assert os.eventfd_read(call) == 1
        assert [(c.head, c.length) for c in driver.collect(0)] == [(head, 16)]
        assert memory.read(answer, 16) == b"sessecorp ssorca"
        device.close()
        output, errors = process.communicate(timeout=30)
        assert process.returncode == 0, errors
        assert output.startswith("served ")
    finally:
        process.kill()
        process.wait()
        memory.close()


def _readable(fd: int) -> bool:
    try:
        value = os.eventfd_read(fd)
    except BlockingIOError:
        return False
    os.eventfd_write(fd, value)
    return True
