"""Multiboot test guests of our own, built with gcc and ld by examples/guest/build.py.

A guest is one C file defining `int guest_main(struct multiboot_info *, const char *cmdline)`
(see examples/guest/guest.h): the runtime enters it in 32-bit protected mode, prints through a
polled COM1 and writes its return value to the debug-exit port at 0x501.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
EXAMPLES = CHECKOUT / "examples"
DEBUG_EXIT_PORT = 0x501


def _builder():
    spec = importlib.util.spec_from_file_location("guest_build", EXAMPLES / "guest" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_toolchain() -> None:
    """Skip the test when gcc, ld or objcopy is missing."""
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def build_guest(directory: Path, source: str, kind: str = "elf", name: str = "guest") -> Path:
    """Write `source` (C) to `directory` and build it: an ELF32 kernel, or with
    `kind="kludge"` a flat a.out-kludge binary. Returns the kernel's path."""
    require_toolchain()
    directory.mkdir(parents=True, exist_ok=True)
    main = directory / f"{name}.c"
    main.write_text(source)
    output = directory / (f"{name}.elf" if kind == "elf" else f"{name}.bin")
    return _builder().build(main, output, kludge=kind == "kludge")
