"""Errors kvmlet reports to its user.

`KvmletError` is a mistake or condition the user can fix (a missing kernel, no permission on
/dev/kvm, a bad image). The CLI prints its message as one line and exits non-zero; anything else
escaping is a bug in kvmlet and keeps its traceback.
"""

import threading
import time


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


class RateLimitedLog:
    """Messages a guest can trigger at will, on `logger`: per key, the first `burst` of them,
    then at most one every `interval` seconds saying how many were suppressed meanwhile.

    A guest that breaks its device in a loop, or a device bug hit on every request, must not
    write megabytes onto the user's terminal; the counts stay visible. `suppressed` counts the
    messages left out, over all keys."""

    def __init__(self, logger: LazyLogger, burst: int = 10, interval: float = 60.0):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.suppressed = 0
        self._keys: dict[object, list] = {}  # key -> [messages logged, suppressed, last time]
        self._lock = threading.Lock()

    def log(self, level: str, key: object, message: str, *args: object, **kwargs: object) -> None:
        """`logger.<level>(message, *args, **kwargs)` unless `key` is over its limit."""
        now = time.monotonic()
        with self._lock:
            state = self._keys.get(key)
            if state is None:
                if len(self._keys) >= 1024:  # keys too come from the guest: bound them
                    self._keys.clear()
                state = self._keys[key] = [0, 0, now]
            if state[0] >= self.burst and now - state[2] < self.interval:
                state[1] += 1
                self.suppressed += 1
                return
            suppressed, state[1] = state[1], 0
            state[0] += 1
            state[2] = now
        if suppressed:
            message += f" ({suppressed} similar messages suppressed)"
        getattr(self.logger, level)(message, *args, **kwargs)

    def warning(self, key: object, message: str, *args: object, **kwargs: object) -> None:
        self.log("warning", key, message, *args, **kwargs)

    def error(self, key: object, message: str, *args: object, **kwargs: object) -> None:
        self.log("error", key, message, *args, **kwargs)
