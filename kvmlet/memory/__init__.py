"""Guest RAM: host mappings of guest-physical ranges with bounds-checked, typed access."""

from kvmlet.memory.guest_memory import GuestMemory, HostIovec, RamBank, full_barrier

__all__ = ["GuestMemory", "HostIovec", "RamBank", "full_barrier"]
