"""Tap interfaces, each test in a private network namespace (`unshare --net`, root only): the
host's own interfaces are never touched.

The last test is the whole Python data path against the kernel: the device behind a real tap
answers ARP and carries UDP with a partial checksum (the virtio-net header passed through)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.fresh_python import CHECKOUT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("unshare"),
    reason="needs root, /dev/net/tun and unshare(1) for a private network namespace",
)


def in_network_namespace(script: str) -> dict:
    """Run `script` in a fresh network namespace; it prints one JSON object."""
    return run_script(["unshare", "--net", sys.executable, "-c", textwrap.dedent(script)])


def run_script(argv: list[str], user: int | None = None) -> dict:
    result = subprocess.run(
        argv, cwd=CHECKOUT, capture_output=True, text=True, timeout=60, check=False, user=user
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def python_for(user: int) -> str | None:
    """A python3 `user` may run (this one may live in root's home)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run([python, "-c", "pass"], user=user, cwd="/", check=False)
        except OSError:
            continue
        if probe.returncode == 0:
            return python
    return None


def test_a_tap_is_created_with_the_vnet_header_and_its_offloads_probed():
    result = in_network_namespace(
        """
        import json, subprocess
        from kvmlet.host.tap import open_tap
        tap = open_tap("kvt0")
        details = subprocess.run(["ip", "-d", "link", "show", "kvt0"], capture_output=True,
                                 text=True).stdout
        unnamed = open_tap()
        print(json.dumps({"name": tap.name, "offloads": tap.supported_offloads,
                          "details": details, "unnamed": unnamed.name}))
        """
    )
    assert result["name"] == "kvt0" and result["unnamed"].startswith("tap")
    assert "tun type tap pi off vnet_hdr on" in result["details"]
    assert result["offloads"] & 0x0F == 0x0F  # CSUM, TSO4, TSO6, TSO_ECN on any Linux of note


def test_tap_mistakes_are_one_line_each():
    result = in_network_namespace(
        """
        import json
        from kvmlet.errors import KvmletError
        from kvmlet.host.tap import open_tap
        first = open_tap("kvt0")
        errors = {}
        for label, name, device in [("in use", "kvt0", "/dev/net/tun"),
                                    ("not a tap", "lo", "/dev/net/tun"),
                                    ("bad name", "a/b", "/dev/net/tun"),
                                    ("long name", "x" * 16, "/dev/net/tun"),
                                    ("no tun", "kvt1", "/nonexistent/tun")]:
            try:
                open_tap(name, device)
            except KvmletError as error:
                errors[label] = str(error)
        print(json.dumps(errors))
        """
    )
    assert result == {
        "in use": "tap interface kvt0 is in use by another process",
        "not a tap": "lo exists and is not a tap interface kvmlet can attach to",
        "bad name": "interface name 'a/b' is not valid (no '/', ':' or spaces)",
        "long name": "interface name 'xxxxxxxxxxxxxxxx' must have 1 to 15 bytes",
        "no tun": (
            "/nonexistent/tun does not exist: this kernel has no tap support loaded (modprobe tun)"
        ),
    }


def test_without_permission_on_dev_net_tun_the_error_says_so():
    script = textwrap.dedent(
        """
        import json
        from kvmlet.errors import KvmletError
        from kvmlet.host.tap import open_tap
        try:
            open_tap("kvt0")
        except KvmletError as error:
            print(json.dumps({"error": str(error)}))
        """
    )
    python = python_for(65534)
    if python is None:
        pytest.skip("no python3 here that the user nobody may run")
    result = run_script([python, "-c", script], user=65534)
    assert result == {
        "error": "no permission to open /dev/net/tun: a tap needs root or CAP_NET_ADMIN"
    }


def test_the_python_data_path_talks_to_the_kernel_through_a_tap():
    result = in_network_namespace(
        """
        import json, select, socket, struct, subprocess
        from kvmlet.host.tap import open_tap
        from kvmlet.memory import GuestMemory
        from kvmlet.virtio.net.frames import TapBackend
        from kvmlet.virtio.net.device import RECEIVE_QUEUE, TRANSMIT_QUEUE
        from tests.helpers.net import MAC, NetRig, header

        tap = open_tap("kvt0")
        for command in (["ip", "addr", "add", "10.9.0.1/24", "dev", "kvt0"],
                        ["ip", "link", "set", "kvt0", "up"]):
            subprocess.run(command, check=True)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("10.9.0.1", 5555))
        receiver.settimeout(5)

        memory = GuestMemory.anonymous([(0, 4 << 20)])
        rig = NetRig(memory, TapBackend(tap), None)
        rig.start()
        guest_ip, host_ip = bytes([10, 9, 0, 2]), bytes([10, 9, 0, 1])

        def exchange(frame, head=header()):
            rig.transmit(frame, head=head)
            for _ in range(100):
                select.select([tap.fileno()], [], [], 0.05)
                rig.pump()
                completions = rig.driver.collect(RECEIVE_QUEUE)
                if completions:
                    return completions

        def received(completions):
            frames = []
            for completion in completions:
                data = memory.read(posted[completion.head], completion.length)
                frames.append(data[12:])
            return frames

        posted = rig.post_receive_buffers(64, 2048)
        arp = (b"\\xff" * 6 + MAC + b"\\x08\\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1)
               + MAC + guest_ip + bytes(6) + host_ip)
        frames = received(exchange(arp))
        arp_replies = [f for f in frames if f[12:14] == b"\\x08\\x06" and f[20:22] == b"\\x00\\x02"]
        tap_mac = arp_replies[0][6:12]

        def ip_checksum(data):
            total = sum(struct.unpack(f">{len(data) // 2}H", data))
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            return ~total & 0xFFFF

        def udp_frame(payload, partial):
            length = 8 + len(payload)
            ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0, 64, 17, 0,
                             guest_ip, host_ip)
            ip = ip[:10] + struct.pack(">H", ip_checksum(ip)) + ip[12:]
            pseudo = guest_ip + host_ip + struct.pack(">BBH", 0, 17, length)
            udp = struct.pack(">HHHH", 4444, 5555, length, 0) + payload
            if partial:  # the checksum field holds the pseudo-header sum; the host finishes it
                folded = ~ip_checksum(pseudo) & 0xFFFF
            else:
                folded = ip_checksum(pseudo + udp + (b"\\0" if len(udp) % 2 else b""))
            udp = udp[:6] + struct.pack(">H", folded) + udp[8:]
            return tap_mac + MAC + b"\\x08\\x00" + ip + udp

        rig.transmit(udp_frame(b"complete checksum", False))
        rig.transmit(udp_frame(b"partial checksum", True), head=header(1, 0, 0, 0, 34, 6))
        got = [receiver.recv(100).decode(), receiver.recv(100).decode()]
        print(json.dumps({"arp_replies": len(arp_replies), "udp": got,
                          "counters": vars(rig.device.counters)}))
        """
    )
    assert result["arp_replies"] == 1
    assert result["udp"] == ["complete checksum", "partial checksum"]
    assert result["counters"]["tx_frames"] == 3
    assert result["counters"]["tx_dropped_malformed"] == 0


def test_a_tap_deleted_under_the_guest_takes_the_link_down():
    result = in_network_namespace(
        """
        import json, subprocess
        from kvmlet.host.tap import open_tap
        from kvmlet.memory import GuestMemory
        from kvmlet.virtio.net.frames import TapBackend
        from tests.helpers.net import NetRig

        tap = open_tap("kvt0")
        rig = NetRig(GuestMemory.anonymous([(0, 4 << 20)]), TapBackend(tap), None)
        rig.start()
        subprocess.run(["ip", "link", "delete", "kvt0"], check=True)
        rig.pump()
        print(json.dumps({"link_up": rig.device.link_up, "reports": rig.link_reports,
                          "config_status": rig.device.read_config(6, 2)}))
        """
    )
    assert result == {
        "link_up": False,
        "reports": [[False, "virtio-net: tap kvt0 was deleted: link down"]],
        "config_status": 0,
    }


def test_rtnetlink_reports_a_deleted_interface_by_its_index():
    """vhost-net reads the tap, not kvmlet: its deletion is news from rtnetlink."""
    result = in_network_namespace(
        """
        import json, subprocess
        from kvmlet.host.tap import LinkRemovals, interface_exists, open_tap

        removals = LinkRemovals()
        tap, other = open_tap("kvt0"), open_tap("kvt1")
        quiet = removals.read()
        subprocess.run(["ip", "link", "delete", "kvt0"], check=True)
        removed = removals.read()
        print(json.dumps({"quiet": sorted(quiet), "removed": sorted(removed),
                          "indexes": [tap.index, other.index],
                          "exists": [interface_exists(tap.index), interface_exists(other.index)]}))
        """
    )
    gone, kept = result["indexes"]
    assert gone != kept and result["quiet"] == [] and result["removed"] == [gone]
    assert result["exists"] == [False, True]


def test_deleted_links_reads_only_whole_dellink_messages():
    from kvmlet.host.tap import RTM_DELLINK, deleted_links

    def message(kind: int, index: int, declared: int | None = None) -> bytes:
        body = struct.pack("=BxHiII", 0, 1, index, 0, 0)
        length = 16 + len(body) if declared is None else declared
        return struct.pack("=IHHII", length, kind, 0, 0, 0) + body

    newlink = 16
    datagram = message(newlink, 3) + message(RTM_DELLINK, 4) + message(RTM_DELLINK, 5)
    assert deleted_links(datagram) == [4, 5]
    assert deleted_links(message(RTM_DELLINK, 6, declared=200)) == []  # longer than the datagram
    assert deleted_links(message(RTM_DELLINK, 7, declared=8)) == []  # shorter than a header
    assert deleted_links(message(RTM_DELLINK, 8, declared=20)) == []  # no room for its ifinfomsg
    assert deleted_links(b"\x01\x02") == []
