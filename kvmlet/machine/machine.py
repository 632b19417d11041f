"""A machine: KVM, guest RAM, the bus and its devices, a loaded kernel and vCPU threads.

`Machine` is kvmlet's public Python API as much as the CLI's engine:

    with Machine(MachineConfig(kernel=Path("bzImage"), memory=512 << 20)) as machine:
        machine.console.wait_for("login:", timeout=30)
        machine.console.write("root\\n")
        stop = machine.wait(timeout=60)      # a GuestStop: how the guest ended

Construction builds everything and loads the kernel (a user mistake raises KvmletError before any
thread starts); `start()` launches one thread per vCPU; the first vCPU that sees the guest stop
(i8042 reset, triple fault, emulation failure...) records a `GuestStop` and kicks the others out
of KVM_RUN with a signal. `pause()`/`resume()` hold every vCPU and the queue worker with the
guest's clock frozen (vstate/pause.py), `shutdown()` asks the guest to stop before stopping
it, and `describe()`/`stats()` report on it: the control API (kvmlet/api) is built on these.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import signal
import threading
import time

from kvmlet import __version__
from kvmlet.boot import load_kernel
from kvmlet.boot.memory_map import MemoryMap
from kvmlet.bus import RamRegion, mmio_space, port_io_space
from kvmlet.bus.pci import PciHostBridge
from kvmlet.errors import KvmletError
from kvmlet.host.console import Console
from kvmlet.host.process import memory_usage
from kvmlet.host.report import format_stats, trace_printer
from kvmlet.host.terminal import EscapeAction, EscapeFilter
from kvmlet.kvm import InternalErrorExit, Kvm, Vcpu
from kvmlet.kvm.ioctls import KVM_API_VERSION
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
from kvmlet.vstate.pause import PauseGate, freeze_clock, thaw_clock
from kvmlet.vstate.vcpu_loop import ExitCounts, GuestStop, StopReason, run_vcpu

KICK_SIGNAL = signal.SIGRTMIN + 4
"""Sent to a vCPU thread to make KVM_RUN return (its handler does nothing)."""
KICK_INTERVAL = 0.05
"""Seconds between kicks while waiting for vCPU threads to stop."""
PAUSE_TIMEOUT = 5.0
"""Seconds `pause()` waits for the vCPUs and the queue worker to reach a safe point."""


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
        self._control = threading.Lock()  # one pause, resume or shutdown at a time
        self._gate = PauseGate()
        self._frozen_clock = None
        self.paused_at: float | None = None
        self.paused_seconds = 0.0  # time spent paused before the current pause
        self.console = Console(console_echo_fd)
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
        self._ram_ranges = [(bank.host_address(), bank.size) for bank in self.memory]
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
        self.exit_counts = [ExitCounts() for _ in range(config.cpus)]
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
                self._at_safe_point,
                fixup,
                lambda failed: describe_vcpu(failed, self.memory),
                self.exit_counts[vcpu.id],
            )
        except Exception as error:  # a bug in kvmlet: report it instead of hanging the guest
            stop = GuestStop(StopReason.MONITOR_ERROR, f"{type(error).__name__}: {error}", vcpu.id)
        if stop is not None:
            self.stop(stop.reason, stop.detail, vcpu=stop.vcpu)

    def _at_safe_point(self) -> bool:
        """A vCPU's KVM_RUN was interrupted: hold it while paused, then say whether to stop."""
        if not self._stopped.is_set():
            self._gate.hold()
        return self._stopped.is_set()

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
        self._gate.release()  # paused vCPUs leave their safe point and see the stop
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

    # -- control -----------------------------------------------------------------------------

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Hold every vCPU outside the guest at an instruction boundary and the queue worker
        between notifications, and freeze the guest's kvmclock (vstate/pause.py). Pausing a
        paused machine does nothing; KvmletError when it is not running or a vCPU or device
        did not reach its safe point within `timeout` (the machine then runs on)."""
        with self._control:
            if self.paused:
                return
            self._require_running("pause")
            self._gate.close()
            for vcpu in self.vcpus:
                vcpu.immediate_exit = True
            alive = self._alive_vcpu_threads
            if not self._gate.wait_parked(alive, timeout, self._kick, KICK_INTERVAL):
                self._let_vcpus_run()
                self._require_running("pause")
                raise KvmletError(f"a vCPU did not stop within {timeout:g} s; the guest runs on")
            if not self.virtio.pause(timeout):
                self.virtio.resume()
                self._let_vcpus_run()
                raise KvmletError(f"a device stayed busy for {timeout:g} s; the guest runs on")
            self._frozen_clock = freeze_clock(self.vm)
            self.paused_at = time.monotonic()

    def resume(self) -> None:
        """Let a paused machine run again, the guest's kvmclock going on from where it was
        frozen. Resuming a running machine does nothing; KvmletError when it has stopped."""
        with self._control:
            if not self.paused:
                self._require_running("resume")
                return
            thaw_clock(self.vm, self.vcpus, self._frozen_clock)
            self.virtio.resume()
            self.paused_seconds += time.monotonic() - (self.paused_at or time.monotonic())
            self.paused_at = None
            self._let_vcpus_run()

    def _let_vcpus_run(self) -> None:
        with self._stop_lock:
            if not self._stopped.is_set():
                for vcpu in self.vcpus:
                    vcpu.immediate_exit = False
        self._gate.open()

    def _alive_vcpu_threads(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def _require_running(self, action: str) -> None:
        if not self.running:
            raise KvmletError(f"cannot {action}: the machine is {self.state}")

    def shutdown(self, grace: float = 0.0) -> GuestStop:
        """End the guest and say how it ended. With `grace` > 0, ask it first (Ctrl-Alt-Del
        on the i8042, which a Linux guest turns into a reboot through `reboot=k`, or the
        orderly shutdown its init makes of it) and give it that many seconds to stop by
        itself; then stop it from the host. A paused machine can only be stopped from the
        host (KvmletError with a grace period)."""
        with self._control:
            if self.paused and grace > 0:
                raise KvmletError("the machine is paused: resume it first, or stop it with force")
        if self.running and grace > 0 and self.legacy.press_ctrl_alt_del():
            self._stopped.wait(grace)
        self.stop(StopReason.HOST_QUIT, "stopped through the control API")
        assert self._stop is not None
        return self._stop

    @property
    def paused(self) -> bool:
        return self.paused_at is not None and not self._stopped.is_set()

    @property
    def state(self) -> str:
        """ "created" (not started), "running", "paused" or "stopped"."""
        if self.started is None:
            return "created"
        if self._stopped.is_set():
            return "stopped"
        return "paused" if self.paused else "running"

    @property
    def uptime(self) -> float:
        """Seconds since `start()` (0 before)."""
        return 0.0 if self.started is None else time.monotonic() - self.started

    @property
    def balloon(self):
        """The virtio-balloon (`config.balloon`), or None."""
        return self.virtio.balloon

    def describe(self) -> dict[str, object]:
        """What the machine is: state, resources, devices, versions (the API's `describe`)."""
        config = self.config
        paused_now = time.monotonic() - self.paused_at if self.paused_at is not None else 0.0
        return {
            "pid": os.getpid(),
            "state": self.state,
            "vcpus": config.cpus,
            "memory_bytes": config.memory,
            "uptime_seconds": round(self.uptime, 3),
            "paused_seconds": round(self.paused_seconds + paused_now, 3),
            "kernel": None if config.kernel is None else os.fspath(config.kernel),
            "initrd": None if config.initrd is None else os.fspath(config.initrd),
            "cmdline": self.cmdline,
            "console": config.console,
            "host_profile": self.profile.name,
            "disks": [
                {"path": os.fspath(disk.path), "read_only": disk.read_only, "direct": disk.direct}
                for disk in config.disks
            ],
            "devices": self.legacy.describe() + self.virtio.describe(),
            "versions": {
                "kvmlet": __version__,
                "python": platform.python_version(),
                "kvm_api": KVM_API_VERSION,
                "host_kernel": os.uname().release,
            },
        }

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
        """Counters of the vCPUs (exits by reason), the bus (per region), the legacy and virtio
        devices (per queue), and the monitor's memory."""
        return {
            "vcpus": [
                {"id": vcpu.id, "exits": counts.snapshot()}
                for vcpu, counts in zip(self.vcpus, self.exit_counts, strict=True)
            ],
            "port_io": self.io.stats(),
            "mmio": self.mmio.stats(),
            "legacy": self.legacy.stats(),
            "virtio": self.virtio.stats(),
            "memory": memory_usage(self._ram_ranges),
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
