"""Decoding of rare vCPU exits from a run page, and the user-facing errors of `Kvm`."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.errors import KvmletError
from kvmlet.kvm import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    Kvm,
    OtherExit,
    ShutdownExit,
    SlotAllocator,
    SystemEventExit,
    exits,
)
from kvmlet.kvm import system as kvm_system

UNION = exits.EXIT_UNION_OFFSET


def run_page(reason: int, union: bytes = b"") -> memoryview:
    page = bytearray(4096)
    struct.pack_into("<I", page, exits.EXIT_REASON_OFFSET, reason)
    page[UNION : UNION + len(union)] = union
    return memoryview(page)


def test_simple_exits_decode_to_their_types():
    assert isinstance(exits.decode_rare_exit(run_page(5), 5), HltExit)
    assert isinstance(exits.decode_rare_exit(run_page(8), 8), ShutdownExit)
    assert isinstance(exits.decode_rare_exit(run_page(10), 10), InterruptedExit)
    assert exits.decode_rare_exit(run_page(7), 7) == OtherExit(7)


def test_system_event_carries_kind_and_data():
    page = run_page(24, struct.pack("<II2Q", exits.KVM_SYSTEM_EVENT_RESET, 2, 7, 9))
    assert exits.decode_rare_exit(page, 24) == SystemEventExit(exits.KVM_SYSTEM_EVENT_RESET, (7, 9))


def test_fail_entry_carries_hardware_reason_and_cpu():
    page = run_page(9, struct.pack("<QI", 0x80000021, 1))
    assert exits.decode_rare_exit(page, 9) == FailEntryExit(0x80000021, 1)


def test_emulation_failure_exposes_instruction_bytes():
    insn = bytes([2, 0x0F, 0x0B]) + bytes(13)  # insn_size 2, UD2
    union = struct.pack("<IIQ", 1, 3, 1) + insn
    decoded = exits.decode_rare_exit(run_page(17, union), 17)
    assert isinstance(decoded, InternalErrorExit)
    assert decoded.is_emulation_failure
    assert decoded.instruction_bytes == b"\x0f\x0b"


def test_internal_error_without_instruction_flag_has_no_bytes():
    union = struct.pack("<IIQQQ", 1, 3, 0, 0xCC01, 0)
    assert exits.decode_rare_exit(run_page(17, union), 17).instruction_bytes == b""
    assert InternalErrorExit(3, (1, 2, 3)).instruction_bytes == b""


def test_hostile_ndata_is_capped_to_the_union():
    decoded = exits.decode_rare_exit(run_page(17, struct.pack("<II", 1, 0xFFFF_FFFF)), 17)
    assert len(decoded.data) == 16


def test_missing_device_is_one_clear_error(tmp_path):
    with pytest.raises(KvmletError, match=r"cannot open .*: no such device"):
        Kvm(str(tmp_path / "kvm"))


def test_permission_error_names_the_kvm_group(monkeypatch):
    def refuse(path, flags):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(kvm_system.os, "open", refuse)
    with pytest.raises(KvmletError, match=r"permission denied \(add yourself to the kvm group\)"):
        Kvm("/dev/kvm")


def test_wrong_api_version_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(kvm_system, "ioctl_int", lambda fd, request, value=0: 11)
    with pytest.raises(KvmletError, match="speaks KVM API version 11; kvmlet needs 12"):
        Kvm("/dev/null")


def test_a_file_that_is_not_kvm_is_refused():
    with pytest.raises(KvmletError, match="is not a KVM device"):
        Kvm("/dev/null")


def test_slot_allocator_reuses_the_lowest_free_slot_and_refuses_past_the_limit():
    slots = SlotAllocator(3)
    assert [slots.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KvmletError, match="out of KVM memory slots"):
        slots.allocate()
    slots.release(1)
    assert slots.allocate() == 1


@given(st.binary(min_size=256, max_size=256), st.integers(0, 2**32 - 1))
def test_decoding_any_run_page_never_raises(union, reason):
    decoded = exits.decode_rare_exit(run_page(reason, union), reason)
    if isinstance(decoded, InternalErrorExit):
        assert len(decoded.instruction_bytes) <= 15
