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

The machine is programmable while it runs: `add_device` hot-adds a device model of the user's
(docs/devices.md), `watch` puts a callback on a range of ports or MMIO that can log, check or
break (`pause` every vCPU and hand control to the caller until `resume`, see watchpoints.py).
`pause()` also quiesces every device's worker and freezes the guest's kvmclock (vstate/clock.py),
`shutdown()` asks the guest to stop before stopping it, and `describe()`/`stats()` report on
the machine: the control API (kvmlet/api) is built on these.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from kvmlet.boot.memory_map import PCI_IO_WINDOW, PCI_MMIO_WINDOW, MemoryMap
from kvmlet.bus import RamRegion, mmio_space, port_io_space, transactions
from kvmlet.bus.pci import CONF1_PORT, BarAllocator, PciWindow
from kvmlet.bus.watch import current_vcpu, set_current_vcpu
from kvmlet.errors import KvmletError, LazyLogger
from kvmlet.host.console import Console
from kvmlet.host.process import seconds_since_process_start
from kvmlet.host.report import format_stats, trace_printer
from kvmlet.host.terminal import EscapeAction, EscapeFilter
from kvmlet.kvm import InternalErrorExit, Kvm, Vcpu
from kvmlet.kvm.ioctls import KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO
from kvmlet.machine.booting import boot, guest_memory
from kvmlet.machine.config import DeviceConfig, MachineConfig
from kvmlet.machine.control import Controls
from kvmlet.machine.legacy import (
    attach_boot_timer,
    attach_debug_exit,
    attach_legacy_devices,
    attach_pci_host_bridge,
    reserve_in_kernel_devices,
)
from kvmlet.machine.vcpu_threads import VCPU_STOP_TIMEOUT, VcpuThreads
from kvmlet.machine.virtio_devices import VirtioDevices
from kvmlet.machine.watchpoints import Watching, Watchpoints
from kvmlet.vstate import host_profile
from kvmlet.vstate.bus_listener import KvmBusListener
from kvmlet.vstate.clock import thaw_clock
from kvmlet.vstate.coalesced_io import CoalescedRing
from kvmlet.vstate.diagnostics import describe_vcpu
from kvmlet.vstate.interrupts import KvmInterruptRouter, KvmIrqLine
from kvmlet.vstate.vcpu_loop import ExitCounts, GuestStop, StopReason, run_vcpu

if TYPE_CHECKING:
    import socket  # it imports selectors: a boot without vsock does without

    from kvmlet.machine.record import Recorder
    from kvmlet.machine.restore import Restoring
    from kvmlet.machine.user_devices import UserDevices

log = LazyLogger(__name__)


