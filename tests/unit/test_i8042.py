"""The i8042 model against Linux's probe sequence, its reset paths and fuzzed port access."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlet.devices.i8042 import COMMAND_OFFSET, DATA_OFFSET, I8042Controller
from kvmlet.devices.irq import RecordingIrqLine

STR_OBF, STR_IBF, STR_KEYLOCK, STR_AUXDATA, STR_TIMEOUT = 0x01, 0x02, 0x10, 0x20, 0x40
CTR_KBDINT, CTR_AUXINT, CTR_KBDDIS, CTR_AUXDIS, CTR_XLATE = 0x01, 0x02, 0x10, 0x20, 0x40


class Controller:
    """A controller plus what it reported, driven the way drivers/input/serio/i8042.c does."""

    def __init__(self) -> None:
        self.resets = 0
        self.kbd_irq = RecordingIrqLine()
        self.aux_irq = RecordingIrqLine()
        self.device = I8042Controller(self.on_reset, kbd_irq=self.kbd_irq, aux_irq=self.aux_irq)

    def on_reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.device.read(COMMAND_OFFSET, 1)

    def command(self, command: int, params: bytes = b"", replies: int = 0) -> bytes:
        """i8042_command(): never waits, because IBF is never set and replies are immediate."""
        assert not self.status() & STR_IBF
        self.device.write(COMMAND_OFFSET, 1, command)
        for value in params:
            assert not self.status() & STR_IBF
            self.device.write(DATA_OFFSET, 1, value)
        out = bytearray()
        for _ in range(replies):
            assert self.status() & STR_OBF, f"command {command:#x} gave no reply"
            out.append(self.device.read(DATA_OFFSET, 1))
        return bytes(out)

    def flush(self) -> None:
        for _ in range(16):
            if not self.status() & STR_OBF:
                return
            self.device.read(DATA_OFFSET, 1)
        raise AssertionError("output buffer never empties")


def test_linux_probe_sequence_completes_without_timeouts():
    c = Controller()
    # i8042_controller_check + selftest.
    c.flush()
    assert c.command(0xAA, replies=1) == b"\x55"
    # i8042_controller_init: read the CTR twice until stable, disable the keyboard, write back.
    ctr = c.command(0x20, replies=1)[0]
    assert c.command(0x20, replies=1)[0] == ctr
    assert ctr & CTR_XLATE
    assert c.status() & STR_KEYLOCK  # "Keylock active" warning otherwise
    ctr = (ctr | CTR_KBDDIS) & ~CTR_KBDINT
    c.command(0x60, bytes([ctr]))
    assert c.command(0x20, replies=1)[0] == ctr
    c.flush()
    # i8042_check_aux: AUX loop echoes with AUXDATA set.
    c.device.write(COMMAND_OFFSET, 1, 0xD3)
    c.device.write(DATA_OFFSET, 1, 0x5A)
    assert c.status() & (STR_OBF | STR_AUXDATA) == STR_OBF | STR_AUXDATA
    assert c.device.read(DATA_OFFSET, 1) == 0x5A
    # i8042_toggle_aux(false/true): the CTR bit follows.
    c.command(0xA7)
    assert c.command(0x20, replies=1)[0] & CTR_AUXDIS
    c.command(0xA8)
    assert not c.command(0x20, replies=1)[0] & CTR_AUXDIS
    # AUX IRQ test: enable AUXINT, loop 0xA5, expect IRQ12 with the byte.
    ctr = c.command(0x20, replies=1)[0] | CTR_AUXINT
    c.command(0x60, bytes([ctr]))
    c.command(0xD3, b"\xa5")
    assert c.aux_irq.level and not c.kbd_irq.level
    assert c.status() & STR_AUXDATA
    assert c.device.read(DATA_OFFSET, 1) == 0xA5
    assert not c.aux_irq.level
    # Interface tests and port enables used by i8042_setup_kbd/aux.
    assert c.command(0xAB, replies=1) == b"\x00"
    assert c.command(0xA9, replies=1) == b"\x00"
    c.command(0xAE)
    assert not c.command(0x20, replies=1)[0] & CTR_KBDDIS
    c.command(0xAD)
    assert c.command(0x20, replies=1)[0] & CTR_KBDDIS
    assert c.resets == 0


def test_pulse_reset_command_calls_on_reset_each_time():
    c = Controller()
    for _ in range(3):
        c.device.write(COMMAND_OFFSET, 1, 0xFE)
    assert c.resets == 3
    c.device.write(COMMAND_OFFSET, 1, 0xFF)  # pulses no line
    c.device.write(COMMAND_OFFSET, 1, 0xFD)  # pulses A20 only
    assert c.resets == 3


def test_output_port_write_with_bit0_clear_resets():
    c = Controller()
    assert c.command(0xD0, replies=1)[0] & 0x01
    c.command(0xD1, b"\x03")
    assert c.resets == 0
    c.command(0xD1, b"\x02")
    assert c.resets == 1
    assert c.device.output_port == 0x02


def test_keyboard_irq_follows_kbdint_and_drops_between_bytes():
    c = Controller()
    c.command(0xD2, b"\x11")
    c.command(0xD2, b"\x22")
    assert c.kbd_irq.level
    assert c.device.read(DATA_OFFSET, 1) == 0x11
    assert c.kbd_irq.history == [True, False, True]  # a new edge for the second byte
    assert c.device.read(DATA_OFFSET, 1) == 0x22
    assert not c.kbd_irq.level
    c.command(0x60, b"\x00")  # KBDINT off: replies no longer interrupt
    c.command(0x20, replies=0)
    assert not c.kbd_irq.level
    assert c.status() & STR_OBF


def test_bytes_for_absent_devices_get_an_immediate_timeout_nak():
    c = Controller()
    c.device.write(DATA_OFFSET, 1, 0xF2)  # keyboard GETID: no keyboard to answer
    assert c.status() & (STR_OBF | STR_TIMEOUT | STR_AUXDATA) == STR_OBF | STR_TIMEOUT
    assert c.kbd_irq.level
    assert c.device.read(DATA_OFFSET, 1) == 0xFE
    assert not c.status() & (STR_OBF | STR_TIMEOUT)
    c.command(0xD4, b"\xf4")  # to the mouse: no mouse either
    assert c.status() & (STR_OBF | STR_TIMEOUT | STR_AUXDATA) == STR_OBF | STR_TIMEOUT | STR_AUXDATA
    assert c.device.read(DATA_OFFSET, 1) == 0xFE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0, 1, 4, 7]), st.integers(0, 0x1FF))))
def test_fuzzed_port_access_never_raises_and_irqs_match_status(ops):
    c = Controller()
    for is_write, offset, value in ops:
        if is_write:
            c.device.write(offset, 1, value)
        else:
            assert 0 <= c.device.read(offset, 1) <= 0xFF
        status = c.status()
        ctr = c.device.command_byte
        from_aux = bool(status & STR_AUXDATA)
        full = bool(status & STR_OBF)
        assert c.kbd_irq.level == (full and not from_aux and bool(ctr & CTR_KBDINT))
        assert c.aux_irq.level == (full and from_aux and bool(ctr & CTR_AUXINT))


def test_active_multiplexing_probe_sees_a_plain_controller():
    c = Controller()
    # i8042_set_mux_mode: a MUX answers the third loop byte with its version, not an echo.
    for value in (0xF0, 0xF6, 0xA5):
        c.device.write(COMMAND_OFFSET, 1, 0xD3)
        c.device.write(DATA_OFFSET, 1, value)
        assert c.status() & STR_AUXDATA
        assert c.device.read(DATA_OFFSET, 1) == value


def read_keyboard_bytes(c: Controller) -> bytes:
    """What atkbd's interrupt handler reads: one byte per IRQ 1 edge, each a keyboard byte."""
    out = bytearray()
    while c.status() & STR_OBF:
        assert c.kbd_irq.level and not c.status() & STR_AUXDATA
        out.append(c.device.read(DATA_OFFSET, 1))
    return bytes(out)


def test_ctrl_alt_del_arrives_as_translated_scan_codes_with_an_irq_each():
    c = Controller()
    assert c.device.press_ctrl_alt_del()
    keys = read_keyboard_bytes(c)
    assert keys == bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
    assert c.kbd_irq.history.count(True) == len(keys)
    assert c.resets == 0  # the guest decides what the keys mean


def test_ctrl_alt_del_in_scan_code_set_2_without_translation():
    c = Controller()
    c.command(0x60, bytes([CTR_KBDINT]))
    assert c.device.press_ctrl_alt_del()
    assert read_keyboard_bytes(c) == bytes.fromhex("14 11 e071 e0f071 f011 f014")


def test_ctrl_alt_del_waits_for_an_enabled_keyboard_and_room():
    c = Controller()
    c.command(0xAD)  # keyboard interface disabled
    assert not c.device.press_ctrl_alt_del()
    assert not c.status() & STR_OBF
    c.command(0xAE)
    assert c.device.press_ctrl_alt_del()
    assert c.device.press_ctrl_alt_del()
    assert not c.device.press_ctrl_alt_del()  # 16 bytes of buffer: two presses, not three
    assert len(read_keyboard_bytes(c)) == 16
