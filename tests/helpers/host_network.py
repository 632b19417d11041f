"""What passt (user-mode networking) needs on the host, for the `linux` tier's network tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers.guests import IN_TEST_BOX


def ip(*words: str) -> None:
    subprocess.run(["ip", *words], check=True, capture_output=True)


def default_route() -> bool:
    return bool(subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True,
                               text=True, check=False).stdout.strip())  # fmt: skip


@contextlib.contextmanager
def passt_uplink() -> Iterator[None]:
    """In the box, loopback up (passt maps the guest's gateway to it) and a dummy interface
    with a default route; elsewhere, a skip without passt or a default route."""
    if shutil.which("passt") is None:
        pytest.skip("user mode needs passt (apt-get install passt)")
    if IN_TEST_BOX:
        ip("link", "set", "lo", "up")
    if default_route():
        yield
        return
    if not IN_TEST_BOX:
        pytest.skip("passt needs a default route on the host")
    ip("link", "add", "uplink", "type", "dummy")
    ip("addr", "add", "10.9.0.2/24", "dev", "uplink")
    ip("link", "set", "uplink", "up")
    ip("route", "add", "default", "via", "10.9.0.1")
    try:
        yield
    finally:
        ip("link", "delete", "uplink")
