"""Multiboot test kernels of our own (C, built with gcc and ld) on the whole machine.

The guest prints through a polled COM1 what the multiboot information gave it (command line,
memory, memory map, modules), checks what a test kernel leans on (the in-kernel local APIC and
PIT, the PCI bus answering all-ones for absent devices) and exits through the debug-exit port
with the status its command line asks for. Both image kinds: ELF32 and the a.out kludge.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmlet.boot import BootModule
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.vstate.vcpu_loop import StopReason
from tests.helpers.multiboot_guest import DEBUG_EXIT_PORT, build_guest

pytestmark = pytest.mark.kvm

GUEST = r"""
#include "guest.h"

static void print_module(struct multiboot_module *module) {
    print("module: ");
    print((const char *)module->string);
    print(": ");
    for (uint32_t at = module->start; at < module->end && at < module->start + 64; at++) {
        char text[2] = {*(const char *)at, 0};
        print(text);
    }
    print("\n");
}

static uint32_t pit_count(void) {
    outb(0x43, 0x00); /* latch channel 0 */
    uint32_t low = inb(0x40);
    return low | (uint32_t)inb(0x40) << 8;
}

int guest_main(struct multiboot_info *info, const char *cmdline) {
    print("cmdline: ");
    print(cmdline);
    print("\nmem_lower=");
    print_dec(info->mem_lower);
    print(" mem_upper=");
    print_dec(info->mem_upper);
    print(" mmap entries=");
    print_dec(info->mmap_length / 24);
    print("\nloader: ");
    print((const char *)info->boot_loader_name);
    print("\n");
    struct multiboot_module *modules = (struct multiboot_module *)info->mods_addr;
    for (uint32_t index = 0; index < info->mods_count; index++) {
        print_module(&modules[index]);
    }
    print("lapic id=");
    print_dec(mmio_read32(0xFEE00020) >> 24);
    print(" version=");
    print_hex(mmio_read32(0xFEE00030) & 0xFF);
    outb(0x43, 0x34); /* channel 0, low then high byte, mode 2 */
    outb(0x40, 0xFF);
    outb(0x40, 0xFF);
    uint32_t first = pit_count(), later = first;
    for (int spin = 0; spin < 1000000 && later == first; spin++) {
        later = pit_count();
    }
    print(later != first ? "\npit: counting\n" : "\npit: stuck\n");
    uint32_t present = 0, absent = 0;
    for (uint32_t slot = 0; slot < 32; slot++) {
        outl(0xCF8, 0x80000000u | slot << 11);
        uint32_t id = inl(0xCFC);
        if (id == 0xFFFFFFFFu) {
            absent++;
            continue;
        }
        present++;
        print("pci 00:");
        print_dec(slot);
        print(".0 ");
        print_hex(id);
        print("\n");
    }
    print("pci: ");
    print_dec(present);
    print(" present, ");
    print_dec(absent);
    print(" absent\n");
    return (int)option(cmdline, "exit");
}
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multiboot")
    return {kind: build_guest(directory, GUEST, kind, name=kind) for kind in ("elf", "kludge")}


@pytest.mark.parametrize("kind", ["elf", "kludge"])
def test_multiboot_guest_sees_its_info_modules_lapic_pit_and_pci(kernels, tmp_path, kind):
    data = tmp_path / "data.txt"
    data.write_bytes(b"module payload")
    config = MachineConfig(
        kernel=kernels[kind],
        params="exit=21",
        modules=(BootModule(data, "arg=1"), BootModule(data)),
        debug_exit_port=DEBUG_EXIT_PORT,
        rng=False,
    )
    with Machine(config) as machine:
        stop = machine.wait(60)
    console = machine.console.text()
    assert stop.reason is StopReason.DEBUG_EXIT, console
    assert stop.exit_status == 43  # (21 << 1) | 1
    lines = console.splitlines()
    assert f"cmdline: {kernels[kind]} exit=21" in lines
    assert "mem_lower=639 mem_upper=261120 mmap entries=3" in lines
    assert "loader: kvmlet" in lines
    assert f"module: {data} arg=1: module payload" in lines
    assert f"module: {data}: module payload" in lines
    assert "lapic id=0 version=0x00000014" in lines
    assert "pit: counting" in lines
    assert "pci 00:0.0 0x12378086" in lines  # the host bridge
    assert "pci: 1 present, 31 absent" in lines


def test_the_command_line_runs_it_and_exits_with_the_guests_status(kernels, tmp_path):
    data = tmp_path / "m"
    data.write_bytes(b"x")
    result = subprocess.run(
        [
            sys.executable, "-m", "kvmlet", "run", "-k", str(kernels["elf"]), "-p", "exit=5",
            "--module", f"{data},hello", "--debug-exit", hex(DEBUG_EXIT_PORT), "--timeout", "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip
    assert result.returncode == 11, result.stderr
    assert f"module: {data} hello: x" in result.stdout
    assert "debug-exit port: 0x5, exit status 11" in result.stderr
    assert "pci: 2 present, 30 absent" in result.stdout  # the virtio-rng at 00:1.0 too
