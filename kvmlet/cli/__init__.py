"""`kvmlet`: boot a kernel, run a command in a microVM, replay a recording, build the default
guest, and control running machines through their API sockets (list, stop, pause, resume,
stat, balloon).

Every user mistake ends as one line on stderr and a non-zero exit status; a traceback means a
bug in kvmlet.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from kvmlet import __version__
from kvmlet.cli.control import CONTROL_COMMANDS, add_control_commands
from kvmlet.cli.run import (
    check_kvm_before_building,
    command_run,
    machine_config,
    notice_profile,
    run_config,
)
from kvmlet.cli.run_options import add_machine_arguments, add_run_parser
from kvmlet.cli.sandbox import add_sandbox_parser, command_sandbox
from kvmlet.errors import KvmletError

__all__ = ["build_parser", "main", "run_config"]

REPLAY_EPILOG = """\
exit status: 0 when every replayed device answered as in the run, 2 at the first divergence
(printed), 1 when the file cannot be read or its devices rebuilt.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with kvmlet's way of reporting mistakes: one line, exit status 1 (argparse
    prints its usage and exits 2)."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.removeprefix("kvmlet").strip()
        hint = f"kvmlet {command} --help" if command else "kvmlet --help"
        raise KvmletError(f"{message} (see {hint})")


def _help_width() -> int:
    """The width argparse would wrap help at: COLUMNS, else stdout's terminal, else 80 columns,
    less argparse's margin of 2 (what `shutil.get_terminal_size` answers argparse)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def build_parser() -> argparse.ArgumentParser:
    # argparse builds a help formatter for every add_argument; told the width, the formatter
    # does not import shutil (and bz2, lzma...) on each boot just to ask the terminal for it.
    width = _help_width()
    plain = functools.partial(argparse.HelpFormatter, width=width)
    raw_description = functools.partial(argparse.RawDescriptionHelpFormatter, width=width)
    parser = _Parser(
        prog="kvmlet",
        formatter_class=plain,
        description="A lightweight KVM virtual machine monitor: boots a Linux kernel directly, "
        "with a serial console, virtio disks, console and entropy.",
    )
    parser.add_argument("--version", action="version", version=f"kvmlet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_run_parser(commands, raw_description)
    add_sandbox_parser(commands, raw_description, add_machine_arguments)

    replay = commands.add_parser(
        "replay",
        help="feed a --record file's accesses to fresh device models, report a divergence",
        description="Rebuild the recorded machine's devices without KVM, make each recorded "
        "access again and check that every device answers and acts as it did in the run.",
        epilog=REPLAY_EPILOG,
        formatter_class=raw_description,
    )
    replay.add_argument("file", metavar="FILE", help="a file written by kvmlet run --record")

    build = commands.add_parser(
        "build-guest",
        help="build (or find cached) the default guest kernel and initramfs",
        description="Build kvmlet's default guest from Debian's linux-source-6.1 (or --source) "
        "into kvmlet's cache: $KVMLET_CACHE_DIR, else $XDG_CACHE_HOME/kvmlet, else "
        "~/.cache/kvmlet. An unchanged configuration is found in the cache at once. The first "
        "build takes 7-8 minutes on 2 idle cores and keeps the extracted source (1.5 GB) "
        "and the build objects for faster rebuilds.",
        formatter_class=plain,
    )
    build.add_argument("--source", metavar="DIR", help="a Linux source tree to use")
    build.add_argument(
        "--install-source",
        action="store_true",
        help="apt-get install linux-source-6.1 and the build tools when missing (root only)",
    )
    build.add_argument(
        "--clean",
        action="store_true",
        help="remove what only a rebuild needs (the extracted source and the build objects) "
        "and cached guests of other configurations, keep the current default guest, and exit",
    )
    add_control_commands(commands, plain, raw_description)
    return parser


def _command_sandbox(args: argparse.Namespace) -> int:
    return command_sandbox(args, machine_config, check_kvm_before_building, notice_profile)


def _command_replay(args: argparse.Namespace) -> int:
    from kvmlet.machine.replay import replay

    result = replay(args.file)
    print(f"kvmlet: {result.summary()}", file=sys.stderr)
    return 0 if result.divergence is None else 2


def _command_build_guest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvmlet.guest import clean_cache, ensure_default_guest
    from kvmlet.guest.cache import format_bytes

    if args.clean:
        removed, kept = clean_cache()
        for path, size in removed:
            print(f"removed {path} ({format_bytes(size)})")
        for path in kept:
            print(f"kept    {path}")
        print(f"freed {format_bytes(sum(size for _, size in removed))}")
        return 0
    source = Path(args.source) if args.source is not None else None
    guest = ensure_default_guest(source, install_source=args.install_source)
    print(f"kernel (ELF):    {guest.vmlinux}")
    print(f"kernel (bzImage): {guest.bzimage}")
    print(f"initramfs:       {guest.initrd}")
    return 0


COMMANDS = {
    "run": command_run,
    "sandbox": _command_sandbox,
    "replay": _command_replay,
    "build-guest": _command_build_guest,
    **CONTROL_COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except KvmletError as error:
        print(f"kvmlet: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmlet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
