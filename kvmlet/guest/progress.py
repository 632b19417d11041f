"""Progress reporting for the default guest build: a line per stage, a compact make indicator.

The build calls `stage()` once per step (extract, configure, compile, pack), `build_started()`
before make with what a previous full build of the kernel took (a `StepProfile`, or None the
first time), and `build_output()` for every line make prints. The indicator shows the elapsed
time and the step count; after a first full build it also shows `n/total` and an estimate of
the time left. On a terminal it is one self-overwriting line; elsewhere (CI logs, pipes) a
line every `PLAIN_INTERVAL` seconds, so a log stays short and still shows that the build is
alive.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, TextIO

PLAIN_INTERVAL = 30.0
"""Seconds between progress lines when the stream is not a terminal."""
PROFILE_POINTS = 20
"""A step profile keeps the elapsed time at every twentieth of the steps."""


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s` or `1h02m`: short enough for a status line."""
    whole = max(int(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class StepProfile(NamedTuple):
    """How a previous full kernel build went: its step count (lines make printed) and the
    elapsed seconds at every `1/PROFILE_POINTS` of them. The time per step is far from even
    (the final link and compression are slow), so an estimate follows this curve, scaled by
    how fast the current build goes, rather than an average rate."""

    steps: int
    seconds: tuple[float, ...]  # seconds[i]: elapsed when i * steps / PROFILE_POINTS were done

    @classmethod
    def record(cls, step_times: Sequence[float]) -> StepProfile | None:
        """The profile of a build whose n-th step ended `step_times[n-1]` s after its start."""
        steps = len(step_times)
        if steps < PROFILE_POINTS:
            return None
        points = [0.0] + [
            step_times[max(round(index * steps / PROFILE_POINTS) - 1, 0)]
            for index in range(1, PROFILE_POINTS + 1)
        ]
        return cls(steps, tuple(round(point, 2) for point in points))

    @classmethod
    def from_json(cls, data: object) -> StepProfile | None:
        """A profile read back from the cache; None for anything malformed."""
        if not isinstance(data, dict):
            return None
        steps, seconds = data.get("steps"), data.get("seconds")
        if not isinstance(steps, int) or steps < PROFILE_POINTS or not isinstance(seconds, list):
            return None
        if len(seconds) != PROFILE_POINTS + 1:
            return None
        if not all(isinstance(value, int | float) and value >= 0 for value in seconds):
            return None
        if list(seconds) != sorted(seconds):
            return None
        return cls(steps, tuple(float(value) for value in seconds))

    def to_json(self) -> dict:
        return {"steps": self.steps, "seconds": list(self.seconds)}

    def seconds_at(self, step: int) -> float:
        """Elapsed seconds of the previous build at `step` (linear between the points)."""
        position = min(max(step, 0), self.steps) * PROFILE_POINTS / self.steps
        index = min(int(position), PROFILE_POINTS - 1)
        fraction = position - index
        return self.seconds[index] + (self.seconds[index + 1] - self.seconds[index]) * fraction

    def remaining(self, step: int, elapsed: float) -> float | None:
        """Seconds left for a build at `step` after `elapsed` s, None when it cannot be told
        (too early, or past the previous build's end)."""
        then = self.seconds_at(step)
        if step >= self.steps or then <= 0 or elapsed <= 0:
            return None
        return (self.seconds[-1] - then) * elapsed / then


class Progress(Protocol):
    """What the build reports to; `ensure_default_guest` accepts any such object."""

    def stage(self, message: str) -> None: ...

    def build_started(self, previous: StepProfile | None) -> None: ...

    def build_output(self, line: str) -> None: ...

    def build_finished(self) -> None: ...


class QuietProgress:
    """Reports nothing (tests, library callers that show their own progress)."""

    def stage(self, message: str) -> None:
        pass

    def build_started(self, previous: StepProfile | None) -> None:
        pass

    def build_output(self, line: str) -> None:
        pass

    def build_finished(self) -> None:
        pass


class ConsoleProgress:
    """Writes stage lines to a stream, with a one-line make indicator when it is a terminal."""

    def __init__(
        self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._is_terminal = self._stream.isatty()
        self._clock = clock
        self._steps = 0
        self._started = 0.0
        self._next_plain_line = 0.0
        self._previous: StepProfile | None = None
        self._indicator_shown = False

    def stage(self, message: str) -> None:
        self._clear_indicator()
        self._stream.write(f"kvmlet: {message}\n")
        self._stream.flush()

    def build_started(self, previous: StepProfile | None) -> None:
        self._previous = previous
        self._steps = 0
        self._started = self._clock()
        self._next_plain_line = self._started + PLAIN_INTERVAL

    def build_output(self, line: str) -> None:
        self._steps += 1
        now = self._clock()
        if self._is_terminal:
            width = shutil.get_terminal_size().columns - 1
            text = f"  [{self._status(now)}] {' '.join(line.split())}"
            self._stream.write("\r" + text[:width].ljust(width))
            self._indicator_shown = True
            self._stream.flush()
        elif now >= self._next_plain_line:
            self._stream.write(f"kvmlet:   ... {self._status(now)}\n")
            self._stream.flush()
            self._next_plain_line = now + PLAIN_INTERVAL

    def build_finished(self) -> None:
        self._clear_indicator()
        self._steps = 0

    def _status(self, now: float) -> str:
        """`2m05s, step 812/1934, about 3m10s left`, or without the total the first time."""
        elapsed = now - self._started
        text = format_duration(elapsed)
        previous = self._previous
        if previous is None or self._steps > previous.steps:
            return f"{text}, step {self._steps}"
        text = f"{text}, step {self._steps}/{previous.steps}"
        left = previous.remaining(self._steps, elapsed)
        return text if left is None else f"{text}, about {format_duration(left)} left"

    def _clear_indicator(self) -> None:
        if self._indicator_shown:
            width = shutil.get_terminal_size().columns - 1
            self._stream.write("\r" + " " * width + "\r")
            self._indicator_shown = False
