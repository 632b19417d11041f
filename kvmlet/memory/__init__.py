"""Guest RAM: host mappings of guest-physical ranges with bounds-checked, typed access."""

from kvmlet.memory.guest_memory import (
    GuestAddress,
    GuestMemory,
    HostIovec,
    RamBank,
    full_barrier,
)

__all__ = ["GuestAddress", "GuestMemory", "HostIovec", "RamBank", "full_barrier"]
