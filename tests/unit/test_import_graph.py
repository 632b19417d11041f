"""What `kvmlet run -k KERNEL` imports before its first KVM_RUN (issue 4: set-up <= 60 ms).

Each case runs in a fresh `python3 -S` (no site: this sandbox's site imports pathlib and more
on its own) that goes down the CLI's own path: parse the arguments, check the kernel, build the
`MachineConfig` (`cli.run_config`) and import the machine. Not a timing test: it checks which
modules got loaded, which does not depend on the machine's load.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.fresh_python import run_fresh_python
from tests.unit.boot.synthetic_kernels import MiB, make_bzimage, make_elf, pvh_note

BOOT_ONLY_NEEDS_NONE_OF = (
    "kvmlet.guest",  # building the default guest: only without -k, or build-guest
    "kvmlet.sandbox",
    "kvmlet.virtio.blk",  # only with -d
    "kvmlet.virtio.blk_io",
    "kvmlet.virtio.console",  # only with --console virtio
    "kvmlet.virtio.mmio",  # only with --virtio-transport mmio
    "kvmlet.vhost",  # only with a vhost-user or kernel vhost device
    "kvmlet.boot.bzimage",  # only for a bzImage kernel (these cases boot an ELF)
    "hashlib",  # the guest build's cache keys
    "subprocess",
    "tempfile",
    "pathlib",  # paths stay str from argparse to open()
    "json",  # only for --stats
    "datetime",  # only when the guest sets its RTC
    "calendar",
    "shutil",  # argparse asks it for the terminal width unless the CLI passes the width
    "shlex",  # only for `kvmlet sandbox`
    "selectors",  # the console input thread polls with select.poll
    "logging",  # kvmlet.errors.LazyLogger imports it at the first message
)

CHILD = """
import sys
from kvmlet import cli
args = cli.build_parser().parse_args(sys.argv[1:])
cli.run_config(args)
import kvmlet.machine.machine
print("\\n".join(sorted(sys.modules)))
"""

DATACLASSES_CHILD = """
import dataclasses, inspect, sys
from kvmlet import cli
cli.run_config(cli.build_parser().parse_args(sys.argv[1:]))
import kvmlet.machine.machine
for name, module in list(sys.modules.items()):
    if name.startswith("kvmlet"):
        for _, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__ == name and dataclasses.is_dataclass(value):
                print(value.__qualname__)
"""

PUBLIC_DATACLASSES = {"MachineConfig", "DiskConfig"}
"""Users derive configurations with dataclasses.replace: these stay dataclasses."""


def modules_after(tmp_path: Path, *arguments: str, child: str = CHILD) -> set[str]:
    """sys.modules of a fresh interpreter after the CLI built its run configuration (or the
    lines another `child` script prints)."""
    kernel = tmp_path / "vmlinux"
    segments = [(16 * MiB, 0xFFFF_FFFF_8100_0000, b"\x90" * 64, 4096)]
    kernel.write_bytes(make_elf(segments, entry=16 * MiB, notes=pvh_note(16 * MiB)))
    argv = ["run", "-k", str(kernel), "--host-profile", "none", *arguments]
    return set(run_fresh_python(child, *argv).stdout.split())


def loaded(modules: set[str], name: str) -> bool:
    return any(module == name or module.startswith(name + ".") for module in modules)


def test_a_boot_with_a_kernel_imports_only_what_it_needs(tmp_path):
    modules = modules_after(tmp_path)
    assert "kvmlet.machine.machine" in modules
    assert "kvmlet.cli" in modules
    unwanted = [name for name in BOOT_ONLY_NEEDS_NONE_OF if loaded(modules, name)]
    assert unwanted == []


def test_a_bzimage_brings_in_its_loader(tmp_path):
    """The same check sees a module when the configuration does need it (the last -k wins)."""
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(make_bzimage())
    modules = modules_after(tmp_path, "-k", str(bzimage))
    assert "kvmlet.boot.bzimage" in modules
    assert not loaded(modules, "kvmlet.guest")


def test_a_disk_option_does_not_bring_in_the_block_stack_before_the_machine(tmp_path):
    """A disk is configured with `virtio/blk_config.py`; the device comes with the machine."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    modules = modules_after(tmp_path, "-d", str(disk))
    assert "kvmlet.virtio.blk_config" in modules
    assert not loaded(modules, "kvmlet.virtio.blk")


def test_a_boot_builds_no_dataclass_but_the_public_configurations(tmp_path):
    """Building a dataclass execs generated code (~0.4 ms each at import): internal records
    are NamedTuples or slotted classes."""
    made = modules_after(tmp_path, child=DATACLASSES_CHILD)
    assert made >= PUBLIC_DATACLASSES
    assert made == PUBLIC_DATACLASSES


def test_the_bus_imports_logging_only_when_it_logs():
    script = (
        "import sys, kvmlet.bus, kvmlet.kvm\n"
        "assert 'logging' not in sys.modules, 'imported at start'\n"
        "from kvmlet.bus import AddressSpace, IoRegion\n"
        "class Broken:\n"
        "    def read(self, offset, size): raise RuntimeError('device bug')\n"
        "    def write(self, offset, size, value): raise RuntimeError('device bug')\n"
        "space = AddressSpace('io', 0x100)\n"
        "space.root.add_subregion(0x10, IoRegion('broken', 4, Broken()))\n"
        "assert space.read(0x10, 4) == 0xFFFF_FFFF\n"
        "assert 'logging' in sys.modules\n"
    )
    result = run_fresh_python(script)
    assert "broken" in result.stderr and "device bug" in result.stderr
