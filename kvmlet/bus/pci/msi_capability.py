"""MSI (PCI 3.0 §6.8.1): one message-signalled vector with a 64-bit address.

The capability body after the ID and next pointer: Message Control (enable at bit 0, Multiple
Message Capable 0 = one vector, Multiple Message Enable writable but unused, 64-bit capable at
bit 7), Message Address (dword aligned), Message Upper Address and Message Data. No per-vector
masking. The guest programs address and data, then sets enable; each change is handed to the
`MsiVector` (as for MSI-X, `update(address, data, masked)` with masked = not enabled) and
`fire()` delivers the message while MSI is enabled. `on_change()` hears of every guest write to
the capability (a function stops using INTx while MSI is enabled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmlet.bus.pci.device import PciDevice
    from kvmlet.bus.pci.msi import MsiController

MSI_CAPABILITY_ID = 0x05
CONTROL_ENABLE = 1 << 0
CONTROL_MULTIPLE_ENABLE = 0x7 << 4
CONTROL_64BIT = 1 << 7
_CONTROL, _ADDRESS, _UPPER, _DATA = 0, 2, 6, 10  # offsets in the body (after ID and next)
_BODY_SIZE = 14  # control 2, address 4, upper 4, data 2, reserved 2


class Msi:
    """The MSI capability of one function, delivering through vector 0 of `controller`."""

    def __init__(
        self,
        device: PciDevice,
        controller: MsiController,
        on_change: Callable[[], None] | None = None,
    ):
        self.device = device
        self.on_change = on_change
        self.vector = controller.vector(0)
        self.fired = 0
        body = bytearray(_BODY_SIZE)
        body[_CONTROL : _CONTROL + 2] = CONTROL_64BIT.to_bytes(2, "little")
        mask = bytearray(_BODY_SIZE)
        mask[_CONTROL : _CONTROL + 2] = (CONTROL_ENABLE | CONTROL_MULTIPLE_ENABLE).to_bytes(
            2, "little"
        )
        mask[_ADDRESS : _ADDRESS + 4] = (0xFFFF_FFFC).to_bytes(4, "little")
        mask[_UPPER : _UPPER + 4] = (0xFFFF_FFFF).to_bytes(4, "little")
        mask[_DATA : _DATA + 2] = (0xFFFF).to_bytes(2, "little")
        self.offset = device.add_capability(
            MSI_CAPABILITY_ID, bytes(body), bytes(mask), self._written
        )

    def _field(self, body_offset: int, size: int) -> int:
        return self.device.config.get(self.offset + 2 + body_offset, size)

    @property
    def enabled(self) -> bool:
        return bool(self._field(_CONTROL, 2) & CONTROL_ENABLE)

    def message(self) -> tuple[int, int]:
        """(address, data) as the guest programmed them."""
        address = self._field(_ADDRESS, 4) | self._field(_UPPER, 4) << 32
        return address, self._field(_DATA, 2)

    def _written(self, offset: int, size: int, value: int) -> None:
        address, data = self.message()
        self.vector.update(address, data, not self.enabled)
        if self.on_change is not None:
            self.on_change()

    def republish(self) -> None:
        """Program the vector as the capability's bytes say (after a snapshot's configuration
        space was loaded)."""
        address, data = self.message()
        self.vector.update(address, data, not self.enabled)

    def fire(self) -> bool:
        """Deliver the message; False (nothing sent) while MSI is disabled."""
        if not self.enabled:
            return False
        self.fired += 1
        self.vector.fire()
        return True
