"""vhost call benchmark: a backend's call eventfd to the guest's interrupt handler, on real KVM.

A VhostDevice with an idle backend sits behind VirtioPci, its MSI-X vectors on the machine's
`KvmInterruptRouter`, its relay on a running `QueueWorker`, driven through the bus as Linux's
driver does. A real-mode vCPU with its local APIC on runs on a thread of its own; its handler
for the queue's vector counts interrupts in guest RAM (no exit). The benchmark plays the
backend: it writes the queue's call eventfd, waits (spinning) until the guest's count moves,
and does it again, `--calls` times per case.

Cases, interleaved in each round (medians over rounds: shared machines are noisy):

- `irqfd`: the call bound to the queue's vector as a KVM irqfd (what virtio-pci does while the
  vector can fire);
- `relay`: the same device with its calls unbound, so the worker relays each one through the
  transport (MSI-X signal, the vector's own irqfd): the path before calls were bound, and the
  one a masked vector still takes.

    python3 benchmarks/vhost_calls.py [--calls N] [--rounds R]

Prints a JSON line per case: `latency_us` (median and 90th percentile of write-to-handler
times), `worker_wakeups_per_call`, `relayed_per_call` and `python_fires_per_call` (Python steps
on the path), `worker_cpu_us_per_call` (the worker's poller thread CPU time) and
`guest_interrupts_per_call`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmlet.kvm import InterruptedExit, Kvm
from kvmlet.memory import GuestMemory
from kvmlet.vhost.device import VhostDevice
from kvmlet.virtio.worker import QueueWorker
from kvmlet.vstate.interrupts import KvmInterruptRouter
from tests.helpers.irqfd import IdleFrontend
from tests.helpers.virtio_driver import GUEST_RAM_SIZE
from tests.unit.virtio.test_pci import MSI_ADDRESS, LinuxLikeDriver

RAM_SIZE = 0x10000
CODE, HANDLER, COUNTER, READY = 0x1000, 0x1100, 0x500, 0x502
VECTOR = 0x31
"""Queue 0's vector: LinuxLikeDriver gives queue 0 MSI-X entry 1, data 0x31."""
PROGRAM = bytes.fromhex(
    "fa"  # cli
    "2666c706f000ff010000"  # mov dword es:[0xf0], 0x1ff: spurious vector register, APIC on
    "c606020501"  # mov byte [0x502], 1: ready (the APIC drops interrupts until enabled)
    "fb"  # sti
    "f4"  # hlt
    "ebfd"  # jmp back to hlt
)
COUNTING_HANDLER = bytes.fromhex(
    "ff060005"  # inc word [0x500]
    "2666c706b00000000000"  # mov dword es:[0xb0], 0: EOI
    "cf"  # iret
)


