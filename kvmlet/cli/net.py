"""`kvmlet run -n/--net`: the option, its help and the NICs it asks for.

Kept apart from the rest of the command line so the network's help lives in one place; the
network stack itself is imported only when `-n` is given.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmlet.virtio.net.option import NetConfig

NETWORKS_HELP = """
networks (-n MODE[,opt=value...], repeatable: one NIC each, eth0, eth1... in the guest):
  user[,hostfwd=tcp:HOSTPORT:GUESTPORT...]  no privilege needed: passt (apt-get install passt)
      gives the guest DHCP, DNS and NAT to the host's network, and forwards host ports to it;
      frames go through kvmlet's Python data path. `-n` alone, or options without a mode
      (`-n hostfwd=tcp:8080:80`), mean user mode, for root too: it is the one mode that
      works with nothing set up on the host.
  tap[,ifname=NAME][,vhost=on|off]  root or CAP_NET_ADMIN: the tap NAME (created, down and
      without an address, when it does not exist: configure it or add it to a bridge).
      With vhost (the default where /dev/vhost-net opens) the kernel's vhost-net moves the
      packets and none reaches Python; vhost=off takes the Python data path.
  none  no NIC (the default without -n).
  Every mode but none takes mac=52:54:00:12:34:56 (default: derived from --name, so the
  same every run; random without one) and mtu=N (user 65520, tap 1500). The default guest
  asks for an address with DHCP (udhcpc) on every NIC it finds, unless -p has ip=...

  kvmlet run -n                       the default guest on the network (user mode: passt)
  kvmlet run -n user,hostfwd=tcp:2222:22 -n tap,ifname=tap0,vhost=on
"""


def add_net_option(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "-n",
        "--net",
        action="append",
        nargs="?",
        const="",
        default=[],
        metavar="MODE[,opt=value...]",
        help="a NIC on the network MODE: user (passt, no privilege; the default, also for "
        "-n alone), tap or none; repeatable (see networks below)",
    )


def net_configs(args: argparse.Namespace) -> dict[str, tuple[NetConfig, ...]]:
    """The `MachineConfig` fields for the -n options given (none: no field)."""
    if not args.net:
        return {}
    from kvmlet.virtio.net.option import parse_net_option

    return {"nets": tuple(parse_net_option(text) for text in args.net)}
