"""`kvmlet run ARGUMENTS` with the boot timer on: the `kvmlet-quiet` case of the box benchmark
(benchmarks/boot_peers.py). The CLI has no flag for the boot timer yet, so this builds the run
as `kvmlet run` does (its parser and `run_config`) and adds it; it imports nothing else, so the
start-up it measures is the CLI's."""

import dataclasses
import sys

from kvmlet import cli
from kvmlet.machine.machine import Machine

config = cli.run_config(cli.build_parser().parse_args(sys.argv[1:]))
config = dataclasses.replace(config, boot_timer=True)
with Machine(config, console_echo_fd=1) as machine:
    sys.exit(machine.wait().exit_status)
