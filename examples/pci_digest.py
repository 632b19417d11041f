"""A PCI function that hashes guest memory: BAR 0 holds its registers; the guest gives a
buffer and where the SHA-256 digest should go, writes COMMAND, and gets an interrupt (MSI when
its driver enabled it, else INTx) once the digest is in its RAM.

    kvmlet run ... --device examples/pci_digest.py:PciDigest,pci
    machine.add_device(DeviceConfig.pci("examples/pci_digest.py:PciDigest"))  # hot-add
"""

import hashlib

from kvmlet.devices import GuestMemoryError, PciFunction, Register, RegisterBlock

VENDOR_ID, DEVICE_ID = 0x6B76, 0x0001  # "kv": an example's, not a real vendor's
OTHER_CLASS = 0xFF0000  # "device does not fit any defined class"
DIGEST = 1  # the command
BUSY, DONE, ERROR = 1, 2, 4  # status bits
MAX_LENGTH = 16 << 20


class PciDigest(PciFunction):
    def __init__(self, context):
        super().__init__(
            context, vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=OTHER_CLASS, msi=True
        )
        self.registers = RegisterBlock(0x20, [
            Register("address", 0x00, width=8),
            Register("length", 0x08),
            Register("command", 0x0C, on_write=self.start),
            Register("digest_address", 0x10, width=8),
            Register("status", 0x18, read_only=True, w1c=DONE | ERROR, on_write=self.cleared),
        ])  # fmt: skip
        self.add_register_bar(0, self.registers)
        self.worker = context.worker()

    def start(self, command):
        registers = self.registers
        if command != DIGEST or registers["status"] & BUSY:
            return
        registers["status"] = BUSY
        job = (registers["address"], registers["length"], registers["digest_address"])
        self.worker.submit(lambda: self.digest(*job), self.finish)

    def digest(self, address, length, digest_address):
        """On the worker thread: read the buffer, write its digest (guest memory only)."""
        if length > MAX_LENGTH:
            return False
        try:
            digest = hashlib.sha256(self.context.memory.read(address, length)).digest()
            self.context.memory.write(digest_address, digest)
        except GuestMemoryError:
            return False
        return True

    def finish(self, ok):
        self.registers["status"] = DONE if ok else ERROR
        self.raise_interrupt()

    def cleared(self, _value):
        if not self.registers["status"] & (DONE | ERROR):
            self.lower_interrupt()
