"""Errors kvmlet reports to its user.

`KvmletError` is a mistake or condition the user can fix (a missing kernel, no permission on
/dev/kvm, a bad image). The CLI prints its message as one line and exits non-zero; anything else
escaping is a bug in kvmlet and keeps its traceback.
"""


class KvmletError(Exception):
    """A user-facing error: printed as one line, never as a traceback."""


class GuestStoppedError(KvmletError):
    """The guest stopped before it did what the caller waited for; `stop` (a `GuestStop`)
    says how it ended."""

    def __init__(self, message: str, stop: object):
        super().__init__(message)
        self.stop = stop


class GuestMemoryError(KvmletError):
    """A guest-physical access that falls outside guest RAM (guest-controlled: never fatal)."""


class LazyLogger:
    """`logging.getLogger(name)`, looked up on each use, with `logging` imported on first use.

    kvmlet logs only rare events (a failing device handler, a guest's invalid access), and
    `logging` with traceback, string and textwrap costs ~3 ms of every boot's imports when a
    module imports it at the top. Messages go to the very same `logging` loggers."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute: str) -> object:
        import logging

        return getattr(logging.getLogger(self.name), attribute)
