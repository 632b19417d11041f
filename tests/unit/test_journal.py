"""The record file: what the writer writes the reader reads back, events in order, names
numbered once; and any damaged or hostile file is one KvmletError, never a crash."""

from __future__ import annotations

import contextlib
import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.devices.journal import (
    MAGIC,
    AccessEvent,
    ClockEvent,
    DeviceEvent,
    DmaEvent,
    DoneEvent,
    InputEvent,
    IrqEvent,
    JournalReader,
    JournalWriter,
)
from kvmlet.errors import KvmletError


def recording() -> bytes:
    file = io.BytesIO()
    writer = JournalWriter(file)
    writer.clock("early", 0, 1.5)  # before the header: kept and written after it
    writer.begin({"memory": 1 << 28, "devices": []})
    writer.access(False, 0x3F8, 1, True, 0x41, "com1", 0)
    writer.access(True, 0xF100_0010, 4, False, 0xDEAD_BEEF, "mailbox", None)
    writer.access(False, 0x99, 2, False, 0xFFFF, None, 1)
    writer.dma(False, "mailbox", 3, 0x1000, 4, b"abcd")
    writer.dma(True, "mailbox", 3, 0x2000, 2, None)
    writer.irq("mailbox", 3, 2, 7)
    writer.done("mailbox", 3)
    writer.input("com1", b"ls\n")
    writer.device_added({"name": "late"})
    assert writer.begun and writer.events == 10
    return file.getvalue()


def test_what_is_written_is_read_back_in_order():
    reader = JournalReader(recording())
    assert reader.header == {"memory": 1 << 28, "devices": []}
    events = list(reader.events())
    assert all(e.time_ms < 1000 for e in events if isinstance(e, AccessEvent))
    events = [e._replace(time_ms=0) if isinstance(e, AccessEvent) else e for e in events]
    assert events == [
        ClockEvent("early", 0, 1.5),
        AccessEvent("io", 0x3F8, 1, True, 0x41, "com1", 0, 0),
        AccessEvent("memory", 0xF100_0010, 4, False, 0xDEAD_BEEF, "mailbox", None, 0),
        AccessEvent("io", 0x99, 2, False, 0xFFFF, None, 1, 0),
        DmaEvent(False, "mailbox", 3, 0x1000, 4, b"abcd"),
        DmaEvent(True, "mailbox", 3, 0x2000, 2, None),
        IrqEvent("mailbox", 3, 2, 7),
        DoneEvent("mailbox", 3),
        InputEvent("com1", b"ls\n"),
        DeviceEvent({"name": "late"}),
    ]


def test_an_access_costs_26_bytes_and_a_name_is_written_once():
    file = io.BytesIO()
    writer = JournalWriter(file)
    writer.begin({})
    start = len(file.getvalue())
    writer.access(False, 0x3F8, 1, True, 0x41, "com1", 0)
    first = len(file.getvalue()) - start
    writer.access(False, 0x3F8, 1, True, 0x42, "com1", 0)
    assert len(file.getvalue()) - start - first == 26
    assert first == 26 + 1 + 4 + len("com1")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"ELF", "not a kvmlet recording"),
        (MAGIC + b"\x05\x00", "cut short at byte 8"),
        (MAGIC + struct.pack("<I", 100) + b"{}", "cut short"),
        (MAGIC + struct.pack("<I", 2) + b"[]", "not a JSON object"),
        (MAGIC + struct.pack("<I", 2) + b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_headers_are_one_line(data, message):
    with pytest.raises(KvmletError, match=message):
        JournalReader(data, "x.rec")


def test_damaged_events_name_the_byte():
    good = recording()
    header_end = 12 + int.from_bytes(good[8:12], "little")
    with pytest.raises(KvmletError, match="unknown event kind 99"):
        list(JournalReader(good[:header_end] + b"\x63").events())
    with pytest.raises(KvmletError, match="cut short"):
        list(JournalReader(good[:-3]).events())
    unnamed = good[:header_end] + bytes([7]) + struct.pack("<HI", 42, 1)
    with pytest.raises(KvmletError, match="uses name 42 before its NAME"):
        list(JournalReader(unnamed).events())
    bad_width = good[:header_end] + bytes([2, 3 << 4]) + bytes(24)
    with pytest.raises(KvmletError, match="access width 3"):
        list(JournalReader(bad_width).events())


@given(st.binary(max_size=400))
def test_any_bytes_after_a_header_read_as_events_or_one_kvmlet_error(tail):
    data = MAGIC + struct.pack("<I", 2) + b"{}" + tail
    try:
        for _ in JournalReader(data).events():
            pass
    except KvmletError as error:
        assert "\n" not in str(error)


@given(st.binary(max_size=64))
def test_any_file_at_all_is_a_recording_or_one_kvmlet_error(data):
    with contextlib.suppress(KvmletError):
        list(JournalReader(data).events())
