"""Host profile detection, parameters, the guest page walk, instruction fix-ups (with a fake
vCPU holding real KVM structures) and init-death recognition. No KVM needed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.errors import KvmletError
from kvmlet.kvm import InternalErrorExit
from kvmlet.kvm.structs import KvmRegs, KvmSregs, KvmVcpuEvents
from kvmlet.memory import GuestMemory
from kvmlet.vstate import cpu
from kvmlet.vstate import host_profile as hp

EMULATION_FAILURE = InternalErrorExit(1, (0,))


def fake_host(tmp_path, *, pvm_module: bool, flags: str):
    sysfs = tmp_path / "sys"
    (sysfs / "module").mkdir(parents=True)
    if pvm_module:
        (sysfs / "module" / "kvm_pvm").mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    return str(sysfs), str(cpuinfo)


def test_software_kvm_is_detected(tmp_path):
    paths = fake_host(tmp_path, pvm_module=True, flags="fpu sse sse2 hypervisor")
    assert hp.detect(*paths) is hp.PVM
    assert hp.resolve("auto", *paths) is hp.PVM


@pytest.mark.parametrize(
    ("pvm_module", "flags"),
    [(False, "fpu hypervisor"), (True, "fpu vmx hypervisor"), (True, "fpu svm"), (False, "vmx")],
)
def test_hardware_kvm_or_no_pvm_module_gets_none(tmp_path, pvm_module, flags):
    paths = fake_host(tmp_path, pvm_module=pvm_module, flags=flags)
    assert hp.detect(*paths) is hp.NONE


def test_explicit_choice_wins_over_detection(tmp_path):
    paths = fake_host(tmp_path, pvm_module=True, flags="fpu")
    assert hp.resolve("none", *paths) is hp.NONE
    assert hp.resolve("pvm", *fake_host(tmp_path / "b", pvm_module=False, flags="vmx")) is hp.PVM


def test_unknown_choice_is_one_clear_error():
    with pytest.raises(KvmletError, match="unknown host profile 'fast'"):
        hp.resolve("fast")


def test_none_profile_changes_nothing():
    assert hp.NONE.cpuid_masks == ()
    assert hp.NONE.kernel_cmdline_additions() == ""
    assert hp.NONE.notice == ""
    assert hp.NONE.explain_console("Run /init as init process\nAttempted to kill init!") is None


def test_pvm_profile_masks_cmpxchg16b_and_adds_parameters():
    assert hp.PVM.cpuid_masks == (cpu.CpuidMask(1, "ecx", 1 << 13), cpu.HIDE_KVM_HYPERCALL_FEATURES)
    clearcpuid, clocksource = hp.PVM.kernel_cmdline_additions().split()
    assert clocksource == "clocksource=refined-jiffies"
    assert clearcpuid.startswith("clearcpuid=xsave,smap,popcnt,")
    cleared = clearcpuid.removeprefix("clearcpuid=")
    assert len(cleared) <= 127 and cleared.split(",") == list(hp.PVM_CLEARED_FEATURES)
    assert "\n" not in hp.PVM.notice and hp.PVM.notice


def test_clearcpuid_keeps_the_most_important_features_within_the_limit():
    assert hp.clearcpuid_parameter(["smap", "popcnt", "avx"], limit=11) == "clearcpuid=smap,popcnt"
    assert hp.clearcpuid_parameter(["toolongname"], limit=4) == ""


# -- page walk -------------------------------------------------------------------------------

PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000


def paged_memory() -> GuestMemory:
    """Page tables mapping 4 KiB page 0xFFFF_8000_0020_1000 -> 0x7000 and 2 MiB page
    0x40_0000 -> 0x60_0000, plus 1 GiB page 0x8000_0000 -> 0x4000_0000."""
    memory = GuestMemory.anonymous([(0, 0x80_0000)])
    memory.write_u64(PML4 + 0 * 8, PDPT | 3)
    memory.write_u64(PML4 + 256 * 8, PDPT | 3)
    memory.write_u64(PDPT + 0 * 8, PD | 3)
    memory.write_u64(PDPT + 2 * 8, 0x4000_0000 | 0x83)
    memory.write_u64(PD + 1 * 8, PT | 3)
    memory.write_u64(PD + 2 * 8, 0x60_0000 | 0x83)
    memory.write_u64(PT + 1 * 8, 0x7000 | 3)
    return memory


def test_walk_through_4k_2m_and_1g_pages():
    memory = paged_memory()
    assert hp.translate(memory, PML4, 0xFFFF_8000_0020_1234) == 0x7234
    assert hp.translate(memory, PML4, 0x0020_1FFF) == 0x7FFF
    assert hp.translate(memory, PML4, 0x0045_6789) == 0x65_6789
    assert hp.translate(memory, PML4, 0x8012_3456) == 0x4012_3456


def test_walk_stops_at_a_missing_entry_or_a_table_outside_ram():
    memory = paged_memory()
    assert hp.translate(memory, PML4, 0x0020_2000) is None  # PTE 2 not present
    assert hp.translate(memory, PML4, 0x4000_0000) is None  # PDPTE 1 not present
    memory.write_u64(PT + 3 * 8, 0x1_0000_0000_0000 | 3)
    assert hp.translate(memory, PML4, 0x0020_3000) == 0x1_0000_0000_0000  # leaf: no access
    memory.write_u64(PD + 3 * 8, 0xF_0000_0000 | 3)
    assert hp.translate(memory, PML4, 0x0060_0000) is None  # table beyond RAM


@given(st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4), st.integers(0, 2**64 - 1))
def test_walk_never_raises_on_hostile_tables(entries, linear):
    memory = GuestMemory.anonymous([(0, 0x10_000)])
    for level, (base, shift) in enumerate(((0x1000, 39), (0x2000, 30), (0x3000, 21), (0x4000, 12))):
        memory.write_u64(base + ((linear >> shift) & 0x1FF) * 8, entries[level])
    result = hp.translate(memory, 0x1000, linear)
    assert result is None or 0 <= result < 1 << 52


# -- instruction fix-ups ---------------------------------------------------------------------


class FakeVcpu:
    """The register/event surface `handle_emulation_failure` uses, with KVM's structures."""

    def __init__(self, rip: int, *, paging: bool, cpl: int = 0):
        self.regs = KvmRegs(rip=rip, rflags=2)
        self.sregs = KvmSregs()
        self.sregs.cs.selector = 0x10 | cpl
        if paging:
            self.sregs.cr0 = cpu.CR0_PE | cpu.CR0_PG
            self.sregs.cr4 = cpu.CR4_PAE
            self.sregs.efer = cpu.EFER_LME | cpu.EFER_LMA
            self.sregs.cr3 = PML4
        self.events = KvmVcpuEvents()
        self.events_set = False

    def get_regs(self):
        return KvmRegs.from_buffer_copy(self.regs)

    def set_regs(self, regs):
        self.regs = KvmRegs.from_buffer_copy(regs)

    def get_sregs(self):
        return KvmSregs.from_buffer_copy(self.sregs)

    def get_vcpu_events(self):
        return KvmVcpuEvents.from_buffer_copy(self.events)

    def set_vcpu_events(self, events):
        self.events = KvmVcpuEvents.from_buffer_copy(events)
        self.events_set = True


