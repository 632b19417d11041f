"""Build progress: stage lines always; a self-overwriting make line only on a terminal."""

from __future__ import annotations

import io

from kvmlet.guest.progress import ConsoleProgress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_overwritten_indicator_line_cleared_before_the_next_stage():
    stream = FakeTerminal()
    progress = ConsoleProgress(stream)
    progress.stage("compiling")
    progress.build_output("  CC      kernel/fork.o\n")
    progress.build_output("  CC      kernel/exit.o\n")
    progress.build_finished()
    progress.stage("done")
    text = stream.getvalue()
    assert text.startswith("kvmlet: compiling\n")
    assert "\r  [    2] CC kernel/exit.o" in text
    assert text.count("\n") == 2  # the indicator never adds lines
    assert text.endswith("\rkvmlet: done\n")


def test_pipe_gets_stage_lines_and_a_step_count_now_and_then():
    stream = io.StringIO()
    progress = ConsoleProgress(stream)
    progress.stage("compiling")
    for _ in range(1000):
        progress.build_output("  CC      x.o\n")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "kvmlet: compiling",
        "kvmlet:   ... 500 build steps",
        "kvmlet:   ... 1000 build steps",
    ]
