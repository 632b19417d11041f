"""A machine: KVM, guest RAM, the bus and its devices, a loaded kernel and vCPU threads.

`Machine` is kvmlet's public Python API as much as the CLI's engine:

    with Machine(MachineConfig(kernel=Path("bzImage"), memory=512 << 20)) as machine:
        machine.console.wait_for("login:", timeout=30)
        machine.console.write("root\\n")
        stop = machine.wait(timeout=60)      # a GuestStop: how the guest ended

Construction builds everything and loads the kernel (a user mistake raises KvmletError before any
thread starts); `start()` launches one thread per vCPU; the first vCPU that sees the guest stop
(i8042 reset, triple fault, emulation failure...) records a `GuestStop` and kicks the others out
of KVM_RUN with a signal.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import threading
import time

from kvmlet.boot import load_kernel
from kvmlet.boot.memory_map import MemoryMap
from kvmlet.bus import RamRegion, mmio_space, port_io_space
from kvmlet.bus.pci import PciHostBridge
from kvmlet.errors import KvmletError
from kvmlet.host.console import Console
from kvmlet.host.report import format_stats, trace_printer
from kvmlet.host.terminal import EscapeAction, EscapeFilter
from kvmlet.kvm import InternalErrorExit, Kvm, Vcpu
from kvmlet.machine.config import BOOT_CODE_ADDRESS, MachineConfig
from kvmlet.machine.legacy import attach_legacy_devices
from kvmlet.machine.virtio_devices import VirtioDevices
from kvmlet.memory import GuestMemory
from kvmlet.vstate import host_profile
from kvmlet.vstate.bus_listener import KvmBusListener
from kvmlet.vstate.cpu import (
    apply_boot_state,
    configure_vcpu,
    start_real_mode,
    supported_cpuid,
)
from kvmlet.vstate.diagnostics import describe_vcpu
from kvmlet.vstate.interrupts import KvmIrqLine
from kvmlet.vstate.vcpu_loop import GuestStop, StopReason, run_vcpu

KICK_SIGNAL = signal.SIGRTMIN + 4
"""Sent to a vCPU thread to make KVM_RUN return (its handler does nothing)."""
KICK_INTERVAL = 0.05
"""Seconds between kicks while waiting for vCPU threads to stop."""


def _install_kick_handler() -> None:
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise KvmletError("create the first kvmlet Machine from the main thread (signal setup)")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class Machine:
    """One virtual machine built from a `MachineConfig`; see the module docstring."""

    def __init__(
        self,
        config: MachineConfig,
        *,
        console_echo_fd: int | None = None,
        console_input_fd: int | None = None,
        escape: bool = False,
    ):
        if config.kernel is None and config.boot_code is None:
            raise KvmletError(
                "MachineConfig needs a kernel (kvmlet.with_default_guest() adds the default one)"
            )
        _install_kick_handler()
        self.config = config
        self.profile = host_profile.resolve(config.host_profile)
        self.created = time.monotonic()
        self.started: float | None = None
        self.first_run_at: float | None = None  # monotonic time of the first KVM_RUN
        self._stop: GuestStop | None = None
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.console = Console(console_echo_fd, stop_reason=lambda: self._stop)
        self.kvm = Kvm()
        self._closers = [self.kvm.close]
        try:
            self._build(console_input_fd, escape)
        except BaseException:
            self.close()
            raise

    # -- construction ----------------------------------------------------------------------

    def _build(self, console_input_fd: int | None, escape: bool) -> None:
        config = self.config
        self.kvm.require()
        self.vm = vm = self.kvm.create_vm()
        self._closers.append(vm.close)
        self.memory_map = MemoryMap(config.memory)
        self.memory = GuestMemory.anonymous(self.memory_map.ram_banks())
        self._closers.append(self.memory.close)
        ask_for_huge_pages(self.memory)
        self.io = port_io_space()
        self.mmio = mmio_space()
        self.kvm_listener = KvmBusListener(vm)
        self.io.add_listener(self.kvm_listener)
        self.mmio.add_listener(self.kvm_listener)
        if config.debug_io:
            self.io.trace = self.mmio.trace = trace_printer()
        with self.mmio.transaction():
            for bank in self.memory:
                self.mmio.root.add_subregion(
                    bank.base, RamRegion(f"ram@{bank.base:#x}", bank.size, bank)
                )
        vm.setup_x86_platform()  # after the RAM slots: see Vm.setup_x86_platform
        self.legacy = attach_legacy_devices(
            self.io,
            lambda irq: KvmIrqLine(vm, irq),
            self.console.output,
            self._guest_reset,
        )
        self.pci = PciHostBridge(self.io, self.mmio)
        self.virtio = VirtioDevices(self)
        self._closers.append(self.virtio.close)
        console_device = self.virtio.console or self.legacy.console_uart
        on_space = self.console.connect_input(
            console_device.receive, console_input_fd, escape=escape, on_action=self._on_escape
        )
        self._closers.append(self.console.close)
        console_device.on_rx_space = on_space
        cmdline = config.kernel_command_line(
            self.virtio.kernel_parameters(), self.profile.kernel_cmdline_additions()
        )
        self.cmdline = cmdline
        boot_state = None
        if config.boot_code is None:
            boot_state = load_kernel(
                self.memory,
                config.kernel,
                config.initrd,
                cmdline,
                self.memory_map,
                config.cpus,
                config.boot_method,
                self.virtio.pci_interrupts(),
            )
        else:
            self.memory.write(BOOT_CODE_ADDRESS, config.boot_code)
        supported = supported_cpuid(self.kvm)
        self.vcpus: list[Vcpu] = []
        for index in range(config.cpus):
            vcpu = vm.create_vcpu(index)
            self._closers.append(vcpu.close)
            self.vcpus.append(vcpu)
            configure_vcpu(vcpu, supported, config.cpus, self.profile.cpuid_masks)
        if boot_state is None:
            start_real_mode(self.vcpus[0], BOOT_CODE_ADDRESS)
        else:
            apply_boot_state(self.vcpus[0], boot_state)

    # -- running ---------------------------------------------------------------------------

    def start(self) -> Machine:
        """Start the devices' workers and one thread per vCPU."""
        if self.started is not None:
            raise KvmletError("this machine has already been started")
        self.started = time.monotonic()
        self.virtio.start()
        for vcpu in self.vcpus:
            thread = threading.Thread(
                target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.id}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        fixup = self._fix_emulation if self.profile.fixes_emulation_failures else None
        if self.first_run_at is None:
            self.first_run_at = time.monotonic()
        try:
            stop = run_vcpu(
                vcpu,
                self.io,
                self.mmio,
                self._stopped.is_set,
                fixup,
                lambda failed: describe_vcpu(failed, self.memory),
            )
        except Exception as error:  # a bug in kvmlet: report it instead of hanging the guest
            stop = GuestStop(StopReason.MONITOR_ERROR, f"{type(error).__name__}: {error}", vcpu.id)
        if stop is not None:
            self.stop(stop.reason, stop.detail, vcpu=stop.vcpu)

    def _fix_emulation(self, vcpu: Vcpu, exit_: InternalErrorExit) -> bool:
        return self.profile.handle_emulation_failure(vcpu, self.memory, exit_)

    def _guest_reset(self) -> None:
        self.stop(StopReason.RESET)

    def _on_escape(self, action: EscapeAction) -> None:
        if action is EscapeAction.QUIT:
            self.stop(StopReason.HOST_QUIT, "Ctrl-A x")
        elif action is EscapeAction.STATS:
            os.write(2, ("\r\n" + format_stats(self.stats()).replace("\n", "\r\n")).encode())
        elif action is EscapeAction.HELP:
            os.write(2, ("\r\n" + EscapeFilter().help_text.replace("\n", "\r\n")).encode())

    def stop(self, reason: StopReason = StopReason.HOST_QUIT, detail: str = "", vcpu=None) -> None:
        """Record why the run ends (the first reason wins) and kick every vCPU out of KVM."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = self._explain(GuestStop(reason, detail, vcpu))
            self._stopped.set()
        for vcpu in self.vcpus:
            # Every vCPU, the calling one too: its next KVM_RUN must return at once.
            vcpu.immediate_exit = True
        self._kick()

    def _kick(self) -> None:
        """Signal every other vCPU thread still alive, so a KVM_RUN it sleeps in returns."""
        current = threading.current_thread()
        for thread in self._threads:
            if thread.is_alive() and thread is not current:
                with contextlib.suppress(ProcessLookupError, TypeError):
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def _join_vcpu_threads(self, timeout: float = 10.0) -> bool:
        """Wait for the vCPU threads to leave, kicking again meanwhile: a kick can land just
        before a thread re-enters KVM_RUN, and a vCPU waiting for INIT/SIPI on some KVMs
        does not look at immediate_exit. False if one is still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while any(thread.is_alive() for thread in self._threads):
            if time.monotonic() >= deadline:
                return False
            self._kick()
            for thread in self._threads:
                thread.join(KICK_INTERVAL)
        return True

    def _explain(self, stop: GuestStop) -> GuestStop:
        """On a host profile that accounts for it, name what really ended the guest."""
        if stop.reason in (StopReason.RESET, StopReason.TRIPLE_FAULT):
            explanation = self.profile.explain_console(self.console.text())
            if explanation:
                return GuestStop(StopReason.USER_SPACE_UNSUPPORTED, explanation)
        return stop

    @property
    def running(self) -> bool:
        return self.started is not None and not self._stopped.is_set()

    @property
    def stop_reason(self) -> GuestStop | None:
        return self._stop

    def wait(self, timeout: float | None = None) -> GuestStop:
        """Wait for the guest to stop; on timeout stop it and report TIMEOUT."""
        if self.started is None:
            raise KvmletError("start() the machine before waiting for it")
        if not self._stopped.wait(timeout):
            self.stop(StopReason.TIMEOUT)  # the caller knows how long it waited
        if not self._join_vcpu_threads():
            raise KvmletError("a vCPU thread did not stop within 10 s of the guest's stop")
        self.console.flush()
        assert self._stop is not None
        return self._stop

    def stats(self) -> dict[str, object]:
        """Counters of the bus, the legacy devices and the virtio devices."""
        return {
            "port_io": self.io.stats(),
            "mmio": self.mmio.stats(),
            "legacy": self.legacy.stats(),
            "virtio": self.virtio.stats(),
        }

    def close(self) -> None:
        """Stop the guest if it runs and release every resource (safe to call twice)."""
        if self.started is not None and not self._stopped.is_set():
            self.stop(StopReason.HOST_QUIT, "closed")
        self._join_vcpu_threads()
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Machine:
        return self.start() if self.started is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def ask_for_huge_pages(memory: GuestMemory) -> None:
    """Ask for transparent huge pages under guest RAM (MADV_HUGEPAGE, as QEMU does).

    Where the host grants them, one page fault fills 2 MiB instead of 4 KiB: loading a 9 MiB
    kernel took ~2 ms instead of 5-7 ms here, and KVM can map the guest with large pages. A
    host kernel without them refuses the advice; guest RAM then keeps small pages."""
    for bank in memory:
        with contextlib.suppress(OSError):
            bank.mapping.madvise(mmap.MADV_HUGEPAGE)