def test_int3_in_kernel_code_is_stepped_over_and_delivered_as_bp():
    memory = paged_memory()
    memory.write_u8(0x7234, hp.INT3)
    vcpu = FakeVcpu(0xFFFF_8000_0020_1234, paging=True)
    assert hp.PVM.handle_emulation_failure(vcpu, memory, EMULATION_FAILURE)
    assert vcpu.regs.rip == 0xFFFF_8000_0020_1235
    assert vcpu.events.exception.injected == 1
    assert vcpu.events.exception.nr == 3
    assert vcpu.events.exception.has_error_code == 0


def test_fwait_is_skipped_without_an_event():
    memory = paged_memory()
    memory.write_u8(0x500, hp.FWAIT)
    vcpu = FakeVcpu(0x500, paging=False)
    assert hp.PVM.handle_emulation_failure(vcpu, memory, EMULATION_FAILURE)
    assert vcpu.regs.rip == 0x501
    assert not vcpu.events_set


@pytest.mark.parametrize(
    ("profile", "opcode", "rip", "cpl", "failure"),
    [
        (hp.NONE, hp.INT3, 0x500, 0, EMULATION_FAILURE),  # profile none: nothing
        (hp.PVM, 0x0F, 0x500, 0, EMULATION_FAILURE),  # an unknown instruction
        (hp.PVM, hp.INT3, 0x500, 3, EMULATION_FAILURE),  # user code
        (hp.PVM, hp.INT3, 0x500, 0, InternalErrorExit(3, ())),  # not an emulation failure
        (hp.PVM, hp.INT3, 0x7F_FFFF_F000, 0, EMULATION_FAILURE),  # RIP outside RAM
    ],
)
def test_other_failures_are_left_alone(profile, opcode, rip, cpl, failure):
    memory = paged_memory()
    memory.write_u8(0x500, opcode)
    vcpu = FakeVcpu(rip, paging=False, cpl=cpl)
    assert not profile.handle_emulation_failure(vcpu, memory, failure)
    assert vcpu.regs.rip == rip
    assert not vcpu.events_set


