"""The CMOS RTC at a fixed host clock: formats, UIP, setting the time, CMOS RAM."""

from __future__ import annotations

import calendar

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.devices.rtc import CmosRtc

# Saturday 2026-11-28 21:07:09 UTC, half-way through the second.
FIXED = calendar.timegm((2026, 11, 28, 21, 7, 9, 0, 0, 0)) + 0.5


class Clock:
    def __init__(self, now: float = FIXED) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cmos_read(rtc: CmosRtc, index: int, *, nmi_disable: bool = False) -> int:
    rtc.write(0, 1, index | (0x80 if nmi_disable else 0))
    return rtc.read(1, 1)


def cmos_write(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(0, 1, index)
    rtc.write(1, 1, value)


def time_registers(rtc: CmosRtc) -> list[int]:
    return [cmos_read(rtc, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


def test_bcd_24_hour_by_default():
    rtc = CmosRtc(Clock())
    assert time_registers(rtc) == [0x09, 0x07, 0x21, 0x07, 0x28, 0x11, 0x26, 0x20]
    assert cmos_read(rtc, 0x0B) == 0x02
    assert cmos_read(rtc, 0x0D) == 0x80


def test_binary_and_12_hour_formats():
    rtc = CmosRtc(Clock())
    cmos_write(rtc, 0x0B, 0x04 | 0x02)
    assert time_registers(rtc) == [9, 7, 21, 7, 28, 11, 26, 20]
    cmos_write(rtc, 0x0B, 0x00)
    assert cmos_read(rtc, 0x04) == 0x80 | 0x09  # 9 PM in BCD
    cmos_write(rtc, 0x0B, 0x04)
    assert cmos_read(rtc, 0x04) == 0x80 | 9


def test_index_bit7_is_the_nmi_gate_not_part_of_the_index():
    rtc = CmosRtc(Clock())
    assert cmos_read(rtc, 0x00, nmi_disable=True) == 0x09
    cmos_write(rtc, 0x40, 0x5A)
    assert cmos_read(rtc, 0x40, nmi_disable=True) == 0x5A
    assert rtc.read(0, 1) == 0xFF


def test_update_in_progress_only_just_before_the_second_ticks():
    clock = Clock()
    rtc = CmosRtc(clock)
    assert cmos_read(rtc, 0x0A) == 0x26
    clock.now = FIXED + 0.4999
    assert cmos_read(rtc, 0x0A) == 0xA6
    clock.now = FIXED + 0.5
    assert cmos_read(rtc, 0x0A) == 0x26
    assert cmos_read(rtc, 0x00) == 0x10


def test_hwclock_style_set_persists_as_an_offset():
    clock = Clock()
    rtc = CmosRtc(clock)
    # mc146818_set_time: SET on, fields one by one (an invalid date on the way), SET off.
    cmos_write(rtc, 0x0B, 0x82)
    for index, value in ((0x09, 0x99), (0x08, 0x02), (0x07, 0x28), (0x04, 0x23), (0x02, 0x59)):
        cmos_write(rtc, index, value)
    cmos_write(rtc, 0x00, 0x58)
    cmos_write(rtc, 0x32, 0x19)
    assert cmos_read(rtc, 0x00) == 0x58  # frozen while SET is on
    clock.now += 5
    assert cmos_read(rtc, 0x00) == 0x58
    cmos_write(rtc, 0x0B, 0x02)
    assert time_registers(rtc)[:4] == [0x58, 0x59, 0x23, 0x01]  # 1999-02-28 was a Sunday
    clock.now += 3
    assert time_registers(rtc) == [0x01, 0x00, 0x00, 0x02, 0x01, 0x03, 0x99, 0x19]


def test_single_field_write_without_set_takes_effect_and_invalid_dates_are_ignored():
    rtc = CmosRtc(Clock())
    cmos_write(rtc, 0x02, 0x30)
    assert cmos_read(rtc, 0x02) == 0x30
    assert rtc.offset_seconds == 23 * 60
    cmos_write(rtc, 0x07, 0x31)  # 31 November does not exist
    assert cmos_read(rtc, 0x07) == 0x28
    assert rtc.offset_seconds == 23 * 60


def test_status_registers_are_read_only_and_cmos_ram_holds_bytes():
    rtc = CmosRtc(Clock())
    cmos_write(rtc, 0x0C, 0xFF)
    cmos_write(rtc, 0x0D, 0x00)
    assert (cmos_read(rtc, 0x0C), cmos_read(rtc, 0x0D)) == (0x00, 0x80)
    for index in (0x0E, 0x10, 0x31, 0x33, 0x7F):
        cmos_write(rtc, index, index ^ 0xA5)
    assert [cmos_read(rtc, i) for i in (0x0E, 0x10, 0x31, 0x33, 0x7F)] == [
        i ^ 0xA5 for i in (0x0E, 0x10, 0x31, 0x33, 0x7F)
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 0x1FF), st.booleans())),
    st.floats(allow_nan=True, allow_infinity=True),
)
def test_fuzzed_access_never_raises_and_time_stays_representable(ops, host_time):
    rtc = CmosRtc(Clock(host_time))
    for offset, value, is_write in ops:
        if is_write:
            rtc.write(offset, 1, value)
        else:
            assert 0 <= rtc.read(offset, 1) <= 0xFF
    for index in range(128):
        assert 0 <= cmos_read(rtc, index) <= 0xFF
