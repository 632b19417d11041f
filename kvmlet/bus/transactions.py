"""The one lock and transaction that guard every change to the bus trees, and the grace period
that ends a region's removal.

Mapping changes are rare (boot-time wiring, a guest programming a BAR) and may come from any
vCPU thread, so all of them serialise on one re-entrant lock. Dispatch never takes it: it reads
the published flat view, which a rebuild replaces with a single attribute store.

`transaction()` batches changes: address spaces touched inside it re-render once, when the
outermost transaction ends.

A vCPU that read the old view may still call a handler of a region a concurrent change has
just removed. Each vCPU thread registers a `Reader` and makes its `sequence` odd while it
dispatches an exit (even while it runs the guest or waits); a removal returns only after a
grace period, once every other vCPU that was inside a dispatch when the lock was released has
left that dispatch (RCU's quiescent states), so the remover may then tear the region's device
down. The wait happens after the lock is released, so a vCPU waiting for the lock cannot stall
it; the remover must hold no device lock a dispatching vCPU could wait for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kvmlet.errors import LazyLogger

if TYPE_CHECKING:
    from kvmlet.bus.address_space import AddressSpace

log = LazyLogger("kvmlet.bus")

GRACE_PERIOD_WARNING = 10.0
"""Seconds after which a removal still waiting for a vCPU says so (and keeps waiting)."""


class Reader:
    """One vCPU thread's read side: `sequence` is odd while it dispatches an exit."""

    __slots__ = ("sequence", "thread")

    def __init__(self) -> None:
        self.sequence = 0
        self.thread = threading.get_ident()


_readers: list[Reader] = []


def register_reader() -> Reader:
    """A read side for the calling (vCPU) thread."""
    reader = Reader()
    with lock:
        _readers.append(reader)
    return reader


def unregister_reader(reader: Reader) -> None:
    with lock:
        _readers.remove(reader)


def synchronize() -> None:
    """Wait until every other registered vCPU inside a dispatch now has left it."""
    me = threading.get_ident()
    waiting = [(r, r.sequence) for r in list(_readers) if r.sequence & 1 and r.thread != me]
    started = time.monotonic()
    pause, warned = 0.0001, False
    for reader, sequence in waiting:
        while reader.sequence == sequence and reader in _readers:
            if not warned and time.monotonic() - started > GRACE_PERIOD_WARNING:
                log.warning("a region removal has waited %.0f s for a vCPU", GRACE_PERIOD_WARNING)
                warned = True
            time.sleep(pause)
            pause = min(pause * 2, 0.01)


class _BusLock:
    """The bus's re-entrant lock; its outermost release ends pending removals' grace period."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # the owner's nesting (only the owner changes it)
        self.removals = 0  # regions removed since the owner took the lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        removed = 0
        if not self._depth:
            removed, self.removals = self.removals, 0
        self._lock.release()
        if removed:
            synchronize()


lock = _BusLock()
_depth = 0
_dirty: dict[AddressSpace, None] = {}


@contextmanager
def transaction() -> Iterator[None]:
    """Group tree changes so each affected address space rebuilds once, at the end."""
    global _depth
    with lock:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                _flush()


def mark_dirty(spaces: Iterable[AddressSpace]) -> None:
    """Record that `spaces` need a rebuild; rebuild now unless inside a transaction."""
    with lock:
        for space in spaces:
            _dirty[space] = None
        if _depth == 0:
            _flush()


def _flush() -> None:
    while _dirty:
        space = next(iter(_dirty))
        del _dirty[space]
        space.rebuild()
