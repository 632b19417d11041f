"""The suite collects as one session: pytest's default import mode (rootdir-based, no
__init__.py in the test folders) refuses two test modules with the same file name, and the
README's test command runs every tier at once, so a clash there breaks CI before a test runs."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_file_name():
    folders_by_name: dict[str, list[str]] = defaultdict(list)
    for module in TESTS.rglob("test_*.py"):
        folders_by_name[module.name].append(str(module.parent.relative_to(TESTS)))
    clashes = {name: folders for name, folders in folders_by_name.items() if len(folders) > 1}
    assert clashes == {}