class Rig:
    def __init__(self, vm):
        self.memory = GuestMemory.anonymous([(0, RAM_SIZE)])
        self.memory.write(CODE, PROGRAM)
        self.memory.write(HANDLER, COUNTING_HANDLER)
        self.memory.write_u16(4 * VECTOR, HANDLER)
        self.memory.write_u16(4 * VECTOR + 2, 0)
        vm.add_memory(0, RAM_SIZE, self.memory.banks[0].host_address())
        self.vcpu = vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        sregs.es.base = MSI_ADDRESS
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 2
        self.vcpu.set_regs(regs)
        self.router = KvmInterruptRouter(vm)
        self.msi = self.router.controller()
        self.device_memory = GuestMemory.anonymous([(0, GUEST_RAM_SIZE)])
        self.device = VhostDevice(
            self.device_memory, IdleFrontend(), name="vhost-bench", device_id=2, queue_sizes=[16]
        )
        self.worker = QueueWorker("vhost-bench")
        self.device.connect_worker(self.worker)
        self.worker.start()
        self.driver = LinuxLikeDriver(self.device, self.device_memory, self.msi)
        self.driver.probe()
        self.driver.initialize()
        self.call = self.device.call_eventfd(0)
        self.worker_clock = time.pthread_getcpuclockid(self.worker._thread.ident)
        self._stopping = False
        self._vcpu_thread = threading.Thread(target=self._run_vcpu, name="vcpu", daemon=True)
        self._vcpu_thread.start()
        deadline = time.monotonic() + 10.0
        while not self.memory.read_u8(READY):
            if time.monotonic() > deadline:
                raise RuntimeError("the guest did not enable its local APIC within 10 s")
            time.sleep(0.001)

    def _run_vcpu(self) -> None:
        while not self._stopping:
            exit = self.vcpu.run()
            if not isinstance(exit, InterruptedExit):
                raise RuntimeError(f"unexpected exit {exit!r}")

    def measure(self, calls: int) -> dict[str, object]:
        wakeups, relayed = self.worker.wakeups, self.call.relayed
        fires = self.msi.vector(1).fired
        counted = self.memory.read_u16(COUNTER)
        cpu = time.clock_gettime(self.worker_clock)
        latencies = []
        for _ in range(calls):
            start = time.perf_counter_ns()
            os.eventfd_write(self.call.fd, 1)
            deadline = time.monotonic() + 2.0
            while self.memory.read_u16(COUNTER) == counted:
                if time.monotonic() > deadline:
                    raise RuntimeError("the guest took no interrupt within 2 s")
            latencies.append((time.perf_counter_ns() - start) / 1000)
            counted = self.memory.read_u16(COUNTER)
        time.sleep(0.05)  # a late second interrupt would show in the count
        return {
            "latencies": latencies,
            "worker_wakeups": self.worker.wakeups - wakeups,
            "relayed": self.call.relayed - relayed,
            "python_fires": self.msi.vector(1).fired - fires,
            "worker_cpu_us": (time.clock_gettime(self.worker_clock) - cpu) * 1e6,
            "guest_interrupts_extra": (self.memory.read_u16(COUNTER) - counted) & 0xFFFF,
        }

    def close(self) -> None:
        self._stopping = True
        self.vcpu.immediate_exit = True
        signal.pthread_kill(self._vcpu_thread.ident, signal.SIGUSR1)
        self._vcpu_thread.join()
        self.worker.stop()
        self.device.close()
        self.router.close()
        self.vcpu.close()
        self.device_memory.close()
        self.memory.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    signal.signal(signal.SIGUSR1, lambda *_: None)  # interrupts KVM_RUN on the vCPU thread
    results: dict[str, list[dict[str, object]]] = {"irqfd": [], "relay": []}
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.setup_x86_platform()
        rig = Rig(vm)
        try:
            for _ in range(arguments.rounds):
                for case in results:
                    rig.call.bind(rig.msi.vector(1) if case == "irqfd" else None)
                    results[case].append(rig.measure(arguments.calls))
        finally:
            rig.close()
            vm.close()
    calls = arguments.calls
    for case, rounds in results.items():
        medians = [statistics.median(r["latencies"]) for r in rounds]
        p90s = [statistics.quantiles(r["latencies"], n=10)[-1] for r in rounds]
        print(
            json.dumps(
                {
                    "case": case,
                    "calls": calls,
                    "rounds": len(rounds),
                    "latency_us": {
                        "median": round(statistics.median(medians), 1),
                        "p90": round(statistics.median(p90s), 1),
                    },
                    "worker_wakeups_per_call": _per_call(rounds, "worker_wakeups", calls),
                    "relayed_per_call": _per_call(rounds, "relayed", calls),
                    "python_fires_per_call": _per_call(rounds, "python_fires", calls),
                    "worker_cpu_us_per_call": _per_call(rounds, "worker_cpu_us", calls),
                    "guest_interrupts_extra": sum(r["guest_interrupts_extra"] for r in rounds),
                    "round_median_latency_us": [round(m, 1) for m in medians],
                }
            )
        )


def _per_call(rounds: list[dict[str, object]], key: str, calls: int) -> float:
    return round(statistics.median(r[key] / calls for r in rounds), 2)


if __name__ == "__main__":
    main()
