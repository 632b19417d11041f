"""The one lock and transaction that guard every change to the bus trees.

Mapping changes are rare (boot-time wiring, a guest programming a BAR) and may come from any
vCPU thread, so all of them serialise on one re-entrant lock. Dispatch never takes it: it reads
the published flat view, which a rebuild replaces with a single attribute store.

`transaction()` batches changes: address spaces touched inside it re-render once, when the
outermost transaction ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmlet.bus.address_space import AddressSpace

lock = threading.RLock()
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
