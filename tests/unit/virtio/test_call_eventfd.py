"""CallEventfd: a backend's call eventfd is delivered by KVM (bound) or by the relay, never both,
and no write is lost when it switches. KVM's part is played by tests/helpers/irqfd.py."""

from __future__ import annotations

import logging
import os
import time

import pytest

from kvmlet.virtio.call import CallEventfd
from kvmlet.virtio.worker import QueueWorker
from tests.helpers.irqfd import IrqfdController, Watch, readable


class Rig:
    def __init__(self):
        self.relays = 0
        self.kvm = IrqfdController()
        self.vector = self.kvm.vector(1)
        self.vector.update(0xFEE0_0000, 0x41, masked=False)
        self.call = CallEventfd("test queue 0", self.relay)
        self.watch = Watch(self.call.fd, self.call.ready)
        self.call.connect_watch(self.watch)

    def relay(self):
        self.relays += 1

    def write(self):
        self.kvm.backend_write(self.call.fd)

    def worker_round(self):
        """What the worker does: call `ready` while the watch wants a readable fd that is."""
        if self.watch.wanted == (True, False) and readable(self.call.fd):
            self.watch.callback(True, False, False)


@pytest.fixture
def rig():
    made = Rig()
    yield made
    made.call.close()


def test_unbound_writes_are_relayed_by_the_worker(rig):
    assert rig.watch.wanted == (True, False)
    rig.write()
    rig.write()
    rig.worker_round()
    assert (rig.relays, rig.call.relayed, rig.vector.direct) == (1, 1, 0)
    assert not readable(rig.call.fd)
    assert rig.call.stats() == {"path": "relay", "relayed": 1, "binds": 0}


def test_bound_writes_go_to_the_vector_and_the_watch_is_off(rig):
    rig.call.bind(rig.vector)
    assert rig.watch.wanted == (False, False)
    assert rig.vector.attached == {rig.call.fd}
    rig.write()
    rig.call.ready(True, False, False)  # a readiness the worker saw before the switch
    assert (rig.vector.direct, rig.relays) == (1, 0)
    assert rig.call.stats() == {"path": "irqfd", "relayed": 0, "binds": 1}
    rig.call.bind(rig.vector)
    assert rig.vector.attachments == [("attach", rig.call.fd)], "binding again changes nothing"


def test_a_count_waiting_when_bound_is_delivered_once(rig):
    rig.write()
    rig.call.bind(rig.vector)
    assert rig.vector.direct == 1, "KVM delivers the count it finds at attach"
    rig.call.ready(True, False, False)  # the worker saw it readable before the switch
    rig.call.bind(None)
    rig.worker_round()
    assert rig.relays == 0, "the relay never reads a count KVM delivered"
    assert rig.vector.attached == set()


def test_back_on_the_relay_a_write_during_the_switch_is_relayed_at_once(rig):
    rig.call.bind(rig.vector)
    detach = rig.vector.detach

    def detach_then_write(fd):
        detach(fd)
        os.eventfd_write(fd, 1)  # the backend writes just after KVM let go

    rig.vector.detach = detach_then_write
    rig.call.bind(None)
    assert rig.relays == 1, "bind checks the eventfd once, before any worker round"
    assert rig.watch.wanted == (True, False)
    rig.worker_round()
    assert rig.relays == 1


def test_moving_to_another_vector_detaches_from_the_first(rig):
    other = rig.kvm.vector(2)
    other.update(0xFEE0_0000, 0x42, masked=False)
    rig.call.bind(rig.vector)
    rig.call.bind(other)
    assert (rig.vector.attached, other.attached) == (set(), {rig.call.fd})
    rig.write()
    assert (rig.vector.direct, other.direct, rig.relays) == (0, 1, 0)
    assert rig.watch.wanted == (False, False)


def test_a_refused_attach_leaves_the_relay_with_one_warning(rig, caplog):
    rig.vector.refuse_attach = True
    with caplog.at_level(logging.WARNING, "kvmlet.virtio.call"):
        rig.call.bind(rig.vector)
        rig.call.bind(None)
        rig.call.bind(rig.vector)
    assert not rig.call.bound
    assert rig.watch.wanted == (True, False)
    assert len([r for r in caplog.records if "stay relayed" in r.message]) == 1
    rig.write()
    rig.worker_round()
    assert rig.relays == 1


def test_closing_detaches_stops_the_watch_and_closes_the_eventfd():
    rig = Rig()
    fd = rig.call.fd
    rig.call.bind(rig.vector)
    rig.call.close()
    assert rig.vector.attached == set() and rig.watch.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    rig.call.bind(rig.vector)
    rig.call.ready(True, False, False)
    assert rig.vector.attached == set() and rig.relays == 0


def test_with_a_real_worker_a_write_is_relayed_until_bound():
    relays = []
    kvm = IrqfdController()
    vector = kvm.vector(0)
    vector.update(0xFEE0_0000, 0x41, masked=False)
    call = CallEventfd("worker queue", lambda: relays.append(1))
    worker = QueueWorker("call-test")
    call.connect_watch(worker.watch_readiness(call.fd, call.ready))
    worker.start()
    try:
        kvm.backend_write(call.fd)
        _wait(lambda: relays)
        call.bind(vector)
        kvm.backend_write(call.fd)
        call.bind(None)
        kvm.backend_write(call.fd)
        _wait(lambda: len(relays) == 2)
        assert vector.direct == 1
        assert worker.stats()["device_errors"] == 0
    finally:
        worker.stop()
        call.close()


def _wait(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)
