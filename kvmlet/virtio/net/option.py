"""The `-n/--net MODE[,opt=value...]` option: which network a guest's NIC gets (`NetConfig`).

Modes:

- `user[,hostfwd=tcp:HOSTPORT:GUESTPORT...]`: rootless networking through passt (DHCP, DNS,
  NAT to the host's network); each `hostfwd` forwards a host port (`tcp:` or `udp:`) to the
  guest. The default mode, also when the option names none (`-n hostfwd=tcp:2222:22`).
- `tap[,ifname=NAME][,vhost=on|off]`: a tap interface, created when absent (root or
  CAP_NET_ADMIN); `vhost` picks the kernel's vhost-net data path (default: where
  /dev/vhost-net opens) or the Python one.
- `none`: no NIC.

Every NIC takes `mac=52:54:00:12:34:56` (a unicast address) and `mtu=N` (68-65535; passt
takes at most 65520). Without `mac=`, `NetConfig.mac_address` makes a locally administered one,
the same every time for a given machine name and NIC index, random without a name. Without
`mtu=`, user mode uses passt's 65520 (few, large frames through the Python data path) and tap
mode 1500 (what a tap and the host's bridges expect).

Parsing is a pure function: `parse_net_option(text)` or one `KvmletError` line. A `NetConfig`
made in Python is checked the same way when it is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

from kvmlet.errors import KvmletError
from kvmlet.virtio.net.config import MAX_MTU, MIN_MTU

MODES = ("user", "tap", "none")
PASST_MAX_MTU = 65520
DEFAULT_MTU = {"user": PASST_MAX_MTU, "tap": 1500}
_HEX = frozenset("0123456789abcdefABCDEF")
IFNAMSIZ = 16
_OPTIONS = {
    "user": {"hostfwd", "mac", "mtu"},
    "tap": {"ifname", "vhost", "mac", "mtu"},
    "none": set(),
}


class PortForward(NamedTuple):
    """A host port forwarded to a guest port in user mode."""

    protocol: str  # "tcp" or "udp"
    host_port: int
    guest_port: int


@dataclass(frozen=True)
class NetConfig:
    """One NIC's network: the mode and its options, as `-n` gives them."""

    mode: str = "user"
    mac: str | None = None
    mtu: int | None = None
    ifname: str | None = None
    vhost: bool | None = None  # None: vhost-net where /dev/vhost-net opens
    forwards: tuple[PortForward, ...] = ()

    def __post_init__(self) -> None:
        where = f"network {self.mode!r}"
        if self.mode not in MODES:
            raise KvmletError(f"{where}: unknown mode (user, tap or none)")
        given = {
            "mac": self.mac is not None,
            "mtu": self.mtu is not None,
            "ifname": self.ifname is not None,
            "vhost": self.vhost is not None,
            "hostfwd": bool(self.forwards),
        }
        for key, present in given.items():
            if present and key not in _OPTIONS[self.mode]:
                raise KvmletError(f"{where}: {self.mode} mode has no option {key!r}")
        if self.mac is not None:
            object.__setattr__(self, "mac", _parse_mac(where, str(self.mac)))
        if self.mtu is not None:
            object.__setattr__(self, "mtu", _parse_mtu(where, self.mode, str(self.mtu)))
        if self.ifname is not None and not _is_interface_name(self.ifname):
            raise KvmletError(f"{where}: ifname={self.ifname!r} is not an interface name")
        forwards: list[PortForward] = []
        for forward in self.forwards:
            if not isinstance(forward, tuple) or len(forward) != 3:
                raise KvmletError(f"{where}: a forward is (protocol, host port, guest port)")
            protocol, host_port, guest_port = forward
            value = f"{protocol}:{host_port}:{guest_port}"
            forwards.append(_parse_forward(where, value, forwards))
        object.__setattr__(self, "forwards", tuple(forwards))

    @property
    def effective_mtu(self) -> int:
        """The MTU the guest is told (virtio-net's MTU feature, and passt's DHCP)."""
        return self.mtu if self.mtu is not None else DEFAULT_MTU.get(self.mode, 1500)

    def mac_address(self, machine_name: str | None = None, index: int = 0) -> bytes:
        """The NIC's MAC: the configured one, else one made from the machine's name and the
        NIC's index (stable across runs), else a random one; locally administered unicast."""
        if self.mac is not None:
            return bytes.fromhex(self.mac.replace(":", ""))
        if machine_name:
            import hashlib  # only here: 3 ms of imports otherwise on the way to every boot

            seed = hashlib.sha256(f"kvmlet-nic/{machine_name}/{index}".encode()).digest()[:6]
        else:
            seed = os.urandom(6)
        return bytes([(seed[0] & 0xFC) | 0x02]) + seed[1:]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


