"""The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data).

The time registers are computed from the host clock at each read, shifted by an offset the guest
sets by writing them (so `hwclock -w` holds for the rest of the run). The clock is UTC, in BCD
or binary and 12- or 24-hour format as register B says. The century lives at 0x32, where PC
firmware and the ACPI FADT put it; every other byte of the 128 is plain CMOS RAM.

While register B's SET bit is on, the guest edits a frozen copy of the time fields (Linux writes
them one by one, with SET on); clearing SET turns the copy into the new offset. A field written
with SET off takes effect at once. A date the guest leaves invalid is ignored.

Register A's update-in-progress bit reads 1 during the last 244 us of each second, as on the
chip, so Linux's read-and-revalidate loop sees the same moments it would on hardware. Periodic,
alarm and update interrupts are not modelled: register C reads 0 and IRQ 8 stays low.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

REGION_SIZE = 2
INDEX_OFFSET = 0
DATA_OFFSET = 1

INDEX_MASK = 0x7F  # bit 7 of the index write gates NMIs, not the register number

SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

REG_A_UPDATE_IN_PROGRESS = 0x80
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate

REG_B_SET = 0x80
REG_B_BINARY = 0x04
REG_B_24_HOUR = 0x02
REG_B_DEFAULT = REG_B_24_HOUR

REG_D_VALID_RAM_AND_TIME = 0x80

HOURS_PM = 0x80
UPDATE_IN_PROGRESS_SECONDS = 244e-6

CMOS_SIZE = 128


def _to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """Index/data access to 128 bytes of CMOS whose clock bytes follow the host's UTC time."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = REG_A_DEFAULT
        self._cmos[REG_B] = REG_B_DEFAULT
        self._index = 0
        self._offset_seconds = 0.0
        self._frozen: dict[str, int] | None = None

    @property
    def offset_seconds(self) -> float:
        """How far the guest has set its clock from the host's, in seconds."""
        return self._offset_seconds

    def save_state(self) -> dict[str, object]:
        """CMOS RAM, the selected register and the guest's offset from the host clock (the
        time itself is the host's: it has gone on while the machine was saved, as a PC's
        battery-backed clock does), and the fields being set while SET is on."""
        return {
            "cmos": bytes(self._cmos),
            "index": self._index,
            "offset_seconds": self._offset_seconds,
            "frozen": None if self._frozen is None else dict(self._frozen),
        }

    def load_state(self, state: dict) -> None:
        cmos = bytes(state["cmos"])
        if len(cmos) != CMOS_SIZE:
            raise ValueError(f"CMOS of {len(cmos)} bytes")
        offset = float(state["offset_seconds"])
        if not math.isfinite(offset):
            raise ValueError("the clock offset is not a number")
        frozen = state["frozen"]
        if frozen is not None:
            frozen = {name: int(frozen[name]) for name in _FIELD_OF.values()}
        self._cmos[:] = cmos
        self._index = state["index"] & INDEX_MASK
        self._offset_seconds = offset
        self._frozen = frozen

    def read(self, offset: int, size: int) -> int:
        """Offset 1 reads the selected register; the index port reads as open bus."""
        if offset != DATA_OFFSET:
            return 0xFF
        index = self._index
        if index in TIME_REGISTERS:
            return self._encode(index, self._fields())
        if index == REG_A:
            return self._cmos[REG_A] | self._update_in_progress()
        if index == REG_C:
            return 0x00
        if index == REG_D:
            return REG_D_VALID_RAM_AND_TIME
        return self._cmos[index]

    def write(self, offset: int, size: int, value: int) -> None:
        """Offset 0 selects a register (bit 7 ignored), offset 1 writes it."""
        value &= 0xFF
        if offset == INDEX_OFFSET:
            self._index = value & INDEX_MASK
        elif offset == DATA_OFFSET:
            self._write_register(self._index, value)

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            fields = self._frozen if self._frozen is not None else self._fields()
            self._decode_into(index, value, fields)
            if self._frozen is None:
                self._set_time(fields)
        elif index == REG_A:
            self._cmos[REG_A] = value & ~REG_A_UPDATE_IN_PROGRESS
        elif index == REG_B:
            self._write_reg_b(value)
        elif index in (REG_C, REG_D):
            return  # read-only status registers
        else:
            self._cmos[index] = value

    def _write_reg_b(self, value: int) -> None:
        setting_before = self._cmos[REG_B] & REG_B_SET
        if value & REG_B_SET and not setting_before:
            self._frozen = self._fields()
        self._cmos[REG_B] = value
        if setting_before and not value & REG_B_SET and self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            self._set_time(frozen)

    def _guest_now(self) -> float:
        return self._clock() + self._offset_seconds

    def _update_in_progress(self) -> int:
        if self._cmos[REG_B] & REG_B_SET:
            return 0
        now = self._guest_now()
        if not math.isfinite(now):
            return 0
        fraction = now - math.floor(now)
        return REG_A_UPDATE_IN_PROGRESS if fraction >= 1 - UPDATE_IN_PROGRESS_SECONDS else 0

    def _fields(self) -> dict[str, int]:
        """The guest's current date and time, or the frozen copy while SET is on."""
        if self._frozen is not None:
            return self._frozen
        try:
            moment = time.gmtime(math.floor(self._guest_now()))
        except (OverflowError, OSError, ValueError):
            moment = time.gmtime(0)
        return {
            "second": moment.tm_sec % 60,
            "minute": moment.tm_min,
            "hour": moment.tm_hour,
            "weekday": (moment.tm_wday + 1) % 7 + 1,  # 1 = Sunday
            "day": moment.tm_mday,
            "month": moment.tm_mon,
            "year": moment.tm_year % 100,
            "century": moment.tm_year // 100 % 100,
        }

    def _encode(self, index: int, fields: dict[str, int]) -> int:
        binary = self._cmos[REG_B] & REG_B_BINARY
        pm_flag = 0
        if index == HOURS:
            value = fields["hour"]
            if not self._cmos[REG_B] & REG_B_24_HOUR:
                pm_flag = HOURS_PM if value >= 12 else 0
                value = value % 12 or 12
        else:
            value = fields[_FIELD_OF[index]]
        return ((value if binary else _to_bcd(value)) | pm_flag) & 0xFF

    def _decode_into(self, index: int, value: int, fields: dict[str, int]) -> None:
        binary = self._cmos[REG_B] & REG_B_BINARY
        if index == HOURS and not self._cmos[REG_B] & REG_B_24_HOUR:
            pm = bool(value & HOURS_PM)
            hour12 = value & ~HOURS_PM
            hour12 = hour12 if binary else _from_bcd(hour12)
            fields["hour"] = hour12 % 12 + (12 if pm else 0)
            return
        fields[_FIELD_OF[index]] = value if binary else _from_bcd(value)

    def _set_time(self, fields: dict[str, int]) -> None:
        """Make `fields` the guest's current time; leave the clock alone if they are invalid."""
        import calendar  # only when the guest sets the clock: a boot imports neither
        import datetime

        try:
            moment = datetime.datetime(
                fields["century"] * 100 + fields["year"],
                fields["month"],
                fields["day"],
                fields["hour"],
                fields["minute"],
                fields["second"],
            )
        except (ValueError, OverflowError):
            return
        guest_now = self._guest_now()
        if math.isfinite(guest_now):
            # Shift by whole seconds: the divider chain keeps its phase within the second.
            target = calendar.timegm(moment.timetuple())
            self._offset_seconds += target - math.floor(guest_now)


_FIELD_OF = {
    SECONDS: "second",
    MINUTES: "minute",
    HOURS: "hour",
    DAY_OF_WEEK: "weekday",
    DAY_OF_MONTH: "day",
    MONTH: "month",
    YEAR: "year",
    CENTURY: "century",
}
