"""Exit cost benchmark: port and MMIO writes through kvmlet's whole path against a C KVM_RUN loop.

A real-mode guest writes a byte to a port (`out dx, al` in a `loop`, as a UART driver does) or
four bytes to an MMIO register (`mov [0], eax`, as virtio drivers do) N times between two
writes to a marker port. The marker's handler takes a CLOCK_MONOTONIC time stamp; the
interval covers the N exits and the closing marker's exit, so
`ns_per_exit = interval / (N + 1)`. The guest's own instructions (the `loop`, emulated on a
software KVM) are in the interval of every case alike.

Cases, interleaved in each round (medians over rounds: shared machines are noisy):

- `c_port`, `c_mmio`: the reference, a C program (built here with gcc) that sets up its own VM
  with the same guest code and runs the same KVM_RUN loop; its device stores the value.
- `kvmlet_port`, `kvmlet_mmio`: a `Machine` running the guest on its vCPU thread: the run loop,
  the bus (each flat table padded to 1,536 ranges with dummy regions) and a trivial device
  behind the default per-region lock; the MMIO device sits over RAM below 1 MiB at priority 1.
- `kvmlet_vcpu_only_port`, `kvmlet_vcpu_only_mmio`: `Vcpu.run()` (KVM_RUN and the exit decode)
  in a bare Python loop with no run loop and no bus: what the Python KVM layer alone costs.
- `c_loop_on_kvmlet_vm_*`: the reference's C loop (the same source, built as a library and
  called through ctypes) driving the vCPU of a kvmlet `Machine`: what kvmlet's VM set-up
  (memory slots, CPUID, MSRs, LAPIC) costs per exit, with no Python in the loop.
- `kvmlet_python_only_*`: the whole kvmlet path with KVM_RUN replaced by a Python no-op.
- `kvmlet_recorded_port`, `kvmlet_recorded_mmio`: `kvmlet_*` with `--record` (every exit
  written to a record file): what recording costs per exit.

    python3 benchmarks/exit_cost.py [--exits N] [--rounds R]

Prints JSON lines with `case`, `ns_per_exit` (median), `ratio_to_c` (to the C loop of the same
kind, median of the per-round ratios) and the per-round figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvmlet.kvm.vcpu
from kvmlet.bus import AccessSizes, IoRegion
from kvmlet.kvm import IoExit, MmioExit
from kvmlet.kvm.exits import (
    EXIT_REASON_OFFSET,
    EXIT_UNION_OFFSET,
    IO_LAYOUT,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    MMIO_LAYOUT,
)
from kvmlet.machine.config import BOOT_CODE_ADDRESS, MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.vstate import host_profile
from kvmlet.vstate.vcpu_loop import StopReason, run_vcpu

DEVICE_PORT = 0x510
MARKER_PORT = 0x520
RESET_PORT = 0x64
MMIO_DEVICE_ADDRESS = 0xD0000
PADDED_RANGES = 1536
PADDING_MMIO_BASE = 0xC000_0000
PADDING_PORT_BASE = 0x2000
TARGET_RATIO = 1.15
WARMUP_EXITS = 1000
"""Device writes before the first marker: the vCPU thread and caches settle, not timed."""
PIO_DATA = 4096
"""Where KVM puts port I/O data in the run page (KVM_PIO_PAGE_OFFSET, one page in)."""

_MARK = bytes.fromhex("ba2005 ee")  # mov dx, MARKER_PORT ; out dx, al
_RESET = bytes.fromhex("b0fe e664 f4")  # mov al, 0xfe ; out 0x64, al ; hlt


def port_guest(exits: int) -> bytes:
    """The port loop (mov dx, DEVICE_PORT; mov cx, N; L: out dx, al; loop L), warm-up first."""

    def loop(count: int) -> bytes:
        return bytes.fromhex("ba1005 b9") + count.to_bytes(2, "little") + bytes.fromhex("ee e2fd")

    return loop(WARMUP_EXITS) + _MARK + loop(exits) + _MARK + _RESET


def mmio_guest(exits: int) -> bytes:
    """ds = 0xd000, then the MMIO loop (mov cx, N; L: mov [0], eax; loop L), warm-up first."""

    def loop(count: int) -> bytes:
        return bytes([0xB9]) + count.to_bytes(2, "little") + bytes.fromhex("66a30000 e2fa")

    segment = bytes.fromhex("b800d0 8ed8")
    return segment + loop(WARMUP_EXITS) + _MARK + loop(exits) + _MARK + _RESET


C_SOURCE = r"""
/* The reference: the same guest, the same KVM_RUN loop, in C. Prints "interval_ns writes". */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE 0xd0000 /* RAM stops where the MMIO device starts */

