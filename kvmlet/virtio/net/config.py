"""virtio-net's feature bits, configuration space and packet header (virtio 1.2 §5.1).

Everything here is shared by every virtio-net data path: the Python one (`device.py`) and a
vhost-net one, which offers the same features for the same backend, shows the guest the same
configuration space and tells its tap which offloads the guest accepted (`tap_offloads`).

Offloads are spoken in the tap's vocabulary (`TUN_F_*` from linux/if_tun.h): a backend says
which of them it can deliver to the guest, and the device turns that into the GUEST_* features
it offers. A backend that carries the virtio-net header (a tap with IFF_VNET_HDR) takes partial
checksums and TSO frames from the guest as they are, so those HOST_* features come with it;
a backend without the header (passt's stream) gets plain Ethernet frames and none of them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

VIRTIO_ID_NET = 1

# Feature bits (§5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1

# The header before every frame on both queues (§5.1.6): with VERSION_1 it always has
# num_buffers, 12 bytes: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
# num_buffers.
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size
NUM_BUFFERS_OFFSET = 10
ZERO_HEADER = bytes(HEADER_SIZE)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

# What a tap can be told to deliver (TUNSETOFFLOAD; linux/if_tun.h).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

ETHERNET_HEADER_SIZE = 14
VLAN_TAG_SIZE = 4
MIN_FRAME_SIZE = ETHERNET_HEADER_SIZE
MAX_FRAME_SIZE = 65536 + ETHERNET_HEADER_SIZE + VLAN_TAG_SIZE
"""The largest frame either queue carries: a 64 KiB GSO packet behind a tagged Ethernet header."""
MIN_MTU = 68
MAX_MTU = 65535
DEFAULT_MTU = 1500

# mac, status, max_virtqueue_pairs, mtu (§5.1.4); later fields belong to features not offered.
_CONFIG = struct.Struct("<6sHHH")

_GUEST_OFFLOADS = (
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
)
_HOST_OFFLOADS = (
    1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
)

# (feature, what it needs: at least one of these bits), from §5.1.3.1.
_DEPENDENCIES = (
    (VIRTIO_NET_F_GUEST_TSO4, 1 << VIRTIO_NET_F_GUEST_CSUM),
    (VIRTIO_NET_F_GUEST_TSO6, 1 << VIRTIO_NET_F_GUEST_CSUM),
    (VIRTIO_NET_F_GUEST_ECN, 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6),
    (VIRTIO_NET_F_GUEST_UFO, 1 << VIRTIO_NET_F_GUEST_CSUM),
    (VIRTIO_NET_F_HOST_TSO4, 1 << VIRTIO_NET_F_CSUM),
    (VIRTIO_NET_F_HOST_TSO6, 1 << VIRTIO_NET_F_CSUM),
    (VIRTIO_NET_F_HOST_ECN, 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6),
    (VIRTIO_NET_F_HOST_UFO, 1 << VIRTIO_NET_F_CSUM),
)


def device_features(vnet_header: bool, offloads: int, mergeable: bool = True) -> int:
    """The virtio-net features offered for a backend (the common virtio bits come on top).

    `vnet_header`: the backend takes and gives frames behind the virtio-net header, so partial
    checksums and TSO frames from the guest pass through. `offloads`: the TUN_F_* set the
    backend can be told to deliver to the guest (a tap's, as the kernel reported it).
    """
    features = (1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MTU) | (
        1 << VIRTIO_NET_F_MRG_RXBUF if mergeable else 0
    )
    if not vnet_header:
        return features
    features |= _HOST_OFFLOADS
    for feature, tun_flag in _GUEST_OFFLOADS:
        if offloads & tun_flag:
            features |= 1 << feature
    return without_unmet_dependencies(features)


def without_unmet_dependencies(features: int) -> int:
    """`features` less those whose prerequisites are missing: a device must not offer them
    (§2.2.1). In dependency order, one pass removes a chain (TSO without CSUM, then ECN)."""
    for feature, needs in _DEPENDENCIES:
        if not features & needs:
            features &= ~(1 << feature)
    return features


def tap_offloads(negotiated: int) -> int:
    """The TUN_F_* set a tap may use towards a guest that accepted `negotiated` features."""
    flags = 0
    for feature, tun_flag in _GUEST_OFFLOADS:
        if negotiated >> feature & 1:
            flags |= tun_flag
    return flags


def broken_dependency(features: int) -> str | None:
    """Why a driver's feature set breaks §5.1.3.1 (a feature without what it needs), or None."""
    for feature, needs in _DEPENDENCIES:
        if features >> feature & 1 and not features & needs:
            return f"feature {feature} without feature(s) {needs:#x}"
    return None


def config_space(mac: bytes, link_up: bool, mtu: int) -> bytes:
    """The device configuration: MAC, link status, one queue pair, MTU (§5.1.4)."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
    return _CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP if link_up else 0, 1, mtu)


class _HeaderRules(NamedTuple):
    """What a header may ask for in one direction, and the feature each thing needs."""

    flags: int
    checksum_feature: int
    gso_features: dict[int, int]
    ecn_feature: int


_TRANSMIT = _HeaderRules(
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_F_CSUM,
    {
        VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
    },
    VIRTIO_NET_F_HOST_ECN,
)
_RECEIVE = _HeaderRules(
    VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_F_GUEST_CSUM,
    {
        VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_GUEST_UFO,
    },
    VIRTIO_NET_F_GUEST_ECN,
)


def transmit_header_ok(features: int, flags: int, gso_type: int, gso_size: int) -> bool:
    """Whether a driver's transmit header asks only for what `features` allow (§5.1.6.2):
    DATA_VALID and RSC_INFO are for received frames, and segmentation needs a segment size."""
    rules_met = _header_ok(_TRANSMIT, features, flags, gso_type)
    return rules_met and (gso_type == VIRTIO_NET_HDR_GSO_NONE or gso_size > 0)


def receive_header_ok(features: int, flags: int, gso_type: int) -> bool:
    """Whether a backend's header uses only offloads the driver accepted (§5.1.6.4)."""
    return _header_ok(_RECEIVE, features, flags, gso_type)


def _header_ok(rules: _HeaderRules, features: int, flags: int, gso_type: int) -> bool:
    if flags & ~rules.flags or (flags and not features >> rules.checksum_feature & 1):
        return False
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        return True
    feature = rules.gso_features.get(gso_type & ~VIRTIO_NET_HDR_GSO_ECN)
    if feature is None or not features >> feature & 1:
        return False
    return not gso_type & VIRTIO_NET_HDR_GSO_ECN or bool(features >> rules.ecn_feature & 1)
