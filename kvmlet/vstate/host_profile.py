"""Host profiles: the one named place for workarounds that belong to a host, not to kvmlet.

Our development machines run a nested, software "PVM" KVM (docs/hosts.md): it executes
guest kernel code in an instruction emulator that refuses a few instructions, and guest user
space cannot make system calls. Profile `pvm` carries everything that keeps a Linux guest
booting there (CPUID masks it honours, kernel parameters, fix-ups of refused instructions, and
recognising init's death at its first system call); profile `none` changes nothing and is what
hardware KVM gets. `--host-profile auto` picks `pvm` only when the host is detected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvmlet.boot.x86_64 import PAGE_LARGE, PAGE_PRESENT
from kvmlet.errors import GuestMemoryError, KvmletError
from kvmlet.kvm import InternalErrorExit, Vcpu
from kvmlet.memory import GuestMemory
from kvmlet.vstate.cpu import (
    CPUID_FEATURES,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    HIDE_KVM_HYPERCALL_FEATURES,
    CpuidMask,
)

CHOICES = ("auto", "none", "pvm")

CPUID1_ECX_CMPXCHG16B = 1 << 13
CR4_LA57 = 1 << 12

CLEARCPUID_LIMIT = 127
"""The kernel reads at most this many characters of `clearcpuid=` and drops the rest."""

PVM_CLEARED_FEATURES = (
    "xsave",
    "smap",
    "popcnt",
    "sse4_2",
    "sse4_1",
    "ssse3",
    "f16c",
    "movbe",
    "bmi1",
    "bmi2",
    "aes",
    "pclmulqdq",
    "sha_ni",
    "adx",
    "rdseed",
)
"""Features whose instructions the emulator refuses, most important first (what the guest
kernel uses earliest and unconditionally comes first: XRSTOR, CLAC/STAC, POPCNT, then SSE4).

The kernel clears along with a feature every feature that depends on it
(arch/x86/kernel/cpu/cpuid-deps.c): `xsave` takes xsaveopt, xsaves, avx and with avx avx2,
fma and avx512f, so they need no room of their own in the 127 characters. `clearcpuid=xsave`
does what `noxsave` does (both end in setup_clear_cpu_cap(X86_FEATURE_XSAVE) in
cpu_parse_early_param), but Linux 6.1 reads `noxsave` with cmdline_find_option_bool and
registers no parameter for it, so it listed `noxsave` as unknown and passed it on to init.
Masking XSAVE in CPUID instead is not honoured by this KVM."""

PVM_CLOCKSOURCE = "clocksource=refined-jiffies"
"""Guest timekeeping from its own tick instead of kvm-clock or the TSC.

A kernel with a periodic tick and no high-resolution timers (HZ_PERIODIC without
HIGH_RES_TIMERS, as tinyconfig leaves it) runs that tick on the local APIC's TSC-deadline
timer, which has no periodic mode: tick_handle_periodic (kernel/time/tick-common.c) programs
each next tick itself and, once the clocksource is valid for high resolution (kvm-clock, tsc),
first runs every tick it missed. Under this host's instruction emulator one tick costs about a
tick period, so from `clocksource: Switched to clocksource kvm-clock` on the guest did little
but catch up ticks, longer the busier the host (a boot that seemed to stall there, with either
entry, ELF/PVH or bzImage). A jiffies clocksource is not valid for high resolution: the loop
then drops missed ticks. Kernels with high-resolution timers (the default guest) pay for their
ticks too, in hrtimer interrupts, and also boot faster. The cost: guest time advances by the
ticks the guest got, so it lags the host's clock, and high-resolution timers stay off;
docs/hosts.md has the measurements."""

INT3 = 0xCC
FWAIT = 0x9B
BP_VECTOR = 3

_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000


def clearcpuid_parameter(features: Sequence[str], limit: int = CLEARCPUID_LIMIT) -> str:
    """`clearcpuid=a,b,...` with as many leading features as fit the kernel's limit."""
    value = ""
    for feature in features:
        candidate = f"{value},{feature}" if value else feature
        if len(candidate) > limit:
            break
        value = candidate
    return f"clearcpuid={value}" if value else ""


def translate(memory: GuestMemory, cr3: int, linear: int) -> int | None:
    """Guest-physical address of `linear` through 4-level page tables at `cr3`, or None
    when it is not mapped or a table lies outside guest RAM (the tables are guest data)."""
    table = cr3 & _ADDRESS_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        try:
            entry = memory.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
        except GuestMemoryError:
            return None
        if not entry & PAGE_PRESENT:
            return None
        if level in (3, 2) and entry & PAGE_LARGE:  # PS: a 1 GiB or 2 MiB page
            page_mask = (1 << shift) - 1
            return (entry & _ADDRESS_MASK & ~page_mask) | (linear & page_mask)
        table = entry & _ADDRESS_MASK
    return table | (linear & 0xFFF)


