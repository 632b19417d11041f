"""`python3 -m kvmlet.guest [--source DIR] [--install-source]`: build the default guest.

Prints the paths of the cached kernel, vmlinux, initrd and .config; exits 1 with one line on a
KvmletError. `kvmlet build-guest` is the same through the main CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvmlet.errors import KvmletError
from kvmlet.guest import ensure_default_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m kvmlet.guest", description="Build kvmlet's default guest (cached)."
    )
    parser.add_argument("--source", type=Path, help="Linux source tree (default: Debian's)")
    parser.add_argument(
        "--install-source",
        action="store_true",
        help="run apt-get install linux-source-6.1 if it is missing (root only)",
    )
    arguments = parser.parse_args(argv)
    try:
        guest = ensure_default_guest(arguments.source, install_source=arguments.install_source)
    except KvmletError as error:
        print(f"kvmlet: error: {error}", file=sys.stderr)
        return 1
    for name in ("bzimage", "vmlinux", "initrd", "config"):
        print(f"{name}: {getattr(guest, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
