"""Guest RAM: host mappings of guest-physical ranges with bounds-checked, typed access."""

from kvmlet.memory.guest_memory import GuestMemory, HostIovec, RamBank

__all__ = ["GuestMemory", "HostIovec", "RamBank"]
