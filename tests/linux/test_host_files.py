"""The host's files in the guest: a 9p share both ways, the host's / as the guest's root
(kvmlet run --rootfs), and kvmlet sandbox on the caller's directory. Three boots in all: each
test checks as much as one boot can show."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kvmlet.guest.run_protocol import parse_exit_status, run_parameter
from kvmlet.machine.config import ShareConfig
from kvmlet.machine.machine import Machine
from kvmlet.machine.shares import with_root_share
from kvmlet.sandboxing import sandbox
from tests.helpers.guests import BOOT_TIMEOUT

pytestmark = pytest.mark.linux
CHECKOUT = Path(__file__).resolve().parents[2]

SCRIPT = """\
set -e
mkdir -p /mnt/data
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 data /mnt/data
cat /mnt/data/from-host
find /mnt/data/tree -type f | sort
cp /mnt/data/tree/a/b/leaf /root/copied
sh -c 'echo "copied: $(cat /root/copied)"'
echo "written by the guest" > /mnt/data/from-guest
touch /usr/kvmlet-overlay-write && echo overlay-ok
exit 5
"""


def test_the_hosts_root_boots_and_runs_a_script_with_a_share_both_ways(guest_config, tmp_path):
    data = tmp_path / "data"
    (data / "tree" / "a" / "b").mkdir(parents=True)
    (data / "tree" / "a" / "b" / "leaf").write_text("leaf text\n")
    (data / "tree" / "top").write_text("top\n")
    (data / "from-host").write_text("written by the host\n")
    config = replace(
        guest_config,
        initrd=None,
        shares=(ShareConfig(data, "data"),),
        extra_parameters=(run_parameter(SCRIPT),),
    )
    with Machine(with_root_share(config, "/")) as machine:
        stop = machine.wait(BOOT_TIMEOUT)
        console = machine.console.transcript()
    text = console.decode(errors="replace").replace("\r\n", "\n")
    assert parse_exit_status(console) == 5, f"{stop}\n{text[-3000:]}"
    assert "written by the host\n" in text
    assert "/mnt/data/tree/a/b/leaf\n/mnt/data/tree/top\n" in text
    assert "copied: leaf text\n" in text and "overlay-ok\n" in text
    assert (data / "from-guest").read_text() == "written by the guest\n"
    assert not os.path.exists("/usr/kvmlet-overlay-write"), "the overlay wrote through"


def test_sandbox_cli_writes_the_callers_directory_streams_and_exits_with_the_status(tmp_path):
    command = (
        'echo $((6*7)) > out.txt; read line; echo "got $line"; echo early; sleep 3; '
        "echo late >&2; exit 3"
    )
    started = time.monotonic()
    kvmlet = [sys.executable, "-m", "kvmlet", "sandbox", "--timeout", str(BOOT_TIMEOUT)]
    process = subprocess.Popen(
        [*kvmlet, "--", "sh", "-c", command],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdin.write(b"from stdin\n")
    process.stdin.close()
    arrivals = []

    def read_stdout() -> None:
        for line in process.stdout:
            arrivals.append((line, time.monotonic()))

    reader = threading.Thread(target=read_stdout)
    reader.start()
    errors = process.stderr.read()
    status = process.wait(BOOT_TIMEOUT + 30)
    ended = time.monotonic()
    reader.join(10)
    assert status == 3, errors.decode(errors="replace")
    assert [line for line, _ in arrivals] == [b"got from stdin\n", b"early\n"]
    early = arrivals[1][1]
    assert ended - early >= 2, "stdout came only at the end, not as it was written"
    assert errors.decode().splitlines()[-1] == "late"
    assert (tmp_path / "out.txt").read_text() == "42\n"
    assert (tmp_path / "out.txt").stat().st_uid == os.getuid()
    assert ended - started < BOOT_TIMEOUT


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None, reason="no cc")
def test_sandbox_builds_a_c_program_with_the_hosts_compiler(tmp_path):
    project = tmp_path / "somedir"
    project.mkdir()
    (project / "hello.c").write_text(
        '#include <stdio.h>\nint main(void) { printf("hello %d\\n", 6 * 7); return 0; }\n'
    )
    (project / "Makefile").write_text("hello: hello.c\n\tcc -O2 -o hello hello.c\n")
    result = sandbox(
        "make -C somedir && ./somedir/hello", cwd=str(tmp_path), timeout=BOOT_TIMEOUT * 2
    )
    assert result.status == 0, result.output
    assert result.stdout.endswith(b"hello 42\n")
    built = subprocess.run([str(project / "hello")], capture_output=True, check=True)
    assert built.stdout == b"hello 42\n"
