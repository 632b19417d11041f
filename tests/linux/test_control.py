"""The control API against the default Linux guest: list, statistics, pause and resume with
the guest's clock, the balloon as the guest and the host see it, load, and stop.

One guest serves the module's tests in order (a boot is ~10 s in the test box); each test
leaves it running for the next, the last one stops it.
"""

from __future__ import annotations

import itertools
import re
import statistics
import threading
import time

import pytest

import kvmlet
from kvmlet.api.client import list_machines
from kvmlet.guest import READY_MARKER
from kvmlet.machine.machine import Machine
from tests.helpers.guests import BOOT_TIMEOUT

pytestmark = pytest.mark.linux

TICKER = (
    "(i=0; while :; do echo \"tick $i $(cut -d' ' -f1 /proc/uptime)\"; i=$((i+1)); "
    "sleep 0.1; done) &\n"
)
TICK = re.compile(r"tick (\d+) (\d+\.\d+)")
MiB = 1 << 20


class Guest:
    """The running default guest, its API server and a client; shell commands by marker."""

    def __init__(self, machine: Machine, server):
        self.machine = machine
        self.server = server
        self.client = kvmlet.connect(server.name)
        self._marks = itertools.count()

    def run(self, command: str, timeout: float = 240) -> str:
        """Run a shell command in the guest; its output (one line, between markers that the
        console's echo of the typed line does not show: the quotes split them there)."""
        mark = f"m{next(self._marks)}"
        self.machine.console.write(f'echo "<{mark}"">$({command})<""/{mark}>"\n')
        pattern = rf"(?s)<{mark}>(.*?)</{mark}>"
        return self.machine.console.wait_for(pattern, timeout, lambda: self.machine.running)[
            1
        ].strip()

    def ticks(self) -> list[tuple[int, float]]:
        return [(int(n), float(t)) for n, t in TICK.findall(self.machine.console.text())]

    def meminfo(self, field: str) -> int:
        return int(self.run(f"grep {field}: /proc/meminfo").split()[1]) * 1024


@pytest.fixture(scope="module")
def guest(tmp_path_factory, default_guest):
    runtime = tmp_path_factory.mktemp("runtime")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_RUNTIME_DIR", str(runtime))
        config = kvmlet.with_default_guest(kvmlet.MachineConfig(memory=256 * MiB, balloon=True))
        with Machine(config) as machine, kvmlet.serve(machine, "box-guest") as server:
            machine.console.wait_for(READY_MARKER, BOOT_TIMEOUT, lambda: machine.running)
            guest = Guest(machine, server)
            yield guest
            guest.client.close()


def test_list_shows_the_running_guest(guest):
    (info,) = list_machines()
    assert (info.name, info.state, info.vcpus, info.memory_bytes) == (
        "box-guest",
        "running",
        1,
        256 * MiB,
    )
    assert info.uptime_seconds > 0
    assert {"virtio-balloon", "uart-16550a"} <= {device["type"] for device in info.devices}


def test_statistics_show_increasing_counters(guest):
    before = guest.client.stats()
    guest.run("echo hello; cat /proc/uptime")
    after = guest.client.stats()
    assert after.vcpus[0].exits["io"] > before.vcpus[0].exits["io"]
    com1 = "com1"
    assert (
        after.raw["port_io"]["regions"][com1]["writes"]
        > before.raw["port_io"]["regions"][com1]["writes"]
    )
    assert (
        after.raw["legacy"]["uarts"]["COM1"]["tx_bytes"]
        > before.raw["legacy"]["uarts"]["COM1"]["tx_bytes"]
    )
    assert after.memory["monitor_rss_bytes"] > 0 and after.memory["guest_ram_rss_bytes"] > 0


def test_pause_stops_the_console_and_resume_restarts_it_without_a_clock_jump(guest):
    guest.machine.console.write(TICKER)
    deadline = time.monotonic() + 60
    while len(guest.ticks()) < 10:
        assert time.monotonic() < deadline, "the ticker never ticked"
        time.sleep(0.1)
    guest.client.pause()
    paused_at = time.monotonic()
    frozen = guest.ticks()
    time.sleep(2.0)
    assert guest.ticks() == frozen  # not one tick while paused
    assert guest.client.describe().state == "paused"
    guest.client.resume()
    paused_for = time.monotonic() - paused_at
    deadline = time.monotonic() + 30
    while len(guest.ticks()) < len(frozen) + 5:
        assert time.monotonic() < deadline, "the ticker did not come back"
        time.sleep(0.1)
    ticks = guest.ticks()
    assert [n for n, _ in ticks] == list(range(len(ticks)))  # none lost, none repeated
    last_before, first_after = ticks[len(frozen) - 1][1], ticks[len(frozen)][1]
    # The guest's clock stood still while paused: one tick's time passed, not the pause's.
    assert first_after - last_before < 1.0 < paused_for
    guest.machine.console.write("kill %1\n")


