"""docs/devices.md: its device is examples/mailbox_device.py, and its unit test passes.

(The guest, the Python session and the recording run in tests/kvm/test_devices_tutorial.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.doc_snippets import snippets

CHECKOUT = Path(__file__).resolve().parents[2]
PAGE = CHECKOUT / "docs" / "devices.md"


def test_every_block_of_the_page_is_one_the_tests_run():
    blocks = snippets(PAGE)
    assert len(blocks) >= 8
    for block in blocks:
        assert {"file", "run", "status"} & set(block.options), block.code[:60]


def test_the_tutorial_device_is_the_example_device():
    (device,) = [b for b in snippets(PAGE) if b.options.get("file") == "mailbox_device.py"]
    assert device.code == (CHECKOUT / "examples" / "mailbox_device.py").read_text()


def test_the_tutorial_unit_test_passes(tmp_path):
    for block in snippets(PAGE):
        if block.options.get("file", "").endswith(".py"):
            (tmp_path / block.options["file"]).write_text(block.code)
    (command,) = [b for b in snippets(PAGE) if "pytest" in b.code]
    environment = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    result = subprocess.run(
        ["bash", "-e", "-c", command.code.replace("python3", sys.executable)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == int(command.options["status"]), result.stdout + result.stderr
    assert "3 passed" in result.stdout
