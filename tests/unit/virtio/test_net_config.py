"""virtio-net's shared rules: offered features, the tap's offloads, which headers are allowed."""

from __future__ import annotations

import pytest

from kvmlet.virtio.net.config import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    broken_dependency,
    config_space,
    device_features,
    receive_header_ok,
    tap_offloads,
    transmit_header_ok,
)


def bits(*features):
    return sum(1 << feature for feature in features)


GUEST_ALL = bits(
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
)
HOST_ALL = bits(
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN
)


def test_the_tap_gets_exactly_the_offloads_the_guest_accepted():
    assert tap_offloads(0) == 0
    assert tap_offloads(bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6)) == (
        TUN_F_CSUM | TUN_F_TSO6
    )
    everything = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
    assert tap_offloads(GUEST_ALL | HOST_ALL) == everything


def test_offered_features_never_break_a_dependency():
    assert device_features(True, TUN_F_TSO4 | TUN_F_TSO_ECN) & GUEST_ALL == 0  # no CSUM: none
    offered = device_features(True, TUN_F_CSUM | TUN_F_TSO_ECN)
    assert offered & GUEST_ALL == bits(VIRTIO_NET_F_GUEST_CSUM)  # ECN without TSO goes
    assert broken_dependency(offered) is None
    assert device_features(False, TUN_F_CSUM) & (GUEST_ALL | HOST_ALL) == 0


@pytest.mark.parametrize(
    ("features", "flags", "gso", "allowed"),
    [
        (0, 0, 0, True),
        (0, VIRTIO_NET_HDR_F_DATA_VALID, 0, False),
        (GUEST_ALL, VIRTIO_NET_HDR_F_DATA_VALID, 0, True),
        (GUEST_ALL, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP, True),
        (GUEST_ALL & ~bits(VIRTIO_NET_F_GUEST_UFO), 1, VIRTIO_NET_HDR_GSO_UDP, False),
        (GUEST_ALL, 1, VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN, True),
        (GUEST_ALL & ~bits(VIRTIO_NET_F_GUEST_ECN), 1, 4 | VIRTIO_NET_HDR_GSO_ECN, False),
        (GUEST_ALL, 4, 0, False),  # RSC_INFO: not offered
        (GUEST_ALL, 0, 5, False),  # UDP_L4: not offered
    ],
)
def test_received_headers(features, flags, gso, allowed):
    assert receive_header_ok(features, flags, gso) is allowed


@pytest.mark.parametrize(
    ("features", "flags", "gso", "size", "allowed"),
    [
        (0, 0, 0, 0, True),
        (HOST_ALL, VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, False),
        (HOST_ALL, 1, VIRTIO_NET_HDR_GSO_TCPV4, 1448, True),
        (HOST_ALL, 1, VIRTIO_NET_HDR_GSO_TCPV4, 0, False),
        (HOST_ALL, 1, VIRTIO_NET_HDR_GSO_UDP, 1448, False),  # HOST_UFO: not offered
        (bits(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4), 1, VIRTIO_NET_HDR_GSO_TCPV6, 1, False),
    ],
)
def test_transmitted_headers(features, flags, gso, size, allowed):
    assert transmit_header_ok(features, flags, gso, size) is allowed


def test_the_configuration_space_refuses_what_no_driver_could_use():
    with pytest.raises(ValueError, match="6 bytes"):
        config_space(b"\0" * 5, True, 1500)
    with pytest.raises(ValueError, match="MTU 67"):
        config_space(b"\2" * 6, True, 67)
    assert config_space(b"\2" * 6, False, 1500)[6:8] == b"\0\0"
