"""Progress reporting for the default guest build: a line per stage, a compact make indicator.

The build calls `stage()` once per step (extract, configure, compile, verify, pack) and
`build_output()` for every line make prints. On a terminal the make lines collapse into one
self-overwriting status line (step count and the current target); elsewhere (CI logs, pipes)
only the stage lines and a step count every few hundred lines are printed, so a log stays short
and still shows that the build is alive.
"""

from __future__ import annotations

import shutil
import sys
from typing import Protocol, TextIO

_PLAIN_STEP_INTERVAL = 500


class Progress(Protocol):
    """What the build reports to; `ensure_default_guest` accepts any such object."""

    def stage(self, message: str) -> None: ...

    def build_output(self, line: str) -> None: ...

    def build_finished(self) -> None: ...


class QuietProgress:
    """Reports nothing (tests, library callers that show their own progress)."""

    def stage(self, message: str) -> None:
        pass

    def build_output(self, line: str) -> None:
        pass

    def build_finished(self) -> None:
        pass


class ConsoleProgress:
    """Writes stage lines to a stream, with a one-line make indicator when it is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._is_terminal = self._stream.isatty()
        self._steps = 0
        self._indicator_shown = False

    def stage(self, message: str) -> None:
        self._clear_indicator()
        self._stream.write(f"kvmlet: {message}\n")
        self._stream.flush()

    def build_output(self, line: str) -> None:
        self._steps += 1
        if self._is_terminal:
            width = shutil.get_terminal_size().columns - 1
            text = f"  [{self._steps:5d}] {' '.join(line.split())}"
            self._stream.write("\r" + text[:width].ljust(width))
            self._indicator_shown = True
            self._stream.flush()
        elif self._steps % _PLAIN_STEP_INTERVAL == 0:
            self._stream.write(f"kvmlet:   ... {self._steps} build steps\n")
            self._stream.flush()

    def build_finished(self) -> None:
        self._clear_indicator()
        self._steps = 0

    def _clear_indicator(self) -> None:
        if self._indicator_shown:
            width = shutil.get_terminal_size().columns - 1
            self._stream.write("\r" + " " * width + "\r")
            self._indicator_shown = False