static void __attribute__((unused)) check(long result, const char *what) {
    if (result < 0) { perror(what); exit(1); }
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The KVM_RUN loop: returns the marker-to-marker interval in ns, or -1. */
long long run_loop(int vcpu, struct kvm_run *run, unsigned long *writes_out) {
    uint64_t marks[2] = {0, 0};
    int marks_seen = 0;
    unsigned long writes = 0;
    volatile uint64_t device_register __attribute__((unused)) = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            perror("KVM_RUN");
            return -1;
        }
        if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT) {
            uint8_t value = *((uint8_t *)run + run->io.data_offset);
            if (run->io.port == MARKER_PORT) {
                if (marks_seen < 2) marks[marks_seen++] = now_ns();
            } else if (run->io.port == RESET_PORT) {
                break;
            } else if (run->io.port == DEVICE_PORT) {
                device_register = value;
                writes++;
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO && run->mmio.is_write) {
            uint64_t value = 0;
            memcpy(&value, run->mmio.data, run->mmio.len <= 8 ? run->mmio.len : 8);
            device_register = value;
            writes++;
        } else {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return -1;
        }
    }
    *writes_out = writes;
    return (long long)(marks[1] - marks[0]);
}

#ifndef LIBRARY
int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s GUEST_CODE_FILE\n", argv[0]); return 2; }
    static uint8_t code[4096];
    FILE *file = fopen(argv[1], "rb");
    if (!file) { perror(argv[1]); return 1; }
    size_t code_size = fread(code, 1, sizeof code, file);
    fclose(file);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    check(kvm, "/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    check(vm, "KVM_CREATE_VM");
    uint64_t identity_map = 0xfffbc000; /* as kvmlet's Vm.setup_x86_platform */
    check(ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity_map), "KVM_SET_IDENTITY_MAP_ADDR");
    check(ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul), "KVM_SET_TSS_ADDR");
    check(ioctl(vm, KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    check(ioctl(vm, KVM_CREATE_PIT2, &pit), "KVM_CREATE_PIT2");

    uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED) { perror("mmap"); return 1; }
    memcpy(ram + CODE_ADDRESS, code, code_size);
    struct kvm_userspace_memory_region slot = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE,
        .userspace_addr = (uintptr_t)ram};
    check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot), "KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    check(vcpu, "KVM_CREATE_VCPU");
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + 256 * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = 256;
    check(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid), "KVM_GET_SUPPORTED_CPUID");
    check(ioctl(vcpu, KVM_SET_CPUID2, cpuid), "KVM_SET_CPUID2");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    check(run_size, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) { perror("mmap kvm_run"); return 1; }
    struct kvm_sregs sregs;
    check(ioctl(vcpu, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS");
    sregs.cs.selector = CODE_ADDRESS >> 4;
    sregs.cs.base = CODE_ADDRESS;
    check(ioctl(vcpu, KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0, .rflags = 2};
    check(ioctl(vcpu, KVM_SET_REGS, &regs), "KVM_SET_REGS");

    unsigned long writes = 0;
    long long interval = run_loop(vcpu, run, &writes);
    if (interval < 0) return 1;
    printf("%lld %lu\n", interval, writes);
    return 0;
}
#endif
"""


def build_reference(directory: Path) -> tuple[Path, Path]:
    """The C program, and its loop alone as a shared library (`run_loop`)."""
    source = directory / "exit_loop.c"
    source.write_text(C_SOURCE)
    binary, library = directory / "exit_loop", directory / "libexit_loop.so"
    defines = [
        f"-DCODE_ADDRESS={BOOT_CODE_ADDRESS:#x}",
        f"-DDEVICE_PORT={DEVICE_PORT:#x}",
        f"-DMARKER_PORT={MARKER_PORT:#x}",
        f"-DRESET_PORT={RESET_PORT:#x}",
    ]
    compile_c = ["gcc", "-O2", "-Wall", "-Werror", *defines]
    subprocess.run([*compile_c, "-o", binary, source], check=True)
    subprocess.run([*compile_c, "-DLIBRARY", "-shared", "-fPIC", "-o", library, source], check=True)
    return binary, library


def check_writes(who: str, writes: int, exits: int) -> None:
    """A run counts only if the device saw every write of the guest (warm-up included)."""
    if writes != exits + WARMUP_EXITS:
        raise RuntimeError(f"{who} saw {writes} device writes, expected {exits + WARMUP_EXITS}")


def run_reference(binary: Path, code_file: Path, exits: int) -> float:
    result = subprocess.run([binary, code_file], check=True, capture_output=True, text=True)
    interval, writes = map(int, result.stdout.split())
    check_writes("the C reference", writes, exits)
    return interval / (exits + 1)


class Register:
    """The trivial device: one register that keeps the last value written."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value


class Marker:
    """Time stamps of the guest's writes to the marker port."""

    def __init__(self) -> None:
        self.stamps: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.stamps.append(time.monotonic_ns())


def pad(space, base: int, stride: int, ranges: int) -> None:
    """Add dummy regions at `base` until the space's flat table has `ranges` ranges."""
    index = 0
    with space.transaction():
        while len(space.view.starts) + 2 * index < ranges:
            region = IoRegion(f"pad{index}", stride, Register(), impl=AccessSizes(1, 4))
            space.root.add_subregion(base + index * stride * 2, region)
            index += 1


def build_machine(
    code: bytes, record: Path | None = None
) -> tuple[Machine, Register, Register, Marker]:
    """A stopped Machine with the benchmark devices placed and both flat tables padded
    (recording every access to `record` if given)."""
    config = MachineConfig(boot_code=code, rng=False, host_profile="none", record=record)
    machine = Machine(config)
    port_device, mmio_device, marker = Register(), Register(), Marker()
    byte = AccessSizes(1, 1)
    with machine.io.transaction():
        machine.io.root.add_subregion(DEVICE_PORT, IoRegion("bench", 1, port_device, impl=byte))
        machine.io.root.add_subregion(MARKER_PORT, IoRegion("marker", 1, marker, impl=byte))
        region = IoRegion("bench-mmio", 0x1000, mmio_device, impl=AccessSizes(1, 4))
        machine.mmio.root.add_subregion(MMIO_DEVICE_ADDRESS, region, priority=1)
    pad(machine.io, PADDING_PORT_BASE, 4, PADDED_RANGES)
    pad(machine.mmio, PADDING_MMIO_BASE, 0x1000, PADDED_RANGES)
    for space in (machine.io, machine.mmio):
        if len(space.view.starts) < PADDED_RANGES:
            raise RuntimeError(f"{space.name}: padding left {len(space.view.starts)} ranges")
    return machine, port_device, mmio_device, marker


def run_kvmlet(code: bytes, exits: int, record: Path | None = None) -> float:
    machine, _, _, marker = build_machine(code, record)
    try:
        machine.start()
        stop = machine.wait(60)
        if stop.reason is not StopReason.RESET:
            raise RuntimeError(f"benchmark guest stopped with {stop}")
        device_writes = sum(
            machine.stats()[space]["regions"].get(name, {}).get("writes", 0)
            for space, name in (("port_io", "bench"), ("mmio", "bench-mmio"))
        )
    finally:
        machine.close()
    check_writes("kvmlet", device_writes, exits)
    return (marker.stamps[1] - marker.stamps[0]) / (exits + 1)


def run_c_loop_on_kvmlet_vm(library: ctypes.CDLL, code: bytes, exits: int) -> float:
    """The C loop driving the vCPU of a kvmlet `Machine`: what kvmlet's VM set-up costs."""
    machine, _, _, _ = build_machine(code)
    vcpu = machine.vcpus[0]
    run_page = ctypes.c_char.from_buffer(vcpu.run_page)
    writes = ctypes.c_ulong()
    try:
        interval = library.run_loop(vcpu.fd, ctypes.addressof(run_page), ctypes.byref(writes))
    finally:
        del run_page  # the exported buffer must go before the run page is unmapped
        machine.close()
    if interval < 0:
        raise RuntimeError("the C loop on kvmlet's vCPU failed (see stderr)")
    check_writes("the C loop on kvmlet's VM", writes.value, exits)
    return interval / (exits + 1)


def load_loop_library(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.run_loop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
    library.run_loop.restype = ctypes.c_longlong
    return library


def run_vcpu_only(code: bytes, exits: int) -> float:
    """KVM_RUN and the exit decode of `Vcpu.run()` in a bare loop: no run loop, no bus."""
    machine, _, _, _ = build_machine(code)
    try:
        run = machine.vcpus[0].run
        stamps = []
        writes = 0
        while True:
            exit_ = run()
            kind = type(exit_)
            if kind is IoExit:
                if exit_.port == MARKER_PORT:
                    stamps.append(time.monotonic_ns())
                elif exit_.port == RESET_PORT:
                    break
                else:
                    writes += 1
            elif kind is MmioExit:
                writes += 1
            else:
                raise RuntimeError(f"unexpected exit {exit_!r}")
    finally:
        machine.close()
    check_writes("the vCPU-only loop", writes, exits)
    return (stamps[1] - stamps[0]) / (exits + 1)


def run_python_only(kind: str, exits: int) -> float:
    """The whole kvmlet path (run loop, `Vcpu.run()` decode, bus, device) with KVM_RUN replaced
    by a Python no-op over a run page that holds the exit: the Python work per exit alone, with
    warm caches (after a real KVM_RUN they are colder)."""
    machine, _, _, _ = build_machine(bytes.fromhex("f4"))  # the guest never runs
    vcpu = machine.vcpus[0]
    page = vcpu.run_page
    if kind == "port":
        struct.pack_into("<I", page, EXIT_REASON_OFFSET, KVM_EXIT_IO)
        IO_LAYOUT.pack_into(page, EXIT_UNION_OFFSET, KVM_EXIT_IO_OUT, 1, DEVICE_PORT, 1, PIO_DATA)
    else:
        struct.pack_into("<I", page, EXIT_REASON_OFFSET, KVM_EXIT_MMIO)
        MMIO_LAYOUT.pack_into(page, EXIT_UNION_OFFSET, MMIO_DEVICE_ADDRESS, 4, 1)
    remaining = exits + 1

    def no_kvm_run(fd: int, request: int) -> int:
        """N device exits, then the i8042 reset, then EINTR (the run loop checks for a stop)."""
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            struct.pack_into("<I", page, EXIT_REASON_OFFSET, KVM_EXIT_IO)
            IO_LAYOUT.pack_into(
                page, EXIT_UNION_OFFSET, KVM_EXIT_IO_OUT, 1, RESET_PORT, 1, PIO_DATA
            )
            page[PIO_DATA] = 0xFE
        elif remaining < 0:
            raise InterruptedError
        return 0

    try:
        with mock.patch.object(kvmlet.kvm.vcpu, "run_ioctl", no_kvm_run):
            start = time.monotonic_ns()
            run_vcpu(vcpu, machine.io, machine.mmio, lambda: machine.stop_reason is not None)
            elapsed = time.monotonic_ns() - start
        stop = machine.stop_reason
        device_writes = sum(
            machine.stats()[space]["regions"].get(name, {}).get("writes", 0)
            for space, name in (("port_io", "bench"), ("mmio", "bench-mmio"))
        )
    finally:
        machine.close()
    if stop is None or stop.reason is not StopReason.RESET or device_writes != exits:
        raise RuntimeError(f"Python-only run saw {device_writes} device writes and {stop}")
    return elapsed / (exits + 1)


def environment() -> dict[str, object]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "case": "environment",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "host_profile": host_profile.detect().name,
        "load_average": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=20000, help="exits per case (1-65535)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    options = parser.parse_args()
    if not 1 <= options.exits <= 0xFFFF:
        parser.error("--exits must be between 1 and 65535 (the guest counts in CX)")
    exits = options.exits
    guests = {"port": port_guest(exits), "mmio": mmio_guest(exits)}
    print(json.dumps(environment()), flush=True)
    figures: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmlet-exit-cost-") as temporary:
        directory = Path(temporary)
        binary, library_path = build_reference(directory)
        library = load_loop_library(library_path)
        for kind, code in guests.items():
            (directory / f"{kind}.bin").write_bytes(code)
        for round_index in range(options.rounds):
            for kind, code in guests.items():
                code_file = directory / f"{kind}.bin"
                measurements = {
                    "c": partial(run_reference, binary, code_file, exits),
                    "c_loop_on_kvmlet_vm": partial(run_c_loop_on_kvmlet_vm, library, code, exits),
                    "kvmlet": partial(run_kvmlet, code, exits),
                    "kvmlet_recorded": partial(run_kvmlet, code, exits, directory / "run.rec"),
                    "kvmlet_vcpu_only": partial(run_vcpu_only, code, exits),
                    "kvmlet_python_only": partial(run_python_only, kind, exits),
                }
                # Rotate the order inside each kind so no case always runs first.
                names = list(measurements)
                shift = round_index % len(names)
                results = {name: measurements[name]() for name in names[shift:] + names[:shift]}
                for name, value in results.items():
                    case = f"{name}_{kind}"
                    figures.setdefault(case, []).append(value)
                    ratios.setdefault(case, []).append(value / results["c"])
    for case, values in figures.items():
        line = {
            "case": case,
            "ns_per_exit": round(statistics.median(values), 1),
            "ratio_to_c": round(statistics.median(ratios[case]), 3),
            "exits": exits,
            "rounds": [round(value, 1) for value in values],
        }
        if case in ("kvmlet_port", "kvmlet_mmio"):
            line["ranges_per_flat_table"] = PADDED_RANGES
            line["target_ratio"] = TARGET_RATIO
            line["meets_target"] = line["ratio_to_c"] <= TARGET_RATIO
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
