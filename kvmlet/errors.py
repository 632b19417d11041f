"""Errors kvmlet reports to its user.

`KvmletError` is a mistake or condition the user can fix (a missing kernel, no permission on
/dev/kvm, a bad image). The CLI prints its message as one line and exits non-zero; anything else
escaping is a bug in kvmlet and keeps its traceback.
"""


class KvmletError(Exception):
    """A user-facing error: printed as one line, never as a traceback."""


class GuestMemoryError(KvmletError):
    """A guest-physical access that falls outside guest RAM (guest-controlled: never fatal)."""
