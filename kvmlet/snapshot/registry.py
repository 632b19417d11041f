"""Walking the parts of a machine that keep their own state: each saves and loads itself.

A part (a device, a transport, the PCI host bridge) has `save_state() -> dict` and
`load_state(dict)`; the machine names its parts (machine/snapshot.py) and this module walks
them, so no function here knows what any device keeps. A saved state is a plain value
(codec.py). A part that cannot be saved says why with a KvmletError; a state that does not fit
the part it is loaded into (a damaged or foreign file) is one line naming the part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from kvmlet.errors import KvmletError


class StateOwner(Protocol):
    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


def save_states(owners: Mapping[str, StateOwner]) -> dict[str, dict[str, Any]]:
    """Every part's state, by name; KvmletError naming the first part that cannot be saved."""
    states = {}
    for name, owner in owners.items():
        try:
            states[name] = owner.save_state()
        except KvmletError as error:
            raise KvmletError(f"{name}: {error}") from None
    return states


def load_states(owners: Mapping[str, StateOwner], states: Mapping[str, Any]) -> None:
    """Load each part's saved state; the file and the machine must have the same parts."""
    missing = sorted(set(owners) - set(states))
    extra = sorted(set(states) - set(owners))
    if missing or extra:
        problem = f"no state for {missing[0]}" if missing else f"a state for {extra[0]}"
        raise KvmletError(f"the snapshot does not fit the machine rebuilt from it: {problem}")
    for name, owner in owners.items():
        try:
            owner.load_state(states[name])
        except KvmletError as error:
            raise KvmletError(f"{name}: {error}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise KvmletError(
                f"{name}: the snapshot's state does not fit this device "
                f"({type(error).__name__}: {error})"
            ) from None
