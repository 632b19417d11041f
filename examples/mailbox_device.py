"""A mailbox: the guest hands the device a buffer in its RAM; the device computes the buffer's
CRC-32 (and, asked to, upper-cases it in place) on a worker thread, then sets DONE and raises
its interrupt until the guest clears DONE.

    kvmlet run ... --device mailbox_device.py:Mailbox,mmio=0xf1000000,irq=10
"""

import zlib

from kvmlet.devices import GuestMemoryError, Register, RegisterDevice

MAGIC = 0x584F424D  # "MBOX" in memory order
CRC, UPPER_CASE = 1, 2  # commands
BUSY, DONE, ERROR = 1, 2, 4  # status bits
MAX_LENGTH = 1 << 20


class Mailbox(RegisterDevice):
    def __init__(self, context):
        super().__init__(context, 0x20, [
            Register("magic", 0x00, value=MAGIC, read_only=True),
            Register("address", 0x04),
            Register("length", 0x08),
            Register("command", 0x0C, on_write=self.command),
            Register("status", 0x10, read_only=True, w1c=DONE | ERROR, on_write=self.update_irq),
            Register("result", 0x14, read_only=True),
        ])  # fmt: skip
        self.worker = context.worker()

    def command(self, command):
        """A write to COMMAND (vCPU thread, device lock held): start the job."""
        if self["status"] & BUSY:
            return
        self["status"] = BUSY
        job = (command, self["address"], self["length"])
        self.worker.submit(lambda: self.work(*job), self.finish)

    def work(self, command, address, length):
        """On the worker thread, without the lock: only guest memory, no registers."""
        if command not in (CRC, UPPER_CASE) or length > MAX_LENGTH:
            return None
        try:
            data = self.context.memory.read(address, length)
            if command == UPPER_CASE:
                self.context.memory.write(address, data.upper())
        except GuestMemoryError:  # the guest chose the address: an error, not a crash
            return None
        return zlib.crc32(data)

    def finish(self, crc):
        """Back under the device lock: publish the result, raise the interrupt."""
        self["status"] = ERROR if crc is None else DONE
        self["result"] = crc or 0
        self.update_irq()

    def update_irq(self, _value=None):
        if self.context.irq is not None:
            self.context.irq.set_level(bool(self["status"] & (DONE | ERROR)))
