"""Build a multiboot test guest from one C file and this folder's runtime (gcc, ld, objcopy).

    python3 examples/guest/build.py guest.c -o guest.elf [--kludge]

The C file includes "guest.h" and defines `int guest_main(struct multiboot_info *info,
const char *cmdline)`; the runtime (start.S, runtime.c) enters it in 32-bit protected mode,
gives it a polled COM1 (`print`) and writes its return value to the debug-exit port 0x501, so
`kvmlet run -k guest.elf --debug-exit 0x501` exits with (value << 1) | 1. `--kludge` makes a
flat binary whose multiboot header carries the load addresses (the a.out kludge) instead of an
ELF32 file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent
CFLAGS = (
    "-m32",
    "-ffreestanding",
    "-fno-pic",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-nostdlib",
    "-O2",
    "-Wall",
    "-Werror",
)


class BuildError(Exception):
    """A compiler or linker failed (the message holds its output)."""


def build(source: Path, output: Path, kludge: bool = False) -> Path:
    """Compile `source` with the runtime and link it to `output`; returns `output`."""
    with tempfile.TemporaryDirectory() as scratch:
        objects = []
        for path, extra in (
            (RUNTIME / "start.S", [f"-DADDRESS_FLAG={'0x10000' if kludge else '0'}"]),
            (RUNTIME / "runtime.c", []),
            (Path(source), []),
        ):
            target = Path(scratch) / f"{len(objects)}-{path.stem}.o"
            _run(["gcc", *CFLAGS, f"-I{RUNTIME}", *extra, "-c", str(path), "-o", str(target)])
            objects.append(str(target))
        elf = Path(scratch) / "guest.elf" if kludge else Path(output)
        _run(
            [
                "ld", "-m", "elf_i386", "-T", str(RUNTIME / "link.ld"), "--build-id=none",
                "-z", "noexecstack", "-o", str(elf), *objects,
            ]
        )  # fmt: skip
        if kludge:
            _run(["objcopy", "-O", "binary", str(elf), str(output)])
    return Path(output)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command)}:\n{result.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--kludge", action="store_true", help="a flat a.out-kludge binary")
    args = parser.parse_args()
    try:
        build(args.source, args.output, args.kludge)
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
