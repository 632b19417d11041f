"""The control commands: `kvmlet list`, `stop`, `pause`, `resume`, `snapshot`, `stat`,
`balloon`, `console`.

Each is a client of a running machine's control API (kvmlet/api), through `kvmlet.connect`;
what they print for a person is `kvmlet.api.report`'s.
"""

from __future__ import annotations

import argparse
import sys
import time

from kvmlet.errors import KvmletError

CONTROL_EPILOG = """\
NAME is a machine's name (`kvmlet list` shows them; `kvmlet run --name NAME` chooses one) or
the path of its API socket. The commands talk to the machine's control API, which
`kvmlet.connect(NAME)` gives Python programs.
"""

STOP_EPILOG = """\
examples:
  kvmlet stop web                 ask the guest (Ctrl-Alt-Del on its keyboard controller),
                                  wait up to 10 s for it to stop by itself, then stop it
  kvmlet stop web --grace 60      give the guest a minute to shut down cleanly
  kvmlet stop web --force         stop it at once, as pulling the plug

A Linux guest turns Ctrl-Alt-Del into a reboot (kvmlet's `reboot=k` ends the machine) or, with
systemd or busybox init, an orderly shutdown; it needs its AT keyboard driver and virtual
terminals (CONFIG_KEYBOARD_ATKBD, CONFIG_VT).
"""

BALLOON_EPILOG = """\
examples:
  kvmlet balloon web              show the balloon and the guest's memory figures
  kvmlet balloon web 64M          take 64 MiB from the guest (MemTotal shrinks by as much)
  kvmlet balloon web 0            give it all back

The machine needs a balloon device: start it with `kvmlet run --balloon`. Memory the guest
gives up is released on the host at once (the monitor's RSS drops); free memory the guest
reports (2 MiB blocks it does not use) is released too, whatever the target.
"""


SNAPSHOT_EPILOG = """\
examples:
  kvmlet snapshot web web.snap    save `web` to web.snap; it goes on running
  kvmlet snapshot web web.snap --stop
  kvmlet run --restore web.snap   start it again from the file (in a new process)

The file holds every vCPU, the devices and guest RAM (its zero pages as holes: it is sparse);
the disks are not copied, and a restore refuses a disk changed since (`--force` overrides).
The guest is held only while its state is copied; the file is complete once this returns.
"""


def add_control_commands(commands, plain, raw_description) -> None:
    """list, stop, pause, resume, snapshot, stat, balloon, console: clients of a machine's
    API."""
    listing = commands.add_parser(
        "list",
        help="list your running machines",
        description="A table of your running machines: name, pid, state, vCPUs, memory, uptime.",
        formatter_class=plain,
    )
    listing.add_argument("--json", action="store_true", help="a JSON list of the machines")

    def control(name: str, summary: str, description: str, epilog: str = CONTROL_EPILOG):
        parser = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=raw_description,
        )
        parser.add_argument("machine", metavar="NAME", help="machine name or API socket path")
        return parser

    stop = control(
        "stop",
        "stop a machine: ask the guest first, then stop it",
        "Stop a running machine: ask the guest to shut down, give it --grace seconds, then "
        "stop it from the host. Prints how it ended.",
        STOP_EPILOG,
    )
    stop.add_argument("--force", action="store_true", help="stop at once, without asking")
    stop.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long the guest gets to stop by itself (default: %(default)g)",
    )
    control(
        "pause",
        "pause a machine (its vCPUs and devices stop, its clock too)",
        "Pause a running machine: every vCPU stops at a safe point and the devices go idle; "
        "the guest's clock does not advance until `kvmlet resume`.",
    )
    control("resume", "resume a paused machine", "Resume a paused machine.")
    snapshot = control(
        "snapshot",
        "save a running machine to a file (kvmlet run --restore FILE starts it again)",
        "Save a machine to a snapshot file: it is paused, saved, then goes on running "
        "(or stays paused, or stops).",
        SNAPSHOT_EPILOG,
    )
    snapshot.add_argument("file", metavar="FILE", help="the snapshot file to write")
    then = snapshot.add_mutually_exclusive_group()
    then.add_argument(
        "--pause", dest="then", action="store_const", const="pause", help="stay paused after"
    )
    then.add_argument(
        "--stop", dest="then", action="store_const", const="stop", help="stop the machine after"
    )
    stat = control(
        "stat",
        "show a machine's statistics (exits, I/O, queues, memory)",
        "Show a machine's counters: vCPU exits by reason, the busiest I/O regions, virtio "
        "queues, the monitor's memory and the balloon.",
    )
    stat.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) with rates per second, until Ctrl-C",
    )
    stat.add_argument("--json", action="store_true", help="the whole statistics document")
    balloon = control(
        "balloon",
        "show or set how much memory the balloon takes from a guest",
        "Show the balloon, or set its size: the memory taken from the guest.",
        BALLOON_EPILOG,
    )
    balloon.add_argument(
        "size", nargs="?", metavar="SIZE", help="balloon size, e.g. 64M, 1G, 0 (plain: MiB)"
    )
    console = control(
        "console",
        "print the last output of a machine's console",
        "Print what the guest last wrote to its console (kvmlet has no detached mode to "
        "attach to: the console is on the terminal of `kvmlet run`).",
    )
    console.add_argument(
        "--bytes",
        type=int,
        default=4096,
        metavar="N",
        help="how much of the end of the output (default: %(default)s, at most 1 MiB)",
    )