def test_balloon_takes_memory_from_the_guest_and_the_host_gets_it_back(guest):
    guest.run("dd if=/dev/zero of=/dev/shm/fill bs=1M count=150 2>&1 | tail -1")
    guest.run("rm /dev/shm/fill; echo freed")  # 150 MiB free in the guest, resident on the host
    total = guest.meminfo("MemTotal")
    resident = guest.machine.stats()["memory"]["guest_ram_rss_bytes"]

    balloon = guest.client.set_balloon(64 * MiB)
    assert balloon.target_bytes == 64 * MiB
    deadline = time.monotonic() + 60
    while guest.client.balloon().actual_bytes != 64 * MiB:
        assert time.monotonic() < deadline, "the guest's driver never reached the target"
        time.sleep(0.2)
    info = guest.client.balloon()
    assert info.inflated_bytes == 64 * MiB  # the device released exactly those pages
    shrunk = guest.meminfo("MemTotal")
    assert total - shrunk == 64 * MiB
    deadline = time.monotonic() + 60  # the guest's own figures follow, in its own time
    while info.statistics.get("total_memory", total) > shrunk + 4 * MiB:
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
        info = guest.client.balloon()
    assert info.statistics_age_seconds < 60
    assert 0 < info.statistics["free_memory"] < shrunk
    assert 0 < info.statistics["available_memory"] < shrunk
    after = guest.machine.stats()["memory"]["guest_ram_rss_bytes"]
    assert resident - after >= 32 * MiB, (resident, after)

    guest.client.set_balloon(0)
    deadline = time.monotonic() + 60
    while guest.client.balloon().actual_bytes != 0:
        assert time.monotonic() < deadline, "the guest never took its memory back"
        time.sleep(0.2)
    assert guest.meminfo("MemTotal") == total


def test_free_pages_the_guest_reports_are_released_on_the_host(guest):
    guest.run("dd if=/dev/zero of=/dev/shm/fill bs=1M count=100 2>&1 | tail -1")
    reported = guest.client.balloon().reported_bytes
    resident = guest.machine.stats()["memory"]["guest_ram_rss_bytes"]
    guest.run("rm /dev/shm/fill; echo freed")
    deadline = time.monotonic() + 60
    while guest.client.balloon().reported_bytes - reported < 32 * MiB:
        assert time.monotonic() < deadline, "the guest reported no free pages"
        time.sleep(0.5)
    after = guest.machine.stats()["memory"]["guest_ram_rss_bytes"]
    assert resident - after >= 32 * MiB, (resident, after)


def test_the_guest_keeps_answering_under_api_load(guest):
    latencies: list[float] = []
    errors: list[Exception] = []

    def hammer(requests: int) -> None:
        try:
            with kvmlet.connect(guest.server.name) as client:
                for _ in range(requests):
                    started = time.perf_counter()
                    client.stats()
                    latencies.append(time.perf_counter() - started)
        except Exception as error:  # reported below
            errors.append(error)

    clients = [threading.Thread(target=hammer, args=(20,)) for _ in range(10)]
    for client in clients:
        client.start()
    answers = [guest.run(f"echo $((6 * {n}))", timeout=60) for n in range(3)]
    for client in clients:
        client.join(300)
    assert errors == []
    assert answers == ["0", "6", "12"]
    assert len(latencies) == 200
    print(f"stats under load: p50 {statistics.median(latencies) * 1e3:.1f} ms")


def test_a_clean_stop_ends_the_guest_within_a_second(guest):
    """The API asks first (Ctrl-Alt-Del on the i8042): the guest's own kernel restarts."""
    started = time.monotonic()
    result = guest.client.stop(grace_seconds=10)
    took = time.monotonic() - started
    assert (result.reason, result.clean) == ("reset", True)
    assert took < 1.0
    assert guest.machine.wait(5).reason.name == "RESET"
