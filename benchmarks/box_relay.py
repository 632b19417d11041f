"""Where a guest benchmark runs: on this host's KVM, or re-run inside the test box.

On a host whose KVM cannot run guest user space (the software KVM's `pvm` profile) a
benchmark that times guest programs runs itself inside the test box, where kvmlet and its
peers share the same nested KVM; `--here` (or being in the box already) runs it in place.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from kvmlet.vstate.host_profile import detect  # noqa: E402


def needs_test_box(here: bool) -> bool:
    """Whether this benchmark must go to the test box: not told `--here`, not in the box
    already, and the host's KVM has a profile (guest user space cannot run here)."""
    return not here and os.environ.get("KVMLET_TESTBOX") != "1" and detect().name != "none"


def run_in_test_box(script: str, argv: list[str], timeout: int) -> int:
    """Run `script --here ARGV...` inside the test box (at most `timeout` seconds), relaying
    its output; returns its exit status."""
    command = [sys.executable, str(CHECKOUT / "testbox" / "run.py"), "--timeout", str(timeout)]
    command += ["--", "python3", str(Path(script).resolve()), "--here", *argv]
    return subprocess.run(command, check=False).returncode