def instruction_address(vcpu: Vcpu, memory: GuestMemory) -> int | None:
    """Guest-physical address of the vCPU's next instruction, None when it cannot be told."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    linear = (sregs.cs.base + regs.rip) & 0xFFFF_FFFF_FFFF_FFFF
    if not sregs.cr0 & CR0_PG:
        return linear
    if sregs.cr4 & CR4_LA57 or not (sregs.cr4 & CR4_PAE and sregs.efer & EFER_LMA):
        return None  # 5-level or 32-bit paging: never met on this host's guests
    return translate(memory, sregs.cr3, linear)


def _skip_instruction(vcpu: Vcpu, length: int) -> None:
    regs = vcpu.get_regs()
    regs.rip += length
    vcpu.set_regs(regs)


def _inject_breakpoint(vcpu: Vcpu) -> None:
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = BP_VECTOR
    events.exception.has_error_code = 0
    events.exception.error_code = 0
    events.flags = 0
    vcpu.set_vcpu_events(events)


# Patterns, compiled (and cached by `re`) the first time a guest stops, not at every import.
_RUN_INIT = r"Run (\S+) as init process"
_INIT_DEATH = (
    r"Attempted to kill init"
    r"|\btraps: \S+\[1\]"
    r"|\S+\[1\]: segfault at"
    r"|invalid opcode.*\n(?:.*\n){0,3}.*\bComm: \S+"
)
_PID1_PROGRAM = r"\btraps: (\S+)\[1\]|(\S+)\[1\]: segfault at"
_PID1_CRASHED_BEFORE_EXEC = r"\bPID: 1 Comm: swapper"


def recognise_init_death(console_text: str) -> str | None:
    """One line explaining that the guest reached user space and its init died at once,
    or None when the console shows no such thing (pure: the machine adds the timing).

    With `quiet` (the sandbox adds it) the kernel hides `Run /init as init process`, but not
    how pid 1 ended: the panic `Attempted to kill init!` and a segfault of pid 1 are printed
    at the emergency level. Pid 1 dies before running any program only in a kernel crash,
    whose report names it `swapper`; any other death of pid 1 is its program's, and on this
    host a program cannot even exit without a system call."""
    death = re.compile(_INIT_DEATH)
    started = re.search(_RUN_INIT, console_text)
    if started is not None:
        if death.search(console_text, started.end()) is None:
            return None
        program = started.group(1)
    else:
        if death.search(console_text) is None or re.search(_PID1_CRASHED_BEFORE_EXEC, console_text):
            return None
        named = re.search(_PID1_PROGRAM, console_text)
        program = next((name for name in named.groups() if name), "init") if named else "init"
    return f"{program} died at its first system call (host profile pvm)"


class HostProfile(NamedTuple):
    """A named set of host workarounds; `NONE` is the identity."""

    name: str
    notice: str = ""
    cpuid_masks: tuple[CpuidMask, ...] = ()
    kernel_parameters: tuple[str, ...] = ()
    fixes_emulation_failures: bool = False
    console_explainer: Callable[[str], str | None] | None = None

    def kernel_cmdline_additions(self) -> str:
        """Kernel parameters to append to the command line ("" for none)."""
        return " ".join(self.kernel_parameters)

    def handle_emulation_failure(
        self, vcpu: Vcpu, memory: GuestMemory, exit: InternalErrorExit
    ) -> bool:
        """Fix a known instruction the host refused; True when the vCPU may run on."""
        if not self.fixes_emulation_failures or not exit.is_emulation_failure:
            return False
        if vcpu.get_sregs().cs.selector & 3:
            return False  # only kernel code meets the emulator
        address = instruction_address(vcpu, memory)
        if address is None:
            return False
        try:
            opcode = memory.read_u8(address)
        except GuestMemoryError:
            return False
        if opcode == INT3:
            _skip_instruction(vcpu, 1)
            _inject_breakpoint(vcpu)
            return True
        if opcode == FWAIT:
            _skip_instruction(vcpu, 1)
            return True
        return False

    def explain_console(self, console_text: str) -> str | None:
        """A one-line explanation of how the guest ended, when this host accounts for it."""
        return None if self.console_explainer is None else self.console_explainer(console_text)


NONE = HostProfile("none")

PVM = HostProfile(
    name="pvm",
    notice=(
        "kvmlet: host profile pvm (software KVM): masking CMPXCHG16B and KVM hypercalls, adding "
        "clearcpuid=xsave,... and clocksource=refined-jiffies, fixing up INT3/FWAIT the emulator "
        "refuses"
    ),
    # A hypercall from guest kernel code never returns here: PV IPIs hung SMP boot.
    cpuid_masks=(
        CpuidMask(CPUID_FEATURES, "ecx", CPUID1_ECX_CMPXCHG16B),
        HIDE_KVM_HYPERCALL_FEATURES,
    ),
    kernel_parameters=(clearcpuid_parameter(PVM_CLEARED_FEATURES), PVM_CLOCKSOURCE),
    fixes_emulation_failures=True,
    console_explainer=recognise_init_death,
)

PROFILES = {profile.name: profile for profile in (NONE, PVM)}


def is_software_kvm(sysfs: str = "/sys", cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on a host whose KVM is the nested PVM module with no hardware virtualisation."""
    if not os.path.isdir(os.path.join(sysfs, "module", "kvm_pvm")):
        return False
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[-1].split()
                    if "vmx" in flags or "svm" in flags:
                        return False
    except OSError:
        return True
    return True


def detect(sysfs: str = "/sys", cpuinfo: str = "/proc/cpuinfo") -> HostProfile:
    """The profile this host needs: `pvm` on the software KVM, else `none`."""
    return PVM if is_software_kvm(sysfs, cpuinfo) else NONE


def resolve(choice: str, sysfs: str = "/sys", cpuinfo: str = "/proc/cpuinfo") -> HostProfile:
    """The profile for `--host-profile CHOICE` (auto, none or pvm)."""
    if choice == "auto":
        return detect(sysfs, cpuinfo)
    if choice in PROFILES:
        return PROFILES[choice]
    raise KvmletError(f"unknown host profile {choice!r}: choose one of {', '.join(CHOICES)}")
