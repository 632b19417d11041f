"""A machine registers its RAM slots before it creates the in-kernel irqchip (set-up time).

Both orders are valid KVM; on the software KVM of our machines a memory slot added once the
irqchip exists costs 5-10 ms (KVM_SET_USER_MEMORY_REGION for 256 MiB), before it 0.2 ms.
"""

from __future__ import annotations

import pytest

from kvmlet.kvm import Vm
from kvmlet.machine.config import MachineConfig
from kvmlet.machine.machine import Machine
from kvmlet.machine.vcpu_loop import StopReason

pytestmark = pytest.mark.kvm


def test_ram_slots_come_before_the_irqchip_and_the_guest_still_runs(monkeypatch):
    calls: list[str] = []

    def recorded(name: str):
        original = getattr(Vm, name)

        def record(self, *arguments, **keywords):
            calls.append(name)
            return original(self, *arguments, **keywords)

        return record

    for name in ("add_memory", "create_irqchip", "create_vcpu"):
        monkeypatch.setattr(Vm, name, recorded(name))
    # mov al, 0x2a ; out 0x80, al ; mov al, 0xfe ; out 0x64, al (an i8042 reset)
    code = bytes.fromhex("b02a e680 b0fe e664")
    config = MachineConfig(boot_code=code, host_profile="none", rng=False)
    with Machine(config) as machine:
        assert calls.index("create_irqchip") > calls.index("add_memory")
        assert calls.index("create_vcpu") > calls.index("create_irqchip")
        stop = machine.wait(timeout=10)
    assert stop.reason is StopReason.RESET
    assert machine.legacy.post.last_code == 0x2A