class Machine(Controls, Watching):
    """One virtual machine built from a `MachineConfig`; see the module docstring."""

    def __init__(
        self,
        config: MachineConfig,
        *,
        console_echo_fd: int | None = None,
        console_input_fd: int | None = None,
        escape: bool = False,
        restoring: Restoring | None = None,
    ):
        """`restoring` is for `Machine.restore`: build the machine a snapshot was taken of."""
        if config.kernel is None and config.boot_code is None:
            raise KvmletError(
                "MachineConfig needs a kernel (kvmlet.with_default_guest() adds the default one)"
            )
        self.vcpu_threads = VcpuThreads()
        self.config = config
        self.profile = host_profile.resolve(config.host_profile)
        self.created = time.monotonic()
        self.started: float | None = None
        self.first_run_at: float | None = None  # monotonic time of the first KVM_RUN
        self._stop: GuestStop | None = None
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.vcpus: list[Vcpu] = []
        self.watchpoints = Watchpoints(self)
        self._init_controls()
        self.cmdline = ""  # the kernel's command line (none for boot code)
        self.console = Console(console_echo_fd, stop_reason=lambda: self._stop)
        self.kvm = Kvm()
        self._closers = [self.kvm.close]
        self._router: KvmInterruptRouter | None = None
        self._devices: UserDevices | None = None
        self.recorder: Recorder | None = None
        self.ram_backings: dict[int, tuple[int, int]] = {}  # bank base -> (snapshot fd, offset)
        self._restored_clock = None  # the kvmclock `start()` puts back after a restore
        try:
            self._build(console_input_fd, escape, restoring)
        except BaseException:
            self.close()
            raise

    @classmethod
    def restore(
        cls,
        path: str,
        *,
        force: bool = False,
        verify: bool = False,
        console_echo_fd: int | None = None,
        console_input_fd: int | None = None,
        escape: bool = False,
        **changes: Any,
    ) -> Machine:
        """The machine a snapshot file was taken of, as it was (not started: `start()` lets
        it go on). `force` accepts disks changed since; `verify` checks every RAM checksum
        first; `changes` set run options of its configuration (`debug_io`, `host_profile`).
        KvmletError (one line) for a file, disk or host that does not fit (restore.py)."""
        from kvmlet.machine.restore import open_snapshot

        config, restoring = open_snapshot(path, force=force, verify=verify, **changes)
        try:
            return cls(
                config,
                console_echo_fd=console_echo_fd,
                console_input_fd=console_input_fd,
                escape=escape,
                restoring=restoring,
            )
        finally:
            restoring.close()

    # -- construction ----------------------------------------------------------------------

    def _build(
        self, console_input_fd: int | None, escape: bool, restoring: Restoring | None
    ) -> None:
        config = self.config
        self.kvm.require()
        self.vm = vm = self.kvm.create_vm()
        self._closers.append(vm.close)
        self.memory_map = MemoryMap(config.memory)
        if restoring is None:
            self.memory = guest_memory(config, self.memory_map.ram_banks())
            self.memory.ask_for_huge_pages()
        else:
            self.memory = restoring.memory(self)
            self.ram_backings = restoring.backings
        self._closers.append(self.memory.close)
        self._ram_ranges = [(bank.host_address(), bank.size) for bank in self.memory]
        self.io = port_io_space()
        self.mmio = mmio_space()
        self.kvm_listener = KvmBusListener(vm)
        self.io.add_listener(self.kvm_listener)
        self.mmio.add_listener(self.kvm_listener)
        if config.debug_io:
            printer = trace_printer()
            self.io.add_trace(printer)
            self.mmio.add_trace(printer)
        rtc_clock = time.time
        if config.record is not None:
            from kvmlet.machine.record import Recorder

            self.recorder = Recorder(config.record)
            self._closers.append(self.recorder.close)
            self.recorder.attach(self.io, self.mmio)
            rtc_clock = self.recorder.clock("cmos-rtc")
        with self.mmio.transaction():
            for bank in self.memory:
                self.mmio.root.add_subregion(
                    bank.base, RamRegion(f"ram@{bank.base:#x}", bank.size, bank)
                )
        vm.setup_x86_platform()  # after the RAM slots: see Vm.setup_x86_platform
        self.coalesced = self._coalesced_ring()
        coalesce = None
        if self.coalesced is not None:
            coalesce = functools.partial(_coalesce_ports, self.coalesced)
        self.legacy = attach_legacy_devices(
            self.io,
            lambda irq: KvmIrqLine(vm, irq),
            self.console.output,
            self._guest_reset,
            rtc_clock,
            coalesce,
        )
        reserve_in_kernel_devices(self.io, self.mmio)
        if config.debug_exit_port is not None:
            attach_debug_exit(self.io, config.debug_exit_port, self._debug_exit)
        self.boot_marked_after: float | None = None  # seconds from process start to the mark
        if config.boot_timer:
            attach_boot_timer(self.io, self._boot_marked)
        self.pci = attach_pci_host_bridge(self.io, self.mmio, self.memory_map)
        if coalesce is not None:  # conf1's address latch: one exit per configuration access
            coalesce(CONF1_PORT, 4, True)
        self.bar_allocator = BarAllocator(
            PciWindow("pci-io", PCI_IO_WINDOW.base, PCI_IO_WINDOW.size),
            PciWindow("pci-mmio32", PCI_MMIO_WINDOW.base, PCI_MMIO_WINDOW.size),
        )
        self.virtio = VirtioDevices(self)
        self._closers.append(self.virtio.close)
        for device in config.devices:
            self.add_device(device)
        console_device = self.virtio.console or self.legacy.console_uart
        receive = console_device.receive
        if self.recorder is not None and self.virtio.console is None:
            receive = self.recorder.input("com1", receive)  # a replay rebuilds COM1
        on_space = self.console.connect_input(
            receive, console_input_fd, escape=escape, on_action=self._on_escape
        )
        self._closers.append(self.console.close)
        console_device.on_rx_space = on_space
        self.exit_counts = [ExitCounts() for _ in range(config.cpus)]
        for index in range(config.cpus):
            vcpu = vm.create_vcpu(index)
            self._closers.append(vcpu.close)
            self.vcpus.append(vcpu)
        if self.coalesced is not None:  # closed before the vCPU whose run page maps it
            self.coalesced.map_from(self.vcpus[0], self._coalesced_page)
            self._closers.append(self.coalesced.close)
        if restoring is not None:
            self.cmdline = restoring.cmdline
            restoring.apply(self)
        else:
            boot(self)
        if self.recorder is not None:
            from kvmlet.machine.record import record_header

            self.recorder.begin(record_header(self))

    def _coalesced_ring(self) -> CoalescedRing | None:
        """The VM's coalesced-write ring, when this KVM coalesces port writes and no
        recording asks for every access at the moment it happens."""
        self._coalesced_page = self.kvm.check_extension(KVM_CAP_COALESCED_MMIO)
        if self.config.record is not None or self._coalesced_page <= 0:
            return None
        if self.kvm.check_extension(KVM_CAP_COALESCED_PIO) <= 0:
            return None
        return CoalescedRing(self.vm, self.io, self.mmio)

    def interrupt_router(self) -> KvmInterruptRouter:
        """The VM's GSI routing table (MSI and MSI-X vectors), made on first use."""
        if self._router is None:
            self._router = KvmInterruptRouter(self.vm)
            self._closers.append(self._router.close)
        return self._router

    def _user_devices(self) -> UserDevices:
        if self._devices is None:
            from kvmlet.machine.user_devices import machine_devices

            self._devices = machine_devices(self)
            self._closers.append(self._devices.close)
            if self.started is not None:
                self._devices.start()
        return self._devices

    def add_device(self, device: DeviceConfig) -> Any:
        """Make and place a device model of the user's; on a running machine it is hot-added
        (the bus rebuilds at once; a PCI function appears to the guest's next scan). Returns
        the model. A recording machine is paused meanwhile, so that no access is in flight
        when the recording says where the device appeared."""
        pause = self.recorder is not None and self.running and not self.watchpoints.paused
        if pause:
            self.pause()
            self.wait_for_break(timeout=10.0)
        try:
            model = self._user_devices().add(device)
            placed = self._devices.placed[-1]
            if self.recorder is not None:
                self.recorder.device_added(placed, placed.region_names())
        finally:
            if pause:
                self.resume()
        return model

    def vsock_connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A stream connection to `port` of the guest's vsock (`--vsock CID`), waiting up to
        `timeout` seconds for the guest to listen there; KvmletError when it did not."""
        if self.virtio.vhost is None:
            raise KvmletError("this machine has no vsock device (--vsock CID)")
        return self.virtio.vhost.connect_vsock(port, timeout)

    @property
    def devices(self) -> dict[str, Any]:
        """The user's device models by name."""
        return {} if self._devices is None else {p.name: p.model for p in self._devices}

    # -- running ---------------------------------------------------------------------------

    def start(self) -> Machine:
        """Start one thread per vCPU, then the devices' workers and the console's threads.

        The vCPUs go first: a guest's next instruction needs none of the others (a kick or
        output waits in its eventfd or buffer until its thread polls), and each thread start
        waits for the new thread to be scheduled, which on a busy host takes milliseconds."""
        if self.started is not None:
            raise KvmletError("this machine has already been started")
        self.started = time.monotonic()
        if self._restored_clock is not None:
            thaw_clock(self.vm, self.vcpus, self._restored_clock)
            self._restored_clock = None
        self.vcpu_threads.start(self.vcpus, self._vcpu_thread)
        self.virtio.start()
        if self._devices is not None:
            self._devices.start()
        self.console.start()
        return self

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        fixup = self._fix_emulation if self.profile.fixes_emulation_failures else None
        set_current_vcpu(vcpu.id)
        if self.first_run_at is None:
            self.first_run_at = time.monotonic()
        reader = transactions.register_reader()  # its dispatches end region removals' grace
        try:
            stop = run_vcpu(
                vcpu,
                self.io,
                self.mmio,
                functools.partial(self.watchpoints.should_stop, vcpu),
                fixup,
                lambda failed: describe_vcpu(failed, self.memory),
                self.exit_counts[vcpu.id],
                reader,
                self.coalesced,
            )
        except Exception as error:  # a bug in kvmlet: report it instead of hanging the guest
            stop = GuestStop(StopReason.MONITOR_ERROR, f"{type(error).__name__}: {error}", vcpu.id)
        finally:
            transactions.unregister_reader(reader)
        if stop is not None:
            self.stop(stop.reason, stop.detail, vcpu=stop.vcpu)

    def _fix_emulation(self, vcpu: Vcpu, exit_: InternalErrorExit) -> bool:
        return self.profile.handle_emulation_failure(vcpu, self.memory, exit_)

    def _guest_reset(self) -> None:
        self.stop(StopReason.RESET)

    def _debug_exit(self, value: int, status: int) -> None:
        self.stop(
            StopReason.DEBUG_EXIT, f"{value:#x}, exit status {status}", current_vcpu(), status
        )

    def _boot_marked(self) -> None:
        """The guest wrote the boot timer's magic value: report the time since process start."""
        elapsed = seconds_since_process_start()
        if self.boot_marked_after is None:
            self.boot_marked_after = elapsed
        os.write(2, f"kvmlet: boot timer: {elapsed * 1000:.1f} ms from process start\n".encode())

    def _on_escape(self, action: EscapeAction) -> None:
        if action is EscapeAction.QUIT:
            self.stop(StopReason.HOST_QUIT, "Ctrl-A x")
        elif action is EscapeAction.STATS:
            os.write(2, ("\r\n" + format_stats(self.stats()).replace("\n", "\r\n")).encode())
        elif action is EscapeAction.HELP:
            os.write(2, ("\r\n" + EscapeFilter().help_text.replace("\n", "\r\n")).encode())

    def stop(
        self,
        reason: StopReason = StopReason.HOST_QUIT,
        detail: str = "",
        vcpu: int | None = None,
        status: int | None = None,
    ) -> None:
        """Record why the run ends (the first reason wins) and kick every vCPU out of KVM
        (paused ones included); `status` is an exit status the guest chose."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = self._explain(GuestStop(reason, detail, vcpu, status))
            self._stopped.set()
        # Every vCPU, the calling one too: its next KVM_RUN must return at once.
        self.watchpoints.stopping()
        self.vcpu_threads.kick()

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
        if timeout is not None and not 0 <= timeout <= threading.TIMEOUT_MAX:
            raise KvmletError(f"cannot wait {timeout!r} seconds for the guest")
        if not self._stopped.wait(timeout):
            self.stop(StopReason.TIMEOUT)  # the caller knows how long it waited
        if not self.vcpu_threads.join():
            raise KvmletError(
                f"a vCPU thread did not stop within {VCPU_STOP_TIMEOUT:g} s of the guest's stop"
            )
        self.console.flush()
        assert self._stop is not None
        return self._stop

    def close(self) -> None:
        """Stop the guest if it runs and release every resource (safe to call twice).

        A vCPU thread that does not stop (stuck in a device handler) may still use the vCPU,
        the VM, guest RAM and every device: then nothing is released, with a warning, and a
        later `close` tries again. Devices whose worker is stuck likewise stay open."""
        if self.started is not None and not self._stopped.is_set():
            self.stop(StopReason.HOST_QUIT, "closed")
        if not self.vcpu_threads.join():
            log.warning("a vCPU thread did not stop: the machine's resources stay open")
            return
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Machine:
        return self.start() if self.started is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _coalesce_ports(ring: CoalescedRing, port: int, size: int, enabled: bool) -> None:
    ring.set_zone(port, size, pio=True, enabled=enabled)
