"""I/O watchpoints: callbacks on the accesses to an address range, built on the trace hook.

A `Watch` names a range of one address space and a callback; `WatchList` is the trace hook an
address space calls while at least one watch is set on it, and calls each watch whose range
the access touches with an `Access` (space, address, width, direction, value, region, vCPU).
With no watch set the space's hook is None again: the dispatcher's only cost is its one
attribute test. What a callback's answer means (go on, break) is the machine's business.

The vCPU of an access is the thread's: the machine names each vCPU thread with
`set_current_vcpu`, and `current_vcpu()` reads it (None on other threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple


class _ThreadState(threading.local):
    vcpu: int | None = None  # a class default: reading it on any thread costs no exception


_thread = _ThreadState()


def set_current_vcpu(index: int | None) -> None:
    """Record that the calling thread runs vCPU `index` (None: no vCPU)."""
    _thread.vcpu = index


def current_vcpu() -> int | None:
    """The vCPU the calling thread runs, if any."""
    return _thread.vcpu


class Access(NamedTuple):
    """One guest access that reached kvmlet: what a watch callback is given.

    `value` is what the guest wrote, or what the device answered to a read; `region` is the
    name of the region that handled it (None when unassigned)."""

    space: str
    address: int
    size: int
    is_write: bool
    value: int
    region: str | None
    vcpu: int | None

    def __str__(self) -> str:
        direction = "write" if self.is_write else "read"
        where = self.region or "unassigned"
        cpu = "" if self.vcpu is None else f" by vCPU {self.vcpu}"
        return (
            f"{self.space} {direction} of {self.size} bytes at {self.address:#x} "
            f"({where}) = {self.value:#x}{cpu}"
        )


WatchCallback = Callable[[Access], Any]


class Watch:
    """A callback on the accesses to [start, end) of the address space named `space`
    (`reads`/`writes` select the directions)."""

    __slots__ = ("callback", "end", "reads", "space", "start", "writes")

    def __init__(
        self,
        space: str,
        start: int,
        end: int,
        callback: WatchCallback,
        *,
        reads: bool = True,
        writes: bool = True,
    ):
        if not 0 <= start < end:
            raise ValueError(f"watch range {start:#x}-{end:#x} is empty or negative")
        self.space = space
        self.start = start
        self.end = end
        self.callback = callback
        self.reads = reads
        self.writes = writes

    def __repr__(self) -> str:
        return f"<Watch {self.space} {self.start:#x}-{self.end - 1:#x}>"

    def matches(self, address: int, size: int, is_write: bool) -> bool:
        return (
            address < self.end
            and address + size > self.start
            and (self.writes if is_write else self.reads)
        )


class WatchList:
    """The trace hook of an address space with watches: calls each matching watch.

    `dispatch(watch, access)` calls the watch's callback and handles its answer; the
    machine supplies it (break, stop on an exception)."""

    def __init__(self, dispatch: Callable[[Watch, Access], None]):
        self.dispatch = dispatch
        self.watches: tuple[Watch, ...] = ()

    def add(self, watch: Watch) -> None:
        self.watches = (*self.watches, watch)

    def remove(self, watch: Watch) -> None:
        self.watches = tuple(other for other in self.watches if other is not watch)

    def __bool__(self) -> bool:
        return bool(self.watches)

    def __call__(
        self, space: str, address: int, size: int, is_write: bool, value: int, region: str | None
    ) -> None:
        for watch in self.watches:
            if watch.matches(address, size, is_write):
                access = Access(space, address, size, is_write, value, region, current_vcpu())
                self.dispatch(watch, access)
