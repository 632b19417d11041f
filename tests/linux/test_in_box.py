"""Runs the `linux` tier inside the test box when this host's KVM cannot run guest user space.

On our machines /dev/kvm is a software KVM on which guest user space cannot make system calls;
testbox/run.py boots a QEMU TCG "L1" whose KVM runs guests normally, and the same tests run
there (KVMLET_TESTBOX=1 tells them where they are). On hardware KVM this test skips: the tier
runs directly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.guests import IN_TEST_BOX, box_stalled, user_space_runs_here

CHECKOUT = Path(__file__).resolve().parents[2]
BOX_TIMEOUT = 900
BOX_ATTEMPTS = 3
"""The box's L1 sometimes stops running nested guests altogether (L1 idle, every guest silent:
docs/hosts.md, "The test box"). It was seen in ~3 of 12 runs while the host was loaded by
other jobs, and in none of 50 back-to-back guest boots (all transports, SMP, SIGKILLed
monitors) on a quieter host; a fresh box is the remedy. Only that gets another attempt
(`box_stalled`: the box timed out or failed, or after a failed test a canary guest did not run
either); any other failure is the tier's result, so a flaky kvmlet bug cannot pass one run in
three. The inner run stops at its first failure (-x) so a stalled box costs minutes, not the
whole timeout."""

pytestmark = [
    pytest.mark.linux,
    pytest.mark.box_runner,
    pytest.mark.skipif(IN_TEST_BOX, reason="already inside the test box"),
    pytest.mark.skipif(user_space_runs_here(), reason="this host runs the tier directly"),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="the test box needs qemu-system-x86 (apt-get install qemu-system-x86)",
    ),
]

INNER_PYTEST = [
    "env", "KVMLET_TESTBOX=1", "python3", "-m", "pytest", "-m", "linux and not box_runner",
    "-x", "-v", "-p", "no:cacheprovider", "-rs", str(CHECKOUT / "tests" / "linux"),
]  # fmt: skip


def run_box(log_path: Path, echo: Callable[[str], None]) -> tuple[int, str]:
    """Run the inner tier in a fresh box; each line it prints goes to `echo` as it comes (the
    outer run shows the progress live) and to `log_path`. Returns the status and the log."""
    command = [sys.executable, str(CHECKOUT / "testbox" / "run.py"), "--timeout", str(BOX_TIMEOUT)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command, "--", *INNER_PYTEST], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        watchdog = threading.Timer(BOX_TIMEOUT + 120, process.kill)
        watchdog.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                text = line.decode(errors="replace").rstrip().split("\r")[-1]  # a tty's redraws
                echo(f"[box] {text}")
            status = process.wait()
        finally:
            watchdog.cancel()
            process.kill()
            process.wait()
    return status, log_path.read_text(errors="replace")


def inner_counts(report: str) -> dict[str, int]:
    """The inner run's counts from its last summary line (`= 24 passed, 1 skipped in 80s =`)."""
    summaries = re.findall(r"^=+ (.*\d+ \w+.*?) in [\d.]+s.* =+$", report, re.MULTILINE)
    found = re.findall(r"(\d+) (\w+)", summaries[-1]) if summaries else []
    return {word: int(count) for count, word in found}


def test_linux_tier_passes_inside_the_test_box(tmp_path, capsys):
    def echo(text: str) -> None:
        with capsys.disabled():
            print(text, flush=True)

    for attempt in range(1, BOX_ATTEMPTS + 1):
        echo(f"[box] attempt {attempt}: the linux tier inside the test box")
        status, report = run_box(tmp_path / f"box-{attempt}.log", echo)
        if status == 0 or not box_stalled(status, report):
            break
    counts = inner_counts(report)
    echo(
        f"[box] linux tier in the test box: {counts.get('passed', 0)} passed, "
        f"{counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed "
        f"(attempt {attempt}, exit status {status})"
    )
    assert status == 0, f"exit status {status}; last lines:\n{report[-6000:]}"
    assert counts.get("passed", 0) > 0 and not counts.get("failed"), report[-3000:]
    skipped = re.findall(r"^SKIPPED \[\d+\] (.*)$", report, re.MULTILINE)
    assert not skipped, f"the whole tier runs in the box, nothing may skip there: {skipped}"