def parse_net_option(text: str) -> NetConfig:
    """Parse `MODE[,opt=value...]` (the mode may be left out: user)."""
    parts = text.split(",") if text else []
    mode = "user"
    if parts and "=" not in parts[0]:
        mode = parts.pop(0)
    if mode not in MODES:
        raise KvmletError(f"network {text!r}: unknown mode {mode!r} (user, tap or none)")
    values: dict[str, str] = {}
    forwards: list[PortForward] = []
    for part in parts:
        key, equals, value = part.partition("=")
        if not equals or not value:
            raise KvmletError(f"network {text!r}: {part!r} is not opt=value")
        if key not in _OPTIONS[mode]:
            raise KvmletError(f"network {text!r}: {mode} mode has no option {key!r}")
        if key == "hostfwd":
            forwards.append(_parse_forward(f"network {text!r}", value, forwards))
        elif key in values:
            raise KvmletError(f"network {text!r}: {key} given twice")
        else:
            values[key] = value
    where = f"network {text!r}"
    mtu = _parse_mtu(where, mode, values["mtu"]) if "mtu" in values else None
    vhost = _parse_switch(where, "vhost", values["vhost"]) if "vhost" in values else None
    mac = _parse_mac(where, values["mac"]) if "mac" in values else None
    ifname = values.get("ifname")
    if ifname is not None and not _is_interface_name(ifname):
        raise KvmletError(f"{where}: ifname={ifname} is not an interface name")
    return NetConfig(mode, mac, mtu, ifname, vhost, tuple(forwards))


def _parse_forward(where: str, value: str, earlier: list[PortForward]) -> PortForward:
    protocol, *ports = value.split(":")
    if protocol not in ("tcp", "udp") or len(ports) != 2:
        raise KvmletError(f"{where}: hostfwd={value} is not tcp:HOSTPORT:GUESTPORT (or udp:...)")
    host_port, guest_port = (_parse_port(where, value, port) for port in ports)
    if any(f.protocol == protocol and f.host_port == host_port for f in earlier):
        raise KvmletError(f"{where}: host port {protocol}:{host_port} forwarded twice")
    return PortForward(protocol, host_port, guest_port)


def _parse_port(where: str, value: str, port: str) -> int:
    if not _is_decimal(port) or not 0 < int(port) < 65536:
        raise KvmletError(f"{where}: hostfwd={value}: {port!r} is not a port (1-65535)")
    return int(port)


def _parse_mtu(where: str, mode: str, value: str) -> int:
    highest = PASST_MAX_MTU if mode == "user" else MAX_MTU
    if not _is_decimal(value) or not MIN_MTU <= int(value) <= highest:
        raise KvmletError(f"{where}: mtu={value} is not {MIN_MTU}-{highest}")
    return int(value)


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 6


def _is_interface_name(name: str) -> bool:
    """A name the kernel takes for a network interface (1-15 bytes, no '/', ':' or space)."""
    return (
        0 < len(name.encode()) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in "/:" or c.isspace() for c in name)
    )


def _parse_switch(where: str, key: str, value: str) -> bool:
    if value not in ("on", "off"):
        raise KvmletError(f"{where}: {key}={value} is not on or off")
    return value == "on"


def _parse_mac(where: str, value: str) -> str:
    pieces = value.replace("-", ":").split(":")
    if len(pieces) != 6 or any(len(piece) != 2 or not _HEX.issuperset(piece) for piece in pieces):
        raise KvmletError(f"{where}: mac={value} is not six hex bytes")
    address = bytes(int(piece, 16) for piece in pieces)
    if address[0] & 1:
        raise KvmletError(f"{where}: mac={value} is a multicast address")
    return format_mac(address)
