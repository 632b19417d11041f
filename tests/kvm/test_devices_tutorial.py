"""docs/devices.md end to end: every block of the page, in order, in a fresh directory.

Files are written, shell blocks run with bash (a `kvmlet` on PATH runs this checkout) and must
end with the exit status the page gives, the Python session runs as a script: the device,
its unit test, the multiboot guest built with gcc, the device on the command line, hot-added
from Python with a watchpoint that breaks, a recording, its replay, a broken model's replay.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.doc_snippets import snippets
from tests.helpers.multiboot_guest import require_toolchain

pytestmark = pytest.mark.kvm

CHECKOUT = Path(__file__).resolve().parents[2]
PAGE = CHECKOUT / "docs" / "devices.md"


def test_the_devices_tutorial_runs_as_written(tmp_path):
    require_toolchain()
    shims = tmp_path / "bin"
    shims.mkdir()
    kvmlet = shims / "kvmlet"
    kvmlet.write_text(f'#!/bin/sh\nexec {sys.executable} -m kvmlet "$@"\n')
    kvmlet.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    environment = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "PYTHONPATH": str(CHECKOUT),
        "KVMLET": str(CHECKOUT),
    }
    outputs = []
    for block in snippets(PAGE):
        if "file" in block.options:
            (work / block.options["file"]).write_text(block.code)
            continue
        if "run" in block.options:
            command, expected = [sys.executable, "-c", block.code], 0
        else:
            command, expected = ["bash", "-e", "-c", block.code], int(block.options["status"])
        result = subprocess.run(
            command,
            cwd=work,
            env=environment,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == expected, f"{block.code}\n{output}"
        outputs.append(output)
    everything = "\n".join(outputs)
    assert "3 passed" in everything
    assert "HELLO, MAILBOX crc=0x8cd9d58a" in everything
    assert "break: memory write of 4 bytes at 0xf1000010 (mailbox) = 0x2 by vCPU 0" in everything
    assert "replayed" in everything and "no divergence" in everything
    assert "mailbox (job 1) did not set its interrupt line to 1 as in the run" in everything
