"""A machine imports the virtio modules its configuration uses, and no others (set-up time).

Each case builds a `Machine` in a fresh `python3 -S` (the sandbox's site would import modules
on its own) and lists the kvmlet modules loaded once it is built.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.fresh_python import run_fresh_python

pytestmark = pytest.mark.kvm

CHILD = """
import json, sys
from kvmlet.machine.config import DiskConfig, MachineConfig
from kvmlet.machine.machine import Machine
options = json.loads(sys.argv[1])
disks = tuple(DiskConfig(path) for path in options.pop("disks", ()))
config = MachineConfig(boot_code=bytes.fromhex("f4"), host_profile="none", disks=disks, **options)
Machine(config).close()
print("\\n".join(sorted(name for name in sys.modules if name.startswith("kvmlet.virtio"))))
"""


def virtio_modules_of(**options) -> set[str]:
    return set(run_fresh_python(CHILD, json.dumps(options)).stdout.split())


def test_the_default_machine_loads_virtio_rng_on_pci_only():
    modules = virtio_modules_of()
    assert {"kvmlet.virtio.rng", "kvmlet.virtio.pci"} <= modules
    assert not modules & {"kvmlet.virtio.blk", "kvmlet.virtio.console", "kvmlet.virtio.mmio"}


def test_configured_devices_and_transport_load_their_modules(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    modules = virtio_modules_of(
        disks=[str(disk)], console="virtio", virtio_transport="mmio", rng=False
    )
    assert {"kvmlet.virtio.blk", "kvmlet.virtio.console", "kvmlet.virtio.mmio"} <= modules
    assert not modules & {"kvmlet.virtio.rng", "kvmlet.virtio.pci"}
