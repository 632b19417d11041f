"""What a C compiler says about a Linux UAPI header: structure sizes, field offsets, values.

The ctypes mirrors of <linux/kvm.h> and <linux/vhost.h> are checked against the real headers
by compiling one probe program that prints every figure asked for."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest


def probe_c_header(
    directory: Path,
    header: str,
    sizes: Iterable[str],
    offsets: Iterable[str],
    values: Iterable[str],
    *,
    signed: bool = False,
) -> dict[str, int]:
    """{"sizeof S": ..., "offset S.member": ..., "value NAME": ...} as gcc computes them for
    `#include <header>`; `signed` prints values as long long (for negative constants).
    Skips the calling test when gcc is missing."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    value_type = "long long" if signed else "unsigned long long"
    value_format = "%lld" if signed else "%llu"
    lines = ["#include <stdio.h>", "#include <stddef.h>", f"#include <{header}>"]
    lines.append("int main(void) {")
    for name in sizes:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for name in offsets:
        struct_name, _, member = name.partition(".")
        lines.append(f'printf("offset {name} %zu\\n", offsetof(struct {struct_name}, {member}));')
    for name in values:
        lines.append(f'printf("value {name} {value_format}\\n", ({value_type})({name}));')
    lines.append("return 0; }")
    source = directory / "probe.c"
    source.write_text("\n".join(lines))
    binary = source.with_suffix("")
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {
        f"{kind} {name}": int(value) for kind, name, value in map(str.split, output.splitlines())
    }