def _command_list(args: argparse.Namespace) -> int:
    from kvmlet.api.client import list_machines
    from kvmlet.api.report import machine_table

    machines = list_machines()
    if args.json:
        import json

        print(json.dumps([info.raw for info in machines], indent=2))
    else:
        sys.stdout.write(machine_table(machines))
    return 0


def _command_stop(args: argparse.Namespace) -> int:
    from kvmlet.api.client import connect

    if not 0 <= args.grace <= 600:
        raise KvmletError("--grace must be between 0 and 600 seconds")
    with connect(args.machine) as client:
        result = client.stop(force=args.force, grace_seconds=args.grace)
    how = "stopped by itself" if result.clean else "stopped from the host"
    print(f"{args.machine}: {how} ({result.message})")
    return 0


def _command_pause_resume(args: argparse.Namespace) -> int:
    from kvmlet.api.client import connect

    with connect(args.machine) as client:
        info = client.pause() if args.command == "pause" else client.resume()
    print(f"{info.name}: {info.state}")
    return 0


def _command_snapshot(args: argparse.Namespace) -> int:
    from kvmlet.api.client import connect
    from kvmlet.api.report import size_text

    with connect(args.machine) as client:
        info = client.snapshot(args.file, args.then or "resume")
    print(
        f"{args.machine}: saved to {info.path} ({size_text(info.ram_bytes)} of RAM, held "
        f"{info.paused_seconds * 1000:.0f} ms, {info.seconds:.2f} s in all); {info.state}"
    )
    return 0


def _command_stat(args: argparse.Namespace) -> int:
    from kvmlet.api.client import connect
    from kvmlet.api.report import stats_text

    if args.watch is not None and not 0.1 <= args.watch <= 3600:
        raise KvmletError("--watch takes 0.1 to 3600 seconds")
    with connect(args.machine) as client:
        if args.json:
            import json

            print(json.dumps(client.stats().raw, indent=2, sort_keys=True))
            return 0
        previous = None
        while True:
            info, stats = client.describe(), client.stats()
            text = stats_text(info, stats, previous, args.watch or 0.0)
            if args.watch is None:
                sys.stdout.write(text)
                return 0
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
            sys.stdout.write(clear + text)
            sys.stdout.flush()
            previous = stats
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0


def _command_balloon(args: argparse.Namespace) -> int:
    from kvmlet.api.client import connect
    from kvmlet.api.report import balloon_text

    size = None if args.size is None else parse_balloon_size(args.size)
    with connect(args.machine) as client:
        balloon = client.balloon() if size is None else client.set_balloon(size)
    sys.stdout.write(balloon_text(balloon))
    return 0


def parse_balloon_size(text: str) -> int:
    """`64M`, `1G`, `512K`, `0`, or a plain number of MiB, in bytes."""
    import re

    match = re.fullmatch(r"(\d{1,15})([KMGT]?)", text.strip(), re.IGNORECASE)
    if match is None:
        raise KvmletError(f"cannot read balloon size {text!r}: use e.g. 64M, 1G or 0")
    unit = match.group(2).upper() or "M"
    return int(match.group(1)) << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _command_console(args: argparse.Namespace) -> int:
    from kvmlet.api.client import connect

    if not 1 <= args.bytes <= 1 << 20:
        raise KvmletError("--bytes takes 1 to 1048576")
    with connect(args.machine) as client:
        sys.stdout.write(client.console(args.bytes).text)
    return 0


CONTROL_COMMANDS = {
    "list": _command_list,
    "stop": _command_stop,
    "pause": _command_pause_resume,
    "resume": _command_pause_resume,
    "snapshot": _command_snapshot,
    "stat": _command_stat,
    "balloon": _command_balloon,
    "console": _command_console,
}
