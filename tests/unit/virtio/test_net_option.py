"""The `-n/--net` option: modes, options, MAC addresses, and one clear line for mistakes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.errors import KvmletError
from kvmlet.virtio.net.option import NetConfig, PortForward, parse_net_option


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user", NetConfig("user")),
        ("", NetConfig("user")),
        ("none", NetConfig("none")),
        (
            "user,hostfwd=tcp:2222:22,hostfwd=udp:5353:53",
            NetConfig(forwards=(PortForward("tcp", 2222, 22), PortForward("udp", 5353, 53))),
        ),
        ("hostfwd=tcp:8080:80", NetConfig(forwards=(PortForward("tcp", 8080, 80),))),
        ("tap", NetConfig("tap")),
        ("tap,ifname=kvm0,vhost=off", NetConfig("tap", ifname="kvm0", vhost=False)),
        ("tap,vhost=on,mtu=9000", NetConfig("tap", mtu=9000, vhost=True)),
        ("user,mac=52-54-00-AB-cd-01", NetConfig(mac="52:54:00:ab:cd:01")),
    ],
)
def test_good_options(text, expected):
    assert parse_net_option(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slirp", "network 'slirp': unknown mode 'slirp' (user, tap or none)"),
        ("user,ifname=x", "network 'user,ifname=x': user mode has no option 'ifname'"),
        ("none,mac=52:54:00:00:00:01", "none mode has no option 'mac'"),
        ("tap,vhost", "network 'tap,vhost': 'vhost' is not opt=value"),
        ("tap,vhost=", "'vhost=' is not opt=value"),
        ("tap,vhost=yes", "vhost=yes is not on or off"),
        ("tap,ifname=a,ifname=b", "ifname given twice"),
        ("user,hostfwd=tcp:80", "hostfwd=tcp:80 is not tcp:HOSTPORT:GUESTPORT (or udp:...)"),
        ("user,hostfwd=sctp:1:2", "hostfwd=sctp:1:2 is not tcp:HOSTPORT:GUESTPORT"),
        ("user,hostfwd=tcp:0:22", "hostfwd=tcp:0:22: '0' is not a port (1-65535)"),
        ("user,hostfwd=tcp:22:65536", "'65536' is not a port (1-65535)"),
        ("user,hostfwd=tcp:²:22", "'²' is not a port"),
        ("hostfwd=tcp:22:22,hostfwd=tcp:22:23", "host port tcp:22 forwarded twice"),
        ("user,mtu=65521", "mtu=65521 is not 68-65520"),
        ("tap,mtu=67", "mtu=67 is not 68-65535"),
        ("user,mac=52:54:00:00:01", "mac=52:54:00:00:01 is not six hex bytes"),
        ("user,mac=52:54:00:00:01:+1", "is not six hex bytes"),
        ("user,mac=01:00:5e:00:00:01", "mac=01:00:5e:00:00:01 is a multicast address"),
    ],
)
def test_mistakes_are_one_line(text, message):
    with pytest.raises(KvmletError) as raised:
        parse_net_option(text)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@given(st.text(alphabet=st.sampled_from("usertapnohf=,:0123456789abcdefmixvlw²-"), max_size=40))
def test_any_text_parses_or_is_a_kvmlet_error(text):
    try:
        config = parse_net_option(text)
    except KvmletError:
        return
    assert config.mode in ("user", "tap", "none")


def test_the_default_mtu_follows_the_mode():
    assert parse_net_option("user").effective_mtu == 65520
    assert parse_net_option("tap").effective_mtu == 1500
    assert parse_net_option("tap,mtu=9000").effective_mtu == 9000


def test_a_generated_mac_is_local_unicast_and_stable_per_machine_and_nic():
    config = parse_net_option("user")
    first = config.mac_address("web", 0)
    assert first == config.mac_address("web", 0)
    assert first != config.mac_address("web", 1) != config.mac_address("db", 0)
    for mac in (first, config.mac_address(None), config.mac_address("x" * 100, 7)):
        assert len(mac) == 6 and mac[0] & 0b11 == 0b10  # locally administered, unicast
    assert config.mac_address(None) != config.mac_address(None)


def test_a_configured_mac_wins():
    config = parse_net_option("tap,mac=52:54:00:12:34:56")
    assert config.mac_address("web", 3) == bytes.fromhex("525400123456")


@pytest.mark.parametrize(
    ("made", "message"),
    [
        (lambda: NetConfig("slirp"), "network 'slirp': unknown mode"),
        (lambda: NetConfig("user", ifname="tap0"), "user mode has no option 'ifname'"),
        (lambda: NetConfig("none", forwards=(PortForward("tcp", 1, 2),)), "no option 'hostfwd'"),
        (lambda: NetConfig("tap", mtu=10), "mtu=10 is not 68-65535"),
        (lambda: NetConfig("tap", mac="ff:ff:ff:ff:ff:ff"), "is a multicast address"),
        (lambda: NetConfig("tap", ifname="a" * 16), "is not an interface name"),
        (lambda: NetConfig("tap", ifname="a b"), "is not an interface name"),
        (lambda: NetConfig(forwards=(("tcp", 0, 22),)), "'0' is not a port"),
        (lambda: NetConfig(forwards=(("tcp", 22),)), "a forward is (protocol, host port, guest"),
    ],
)
def test_a_net_config_made_in_python_is_checked_the_same_way(made, message):
    with pytest.raises(KvmletError) as raised:
        made()
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_net_config_made_in_python_is_normalised():
    config = NetConfig("tap", mac="52-54-00-AB-CD-EF", mtu="9000", ifname="k" * 15)
    assert config.mac == "52:54:00:ab:cd:ef" and config.mtu == 9000
    assert NetConfig(forwards=(("udp", 53, 5353),)).forwards == (PortForward("udp", 53, 5353),)
    assert parse_net_option("tap,ifname=" + "k" * 15) == NetConfig("tap", ifname="k" * 15)
    with pytest.raises(KvmletError, match="ifname=a/b is not an interface name"):
        parse_net_option("tap,ifname=a/b")
