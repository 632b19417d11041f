"""Every file kvmlet reads from its own package at run time ships in a wheel: a file that is
not Python must match one of pyproject.toml's package-data patterns (an editable install
reads the source tree and would never notice one missing)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_data_file_of_the_package_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["kvmlet"]
    package = ROOT / "kvmlet"
    data_files = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert data_files, "kvmlet has data files (the guest's config and scripts)"
    unshipped = [name for name in data_files if not any(fnmatch.fnmatch(name, p) for p in patterns)]
    assert unshipped == []