def test_unmapped_rip_under_paging_is_left_alone():
    vcpu = FakeVcpu(0xFFFF_FFFF_8000_0000, paging=True)
    assert not hp.PVM.handle_emulation_failure(vcpu, paged_memory(), EMULATION_FAILURE)


# -- console recognition ---------------------------------------------------------------------

BOOT = (
    "[    0.912] Freeing unused kernel image memory: 800K\n[    0.913] Run /init as init process\n"
)


@pytest.mark.parametrize(
    "death",
    [
        "[    0.950] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n",
        "[    0.940] init[1]: segfault at 0 ip 0000000000401000 sp 00007ffd error 6\n",
        "[    0.940] traps: init[1] trap invalid opcode ip:401000 sp:7ffd error:0\n",
    ],
)
def test_init_death_after_run_init_is_recognised(death):
    line = hp.recognise_init_death(BOOT + death)
    assert line is not None and "/init" in line and "system call" in line and "\n" not in line
    assert hp.PVM.explain_console(BOOT + death) == line


# What `kvmlet sandbox` (kernel parameter `quiet`) showed on this host's software KVM: no
# "Run /init as init process", but pid 1's segfault and the panic, at the emergency level.
QUIET_DEATH = (
    "[    1.545171] ACPI BIOS Error (bug): A valid RSDP was not found (20220331/tbxfroot-210)\r\n"
    "[   25.727141] kvm: no hardware support for 'kvm_amd'\r\n"
    "[  170.014083] init[1]: segfault at ffffffff81400040 ip ffffffff81400040 sp "
    "00007ffe813dffe0 error 15 likely on CPU 0 (core 0, socket 0)\r\n"
    "[  170.199853] Code: Unable to access opcode bytes at 0xffffffff81400016.\r\n"
    "[  170.594838] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\r\n"
    "[  170.690730] Kernel Offset: disabled\r\n"
)


@pytest.mark.parametrize(
    ("console", "program"),
    [
        (QUIET_DEATH, "init"),
        ("traps: sh[1] trap invalid opcode ip:401000\nAttempted to kill init!\n", "sh"),
        ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004\n", "init"),
    ],
)
def test_init_death_is_recognised_when_quiet_hides_run_init(console, program):
    assert hp.recognise_init_death(console) == (
        f"{program} died at its first system call (host profile pvm)"
    )


def test_no_explanation_without_reaching_user_space_or_without_a_death():
    assert hp.recognise_init_death(BOOT) is None
    panic = "Kernel panic - not syncing: Attempted to kill init!\n"
    assert hp.recognise_init_death(panic + BOOT) is None  # the panic came before /init ran
    assert hp.recognise_init_death("Kernel panic - not syncing: VFS: Unable to mount root") is None
    assert hp.recognise_init_death("Kernel panic - not syncing: No working init found.") is None
    crash_before_exec = (
        "BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
        "CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0 #1\n" + panic
    )
    assert hp.recognise_init_death(crash_before_exec) is None


@given(st.text())
def test_recognition_never_raises(text):
    result = hp.recognise_init_death(text)
    assert result is None or "Run" not in result
