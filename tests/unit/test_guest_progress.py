"""Build progress: stage lines always; elapsed time and steps during make, with n/total and
an estimate once a previous full build left its step profile; one overwritten line on a
terminal, a line every 30 s elsewhere."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st

from kvmlet.guest.progress import (
    PROFILE_POINTS,
    ConsoleProgress,
    StepProfile,
    format_duration,
)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# A previous build of 2,000 steps: one step every 1/8 s for 1,800 steps (225 s), then 200
# slow steps (the link and compression) taking 125 s more. (Eighths add up exactly.)
PREVIOUS = StepProfile.record(
    [0.125 * n for n in range(1, 1801)] + [225 + 0.625 * n for n in range(1, 201)]
)


def test_a_profile_follows_the_uneven_pace_of_the_previous_build():
    assert (PREVIOUS.steps, PREVIOUS.seconds[-1]) == (2000, 350)
    assert PREVIOUS.seconds_at(900) == 112.5
    # Halfway through the steps at the same pace: 125 s done, 225 s left (not another 125 s).
    assert PREVIOUS.remaining(1000, 125) == 225
    # Twice as slow as last time: twice the time left.
    assert PREVIOUS.remaining(1000, 250) == 450
    assert PREVIOUS.remaining(2000, 350) is None


def test_a_profile_survives_the_cache_and_malformed_ones_are_ignored():
    assert StepProfile.from_json(PREVIOUS.to_json()) == PREVIOUS
    assert StepProfile.from_json({"steps": 2000, "seconds": [1.0] * 3}) is None
    assert StepProfile.from_json({"steps": 2000, "seconds": [5.0, 1.0] + [9.0] * 19}) is None
    assert StepProfile.from_json({"steps": "many", "seconds": []}) is None
    assert StepProfile.from_json([]) is None
    assert StepProfile.record([1.0, 2.0]) is None


@given(st.lists(st.floats(0, 1e5), min_size=PROFILE_POINTS, max_size=400).map(sorted))
def test_any_recorded_profile_reads_back_and_estimates_nothing_negative(step_times):
    profile = StepProfile.record(step_times)
    assert StepProfile.from_json(profile.to_json()) == profile
    for step in range(0, profile.steps + 2, 7):
        left = profile.remaining(step, 10.0)
        assert left is None or left >= 0


def test_durations_read_as_a_person_says_them():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_terminal_gets_one_overwritten_line_with_time_steps_and_estimate():
    stream, clock = FakeTerminal(), Clock()
    progress = ConsoleProgress(stream, clock)
    progress.stage("compiling")
    progress.build_started(PREVIOUS)
    for _ in range(1000):
        clock.now += 0.125
        progress.build_output("  CC      kernel/fork.o\n")
    progress.build_finished()
    progress.stage("done")
    text = stream.getvalue()
    assert text.startswith("kvmlet: compiling\n")
    assert "\r  [2m05s, step 1000/2000, about 3m45s left] CC kernel/fork.o" in text
    assert text.count("\n") == 2  # the indicator never adds lines
    assert text.endswith("\rkvmlet: done\n")


def test_pipe_gets_a_line_every_30_seconds():
    stream, clock = io.StringIO(), Clock()
    progress = ConsoleProgress(stream, clock)
    progress.stage("compiling")
    progress.build_started(PREVIOUS)
    for _ in range(700):
        clock.now += 0.125
        progress.build_output("  CC      x.o\n")
    assert stream.getvalue().splitlines() == [
        "kvmlet: compiling",
        "kvmlet:   ... 30s, step 240/2000, about 5m20s left",
        "kvmlet:   ... 1m00s, step 480/2000, about 4m50s left",
    ]


def test_a_first_build_shows_time_and_steps_without_a_total():
    stream, clock = io.StringIO(), Clock()
    progress = ConsoleProgress(stream, clock)
    progress.build_started(None)
    for _ in range(3):
        clock.now += 15
        progress.build_output("  CC      x.o\n")
    assert stream.getvalue().splitlines() == ["kvmlet:   ... 30s, step 2"]


def test_a_build_longer_than_the_previous_one_drops_the_total():
    stream, clock = io.StringIO(), Clock()
    progress = ConsoleProgress(stream, clock)
    progress.build_started(StepProfile.record([float(n) for n in range(1, 41)]))
    for _ in range(41):
        clock.now += 1
        progress.build_output("  CC      x.o\n")
    assert stream.getvalue().splitlines()[-1] == "kvmlet:   ... 30s, step 30/40, about 10s left"
    clock.now += 30
    progress.build_output("  LD      vmlinux\n")
    assert stream.getvalue().splitlines()[-1] == "kvmlet:   ... 1m11s, step 42"
