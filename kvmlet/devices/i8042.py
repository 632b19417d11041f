"""The PC keyboard controller (i8042) at ports 0x60/0x64, with nothing plugged into it.

It exists for two reasons: Linux's i8042 driver probes it at boot, and a guest booted with
`reboot=k` resets the machine through it. The controller answers every command that probe uses
(self-test, interface tests, command-byte read/write, port enable/disable, the AUX loopback
whose interrupt Linux waits for) without a timeout, so probing costs no boot time. No keyboard
or mouse is attached: a byte sent to either is answered as a controller does when the device
never clocks it in, with 0xFE and the time-out status bit, so a driver such as atkbd gives up at
once instead of waiting out its own timeouts.

Pulsing the reset line (command 0xFE, or any 0xF0-0xFF pulse with bit 0 clear) or writing an
output port value with bit 0 clear calls `on_reset()`; the machine stops the guest there. The
guest may ask more than once (Linux retries ten times), so `on_reset` must be idempotent.

`press_ctrl_alt_del()` is the host's clean stop request, as Firecracker's SendCtrlAltDel: the
keystrokes of Ctrl-Alt-Del arrive as keyboard scan codes. A Linux guest booted with
`i8042.dumbkbd` (kvmlet's default parameters) binds its AT keyboard driver without talking to
the keyboard, and its keyboard handler turns the keys into `ctrl_alt_del()`: a reboot, through
`reboot=k` back to this controller's reset line, or the SIGINT to init that systemd and
busybox init turn into an orderly shutdown. A kernel without the AT keyboard driver or the
virtual terminal layer (CONFIG_KEYBOARD_ATKBD, CONFIG_VT) ignores the keys.

Two interrupt lines: IRQ1 while a keyboard-side byte waits in the output buffer with the command
byte's KBDINT set, IRQ12 likewise for AUX bytes with AUXINT. They are ISA edge-triggered inputs,
so the line drops after each data read and rises again for the next queued byte.

Port offsets are relative to the region base 0x60: 0 is the data port, 4 the status/command port.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kvmlet.devices.irq import IrqLine

REGION_SIZE = 5
"""Ports 0x60..0x64; only offsets 0 (data) and 4 (status/command) decode."""

DATA_OFFSET = 0
COMMAND_OFFSET = 4

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04
STATUS_LAST_WRITE_COMMAND = 0x08
STATUS_UNLOCKED = 0x10
STATUS_AUX_DATA = 0x20
STATUS_TIMEOUT = 0x40

CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYSTEM_FLAG = 0x04
CTR_KBD_DISABLED = 0x10
CTR_AUX_DISABLED = 0x20
CTR_TRANSLATE = 0x40

# What firmware leaves: keyboard interrupt on, POST passed, scan-code translation on.
INITIAL_COMMAND_BYTE = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_TRANSLATE

OUTPUT_PORT_RESET_DEASSERTED = 0x01
OUTPUT_PORT_A20 = 0x02
INITIAL_OUTPUT_PORT = OUTPUT_PORT_RESET_DEASSERTED | OUTPUT_PORT_A20

CMD_READ_RAM_FIRST = 0x20  # 0x20 reads the command byte; 0x21-0x3F the rest of the RAM
CMD_WRITE_RAM_FIRST = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_INPUT_PORT = 0xC0
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_BUFFER = 0xD2
CMD_WRITE_AUX_BUFFER = 0xD3  # Linux's "AUX loop" test
CMD_WRITE_TO_AUX = 0xD4
CMD_PULSE_FIRST = 0xF0

NO_DEVICE_REPLY = 0xFE  # a NAK as seen by libps2: the command fails without waiting
SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00
INPUT_PORT_NO_KEYLOCK = 0x80  # bit 7 high: keyboard not inhibited

# Ctrl, Alt and Delete pressed, then released: scan code set 1, which the guest reads while
# the controller translates (the command byte's bit 6, as firmware leaves it), and set 2.
CTRL_ALT_DEL_SET1 = bytes.fromhex("1d 38 e053 e0d3 b8 9d")
CTRL_ALT_DEL_SET2 = bytes.fromhex("14 11 e071 e0f071 f011 f014")

_RAM_SIZE = 32
_OUTPUT_BUFFER_LIMIT = 16
_COMMANDS_WITH_DATA = frozenset(
    {CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_BUFFER, CMD_WRITE_AUX_BUFFER, CMD_WRITE_TO_AUX}
)


def _writes_ram(command: int) -> bool:
    """Commands 0x60-0x7F write controller RAM; 0x60 is the command byte."""
    return CMD_WRITE_RAM_FIRST <= command < CMD_WRITE_RAM_FIRST + _RAM_SIZE


class I8042Controller:
    """The controller's command byte, output port and output buffer; no devices behind it."""

    def __init__(
        self,
        on_reset: Callable[[], None],
        *,
        kbd_irq: IrqLine | None = None,
        aux_irq: IrqLine | None = None,
    ) -> None:
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._kbd_level = False
        self._aux_level = False
        self._ram = bytearray(_RAM_SIZE)
        self._ram[0] = INITIAL_COMMAND_BYTE
        self._output_port = INITIAL_OUTPUT_PORT
        self._output: deque[tuple[int, int]] = deque()  # (byte, AUX_DATA/TIMEOUT status bits)
        self._pending_command: int | None = None
        self._last_write_was_command = False
        self.reset_requests = 0

    @property
    def command_byte(self) -> int:
        """The controller configuration byte (CTR) the guest reads with command 0x20."""
        return self._ram[0]

    @property
    def output_port(self) -> int:
        return self._output_port

    def press_ctrl_alt_del(self) -> bool:
        """Queue the keystrokes of Ctrl-Alt-Del for the guest's keyboard driver (IRQ 1);
        False when the guest disabled the keyboard interface or the buffer has no room."""
        if self._ram[0] & CTR_KBD_DISABLED:
            return False
        codes = CTRL_ALT_DEL_SET1 if self._ram[0] & CTR_TRANSLATE else CTRL_ALT_DEL_SET2
        if len(self._output) + len(codes) > _OUTPUT_BUFFER_LIMIT:
            return False
        self._output.extend((code, 0) for code in codes)
        self._update_irqs()
        return True

    def save_state(self) -> dict[str, object]:
        """Controller RAM, output port, output buffer, the command awaiting its data byte and
        the levels driven on IRQ 1 and 12."""
        return {
            "ram": bytes(self._ram),
            "output_port": self._output_port,
            "output": [list(entry) for entry in self._output],
            "pending_command": self._pending_command,
            "last_write_was_command": self._last_write_was_command,
            "irq_levels": [self._kbd_level, self._aux_level],
        }

    def load_state(self, state: dict) -> None:
        """Take a saved state (the lines are not driven: the interrupt controller's saved
        state has their levels)."""
        ram = bytes(state["ram"])
        if len(ram) != _RAM_SIZE:
            raise ValueError(f"controller RAM of {len(ram)} bytes")
        self._ram[:] = ram
        self._output_port = state["output_port"] & 0xFF
        self._output = deque(
            (value & 0xFF, bits & (STATUS_AUX_DATA | STATUS_TIMEOUT))
            for value, bits in state["output"][:_OUTPUT_BUFFER_LIMIT]
        )
        pending = state["pending_command"]
        self._pending_command = None if pending is None else pending & 0xFF
        self._last_write_was_command = bool(state["last_write_was_command"])
        self._kbd_level, self._aux_level = (bool(level) for level in state["irq_levels"])

    def read(self, offset: int, size: int) -> int:
        """Offset 0 pops the output buffer, offset 4 is the status register."""
        if offset == DATA_OFFSET:
            return self._read_data()
        if offset == COMMAND_OFFSET:
            return self._status()
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        """Offset 0 takes a command's data byte, offset 4 a command."""
        value &= 0xFF
        if offset == DATA_OFFSET:
            self._last_write_was_command = False
            self._write_data(value)
        elif offset == COMMAND_OFFSET:
            self._last_write_was_command = True
            self._command(value)

    def _status(self) -> int:
        status = STATUS_UNLOCKED
        if self._ram[0] & CTR_SYSTEM_FLAG:
            status |= STATUS_SYSTEM_FLAG
        if self._last_write_was_command:
            status |= STATUS_LAST_WRITE_COMMAND
        if self._output:
            status |= STATUS_OUTPUT_FULL | self._output[0][1]
        return status

    def _read_data(self) -> int:
        if not self._output:
            return 0x00
        value, _ = self._output.popleft()
        # Drop the lines so the next queued byte, if any, is a fresh edge.
        self._drive_irqs(False, False)
        self._update_irqs()
        return value

    def _command(self, command: int) -> None:
        self._pending_command = None
        if CMD_READ_RAM_FIRST <= command < CMD_READ_RAM_FIRST + _RAM_SIZE:
            self._respond(self._ram[command - CMD_READ_RAM_FIRST])
        elif _writes_ram(command) or command in _COMMANDS_WITH_DATA:
            self._pending_command = command  # its data byte comes through port 0x60
        elif command == CMD_DISABLE_AUX:
            self._set_command_byte(self._ram[0] | CTR_AUX_DISABLED)
        elif command == CMD_ENABLE_AUX:
            self._set_command_byte(self._ram[0] & ~CTR_AUX_DISABLED)
        elif command == CMD_DISABLE_KBD:
            self._set_command_byte(self._ram[0] | CTR_KBD_DISABLED)
        elif command == CMD_ENABLE_KBD:
            self._set_command_byte(self._ram[0] & ~CTR_KBD_DISABLED)
        elif command in (CMD_TEST_AUX, CMD_TEST_KBD):
            self._respond(INTERFACE_TEST_PASSED)
        elif command == CMD_SELF_TEST:
            self._set_command_byte(self._ram[0] | CTR_SYSTEM_FLAG)
            self._respond(SELF_TEST_PASSED)
        elif command == CMD_READ_INPUT_PORT:
            self._respond(INPUT_PORT_NO_KEYLOCK)
        elif command == CMD_READ_OUTPUT_PORT:
            self._respond(self._output_port)
        elif command >= CMD_PULSE_FIRST and not command & OUTPUT_PORT_RESET_DEASSERTED:
            self._request_reset()
        # Anything else (password, diagnostics, vendor commands) is ignored.

    def _write_data(self, value: int) -> None:
        command, self._pending_command = self._pending_command, None
        if command is None:
            self._respond(NO_DEVICE_REPLY, STATUS_TIMEOUT)  # for the absent keyboard
        elif command == CMD_WRITE_TO_AUX:
            self._respond(NO_DEVICE_REPLY, STATUS_AUX_DATA | STATUS_TIMEOUT)  # absent mouse
        elif _writes_ram(command):
            if command == CMD_WRITE_RAM_FIRST:
                self._set_command_byte(value)
            else:
                self._ram[command - CMD_WRITE_RAM_FIRST] = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            if not value & OUTPUT_PORT_RESET_DEASSERTED:
                self._request_reset()
        elif command == CMD_WRITE_KBD_BUFFER:
            self._respond(value)
        elif command == CMD_WRITE_AUX_BUFFER:
            self._respond(value, STATUS_AUX_DATA)

    def _set_command_byte(self, value: int) -> None:
        self._ram[0] = value & 0xFF
        self._update_irqs()

    def _respond(self, value: int, status_bits: int = 0) -> None:
        if len(self._output) < _OUTPUT_BUFFER_LIMIT:
            self._output.append((value, status_bits))
        self._update_irqs()

    def _request_reset(self) -> None:
        self.reset_requests += 1
        self._on_reset()

    def _update_irqs(self) -> None:
        kbd = aux = False
        if self._output:
            from_aux = bool(self._output[0][1] & STATUS_AUX_DATA)
            kbd = not from_aux and bool(self._ram[0] & CTR_KBD_INT)
            aux = from_aux and bool(self._ram[0] & CTR_AUX_INT)
        self._drive_irqs(kbd, aux)

    def _drive_irqs(self, kbd: bool, aux: bool) -> None:
        if kbd != self._kbd_level:
            self._kbd_level = kbd
            if self._kbd_irq is not None:
                self._kbd_irq.set_level(kbd)
        if aux != self._aux_level:
            self._aux_level = aux
            if self._aux_irq is not None:
                self._aux_irq.set_level(aux)
