"""Watchpoints on the bus: trace hooks shared by several users, a watch list calling the watches
an access touches, and nothing left on the dispatch path once the last one goes."""

from __future__ import annotations

import threading

import pytest

from kvmlet.bus import AccessSizes, IoRegion, port_io_space
from kvmlet.bus.watch import Access, Watch, WatchList, current_vcpu, set_current_vcpu


class Register:
    def __init__(self):
        self.value = 0

    def read(self, offset, size):
        return self.value

    def write(self, offset, size, value):
        self.value = value


def space_with_device():
    space = port_io_space()
    region = IoRegion("dev", 4, Register(), valid=AccessSizes(1, 4), impl=AccessSizes(4, 4))
    space.root.add_subregion(0x100, region)
    return space


def test_trace_hooks_fan_out_and_the_last_removal_leaves_none():
    space = space_with_device()
    first, second = [], []
    hook_a, hook_b = (lambda *event: first.append(event)), (lambda *event: second.append(event))
    space.add_trace(hook_a)
    assert space.trace is hook_a  # one hook: called directly
    space.add_trace(hook_b)
    space.write(0x100, 4, 7)
    assert first == second == [("io", 0x100, 4, True, 7, "dev")]
    space.remove_trace(hook_a)
    assert space.trace is hook_b
    space.remove_trace(hook_b)
    assert space.trace is None


def test_a_bound_method_hook_is_removed_by_another_binding_of_it():
    space = space_with_device()
    calls = []

    class Recorder:
        def hook(self, *event):
            calls.append(event)

    recorder = Recorder()
    space.add_trace(recorder.hook)
    space.remove_trace(recorder.hook)
    assert space.trace is None


def test_a_watch_list_calls_the_watches_an_access_touches_with_the_vcpu():
    space = space_with_device()
    calls = []
    watches = WatchList(lambda watch, access: calls.append((watch, access)))
    byte_two = Watch("io", 0x102, 0x103, print)
    reads_only = Watch("io", 0x100, 0x104, print, writes=False)
    elsewhere = Watch("io", 0x200, 0x300, print)
    for watch in (byte_two, reads_only, elsewhere):
        watches.add(watch)
    space.add_trace(watches)
    set_current_vcpu(3)
    try:
        space.write(0x100, 4, 0x55)  # bytes 0x100-0x103: touches byte_two
        assert space.read(0x101, 1) == 0x00  # byte 0x101: reads_only only
    finally:
        set_current_vcpu(None)
    assert [(watch, access) for watch, access in calls] == [
        (byte_two, Access("io", 0x100, 4, True, 0x55, "dev", 3)),
        (reads_only, Access("io", 0x101, 1, False, 0x00, "dev", 3)),
    ]
    watches.remove(byte_two)
    watches.remove(reads_only)
    watches.remove(elsewhere)
    assert not watches


def test_unassigned_accesses_are_watched_too_and_described():
    space = port_io_space()
    seen = []
    watches = WatchList(lambda watch, access: seen.append(access))
    watches.add(Watch("io", 0x80, 0x81, print))
    space.add_trace(watches)
    assert space.read(0x80, 1) == 0xFF
    assert str(seen[0]) == "io read of 1 bytes at 0x80 (unassigned) = 0xff"
    assert str(seen[0]._replace(vcpu=1)).endswith("by vCPU 1")


def test_the_current_vcpu_is_per_thread():
    set_current_vcpu(2)
    other = []
    thread = threading.Thread(target=lambda: other.append(current_vcpu()))
    thread.start()
    thread.join()
    assert (current_vcpu(), other) == (2, [None])
    set_current_vcpu(None)


def test_empty_or_inverted_ranges_are_refused():
    with pytest.raises(ValueError, match="empty"):
        Watch("io", 5, 5, print)
