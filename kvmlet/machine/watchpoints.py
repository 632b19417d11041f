"""Watchpoints and breaks of a running machine: `Machine.watch`, `pause`, `resume`.

A watch is a callback on the accesses to a range of the port or MMIO space (see
`kvmlet.bus.watch`), called on the vCPU thread that made the access, after the device handled
it. What it returns or raises decides what happens next:

- None (or anything but BREAK): the guest goes on (a log, a counter, a check that passed);
- `BREAK`: a breakpoint. Every vCPU is paused (each parks when it next leaves KVM_RUN, the
  others kicked out of it) and `wait_for_break()` hands the access to the caller, who may look
  at guest memory and registers, unwatch, add devices, then `resume()` or `stop()`;
- an exception (a failed assertion): the run stops with `StopReason.WATCH_FAILED`, the
  exception kept in `Machine.watch_error`.

A paused vCPU waits in the run loop's "should I stop?" question, which the machine answers;
so pausing needs nothing of the run loop beyond what stopping already uses.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from kvmlet.bus import AddressSpace
from kvmlet.bus.watch import Access, Watch, WatchCallback, WatchList
from kvmlet.errors import KvmletError
from kvmlet.vstate.vcpu_loop import StopReason

if TYPE_CHECKING:
    from kvmlet.kvm import Vcpu
    from kvmlet.machine.machine import Machine

BREAK = "break"
"""What a watch callback returns to pause the machine and hand control to the caller."""


class Watchpoints:
    """The watches and the pause state of one machine."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.lists: dict[str, WatchList] = {}
        self.condition = threading.Condition()
        self.paused = False
        self.parked: set[int] = set()
        self.hit: Access | None = None
        self.error: BaseException | None = None

    def address_space(self, space: str | AddressSpace) -> AddressSpace:
        """The space `space` names ("io"/"port" or "mmio"/"memory"), or `space` itself."""
        machine = self.machine
        if isinstance(space, AddressSpace):
            return space
        if space in ("io", "port"):
            return machine.io
        if space in ("mmio", "memory"):
            return machine.mmio
        raise KvmletError(f"unknown address space {space!r}: use 'io' or 'mmio'")

    def add(self, target: AddressSpace, watch: Watch) -> None:
        """Start calling `watch` on the accesses of `target` (the space it names)."""
        watches = self.lists.get(target.name)
        if watches is None:
            watches = self.lists[target.name] = WatchList(self._dispatch)
            watches.add(watch)
            target.add_trace(watches)
        else:
            watches.add(watch)

    def unwatch(self, watch: Watch) -> None:
        watches = self.lists.get(watch.space)
        if watches is None:
            return
        watches.remove(watch)
        if not watches:
            del self.lists[watch.space]
            self.address_space(watch.space).remove_trace(watches)

    def _dispatch(self, watch: Watch, access: Access) -> None:
        try:
            answer = watch.callback(access)
        except Exception as error:  # a check that failed: the run ends, saying why
            self.error = error
            self.machine.stop(StopReason.WATCH_FAILED, f"{access}: {error!r}", access.vcpu)
            return
        if answer == BREAK:
            self.pause(access)

    # -- pausing ---------------------------------------------------------------------------

    def pause(self, hit: Access | None = None) -> None:
        """Pause every vCPU (the first pause wins until `resume`)."""
        with self.condition:
            if self.paused:
                return
            self.paused = True
            self.hit = hit
            for vcpu in self.machine.vcpus:
                vcpu.immediate_exit = True
        self.machine.vcpu_threads.kick()

    def resume(self) -> None:
        with self.condition:
            self.paused = False
            self.hit = None
            self.condition.notify_all()

    def should_stop(self, vcpu: Vcpu) -> bool:
        """The run loop's question after KVM_RUN was interrupted: park while paused; then
        True when the machine stops, else go on (immediate_exit cleared)."""
        stopped = self.machine._stopped
        with self.condition:
            while self.paused and not stopped.is_set():
                self.parked.add(vcpu.id)
                self.condition.notify_all()
                self.condition.wait()
            self.parked.discard(vcpu.id)
            if stopped.is_set():
                return True
            vcpu.immediate_exit = False
            return False

    def stopping(self) -> None:
        """The machine stops: every vCPU must leave KVM_RUN, parked ones too."""
        with self.condition:
            for vcpu in self.machine.vcpus:
                vcpu.immediate_exit = True
            self.condition.notify_all()

    def wait_for_break(self, timeout: float | None) -> Access | None:
        """Wait until every vCPU is parked by a pause; return the access that broke (None
        after a `pause()` of the caller's). KvmletError if the machine stops or `timeout`
        seconds pass first."""
        stopped = self.machine._stopped
        everyone = len(self.machine.vcpus)
        with self.condition:
            self.condition.wait_for(
                lambda: stopped.is_set() or (self.paused and len(self.parked) == everyone),
                timeout,
            )
            if stopped.is_set():
                raise KvmletError(f"the machine stopped instead: {self.machine.stop_reason}")
            if not (self.paused and len(self.parked) == everyone):
                raise KvmletError(f"no break within {timeout} s")
            return self.hit


class Watching:
    """The watchpoint API of `Machine` (a mixin over its `watchpoints`)."""

    watchpoints: Watchpoints

    def watch(
        self,
        space: str | AddressSpace,
        start: int,
        end: int,
        on_access: WatchCallback,
        *,
        reads: bool = True,
        writes: bool = True,
    ) -> Watch:
        """Call `on_access(access)` on every access to [start, end) of `space` ("io" or
        "mmio"); it returns BREAK to pause the machine, raises to stop it (watchpoints.py)."""
        target = self.watchpoints.address_space(space)
        watch = Watch(target.name, start, end, on_access, reads=reads, writes=writes)
        self.watchpoints.add(target, watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        self.watchpoints.unwatch(watch)

    def wait_for_break(self, timeout: float | None = None) -> Access | None:
        """Wait for a break (or `pause`) to hold every vCPU: the access that broke, or None
        after `pause()`. KvmletError if the guest stops or `timeout` passes first."""
        return self.watchpoints.wait_for_break(timeout)

    @property
    def watch_error(self) -> BaseException | None:
        """What a watch callback raised to stop the run (StopReason.WATCH_FAILED)."""
        return self.watchpoints.error
