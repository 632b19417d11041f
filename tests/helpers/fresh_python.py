"""Run a script in a fresh interpreter, as a user's `kvmlet` process starts: what it imports.

`python3 -S` leaves out `site`, whose `.pth` files (this sandbox's imports certifi, pathlib
and more) would load modules on their own; the checkout is the working directory, so the
script imports this kvmlet.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def run_fresh_python(script: str, *arguments: str) -> subprocess.CompletedProcess:
    """Run `script` with `arguments` in a new `python3 -S`; the test fails unless it exits 0."""
    result = subprocess.run(
        [sys.executable, "-S", "-c", script, *arguments],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result
