"""A tiny guest of our own that does what a table tells it: port I/O and 32-bit MMIO anywhere.

Real mode cannot reach PCI BARs at 3 GiB, and hand-assembling a new program for every hostile
sequence does not scale, so this guest switches to 32-bit flat protected mode and then runs an
operation table the test wrote into guest RAM: each 16-byte entry is (kind, port or address,
value, result). Port reads and memory loads store what they read into the entry's result. After
the last entry (kind 0) the guest resets the machine through the i8042, so a run that reaches
the end stops with StopReason.RESET.

    ops = [Op.out32(0xCF8, ...), Op.store16(bar + 0x3000, 0)]
    machine = Machine(MachineConfig(boot_code=table_guest(), ...))
    write_ops(machine.memory, ops)   # before start
    ... machine.wait() ...
    read_results(machine.memory, len(ops))

The assembly is in the comments; `Assembler` resolves the few labels and jumps it needs.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvmlet.machine.config import BOOT_CODE_ADDRESS

TABLE = 0x10_0000
"""Where the operation table lives in guest RAM (1 MiB: above the code, below the kernel's
16 MiB, inside the smallest RAM a machine has)."""
STACK = 0x9_F000
OP = struct.Struct("<IIII")

OUT8, OUT16, OUT32, IN8, IN16, IN32 = 1, 2, 3, 4, 5, 6
STORE8, STORE16, STORE32, LOAD8, LOAD16, LOAD32 = 7, 8, 9, 10, 11, 12


class Op(NamedTuple):
    """One entry of the table: what to do, where, with which value."""

    kind: int
    target: int
    value: int = 0

    @classmethod
    def out(cls, port: int, size: int, value: int) -> Op:
        return cls({1: OUT8, 2: OUT16, 4: OUT32}[size], port, value)

    @classmethod
    def inp(cls, port: int, size: int) -> Op:
        return cls({1: IN8, 2: IN16, 4: IN32}[size], port)

    @classmethod
    def store(cls, address: int, size: int, value: int) -> Op:
        return cls({1: STORE8, 2: STORE16, 4: STORE32}[size], address, value)

    @classmethod
    def load(cls, address: int, size: int) -> Op:
        return cls({1: LOAD8, 2: LOAD16, 4: LOAD32}[size], address)


def conf1_address(slot: int, register: int, function: int = 0) -> int:
    return 0x8000_0000 | slot << 11 | function << 8 | register & 0xFC


def config_write(slot: int, register: int, size: int, value: int, function: int = 0) -> list[Op]:
    """A PCI configuration write through conf1, as two port writes."""
    port = 0xCFC + (register & 3)
    return [Op.out(0xCF8, 4, conf1_address(slot, register, function)), Op.out(port, size, value)]


def config_read(slot: int, register: int, size: int = 4, function: int = 0) -> list[Op]:
    port = 0xCFC + (register & 3)
    return [Op.out(0xCF8, 4, conf1_address(slot, register, function)), Op.inp(port, size)]


class Assembler:
    """Bytes with labels: `rel32` jumps and `abs16`/`abs32` addresses are patched at the end."""

    def __init__(self, origin: int):
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.patches: list[tuple[int, str, str]] = []

    def emit(self, text: str) -> Assembler:
        self.code += bytes.fromhex(text)
        return self

    def label(self, name: str) -> Assembler:
        self.labels[name] = self.origin + len(self.code)
        return self

    def rel32(self, opcode: str, label: str) -> Assembler:
        """A jump with a 32-bit displacement (e9: jmp, 0f84: je, 0f85: jne)."""
        self.emit(opcode)
        self.patches.append((len(self.code), label, "rel32"))
        self.code += bytes(4)
        return self

    def abs32(self, opcode: str, label: str, after: str = "") -> Assembler:
        self.emit(opcode)
        self.patches.append((len(self.code), label, "abs32"))
        self.code += bytes(4)
        return self.emit(after)

    def abs16(self, opcode: str, label: str) -> Assembler:
        """A 16-bit offset from the origin (real mode, CS based at the origin)."""
        self.emit(opcode)
        self.patches.append((len(self.code), label, "abs16"))
        self.code += bytes(2)
        return self

    def assemble(self) -> bytes:
        for position, label, kind in self.patches:
            target = self.labels[label]
            if kind == "rel32":
                distance = target - (self.origin + position + 4)
                struct.pack_into("<i", self.code, position, distance)
            elif kind == "abs16":
                struct.pack_into("<H", self.code, position, target - self.origin)
            else:
                struct.pack_into("<I", self.code, position, target)
        return bytes(self.code)


# (kind, instructions with EDX = port or address, ECX = value, ESI = the entry)
_HANDLERS = {
    OUT8: "89c8 ee",  # mov eax, ecx ; out dx, al
    OUT16: "89c8 66ef",  # mov eax, ecx ; out dx, ax
    OUT32: "89c8 ef",  # mov eax, ecx ; out dx, eax
    IN8: "31c0 ec 89460c",  # xor eax, eax ; in al, dx ; mov [esi+12], eax
    IN16: "31c0 66ed 89460c",  # xor eax, eax ; in ax, dx ; mov [esi+12], eax
    IN32: "ed 89460c",  # in eax, dx ; mov [esi+12], eax
    STORE8: "880a",  # mov [edx], cl
    STORE16: "66890a",  # mov [edx], cx
    STORE32: "890a",  # mov [edx], ecx
    LOAD8: "0fb602 89460c",  # movzx eax, byte [edx] ; mov [esi+12], eax
    LOAD16: "0fb702 89460c",  # movzx eax, word [edx] ; mov [esi+12], eax
    LOAD32: "8b02 89460c",  # mov eax, [edx] ; mov [esi+12], eax
}


def table_guest() -> bytes:
    """The guest's code, loaded at BOOT_CODE_ADDRESS (real mode, CS base = that address)."""
    asm = Assembler(BOOT_CODE_ADDRESS)
    asm.emit("fa")  # cli
    asm.abs16("2e 0f0116", "gdt_pointer")  # lgdt cs:[gdt_pointer]
    asm.emit("0f20c0 0c01 0f22c0")  # mov eax, cr0 ; or al, 1 ; mov cr0, eax
    asm.abs32("66 ea", "protected", after="0800")  # jmp dword 0x08:protected
    asm.label("protected")  # 32-bit code from here
    asm.emit("66b81000 8ed8 8ec0 8ed0")  # mov ax, 0x10 ; mov ds, ax ; mov es, ax ; mov ss, ax
    asm.emit("bc" + STACK.to_bytes(4, "little").hex())  # mov esp, STACK
    asm.emit("be" + TABLE.to_bytes(4, "little").hex())  # mov esi, TABLE
    asm.label("next")
    asm.emit("8b06 8b5604 8b4e08")  # mov eax, [esi] ; mov edx, [esi+4] ; mov ecx, [esi+8]
    asm.emit("85c0").rel32("0f84", "done")  # test eax, eax ; jz done
    for kind in _HANDLERS:
        asm.emit(f"83f8{kind:02x}").rel32("0f84", f"op{kind}")  # cmp eax, kind ; je opN
    asm.rel32("e9", "advance")  # unknown kind: skip it
    for kind, body in _HANDLERS.items():
        asm.label(f"op{kind}").emit(body).rel32("e9", "advance")
    asm.label("advance")
    asm.emit("83c610").rel32("e9", "next")  # add esi, 16 ; jmp next
    asm.label("done")
    asm.emit("b0fe e664")  # mov al, 0xfe ; out 0x64, al  (i8042 reset)
    asm.label("halt").emit("f4").rel32("e9", "halt")  # hlt ; jmp halt
    asm.label("gdt")
    asm.emit("0000000000000000")  # null
    asm.emit("ffff0000009acf00")  # 0x08: 32-bit code, base 0, 4 GiB
    asm.emit("ffff00000092cf00")  # 0x10: data, base 0, 4 GiB
    asm.label("gdt_pointer").emit("1700").abs32("", "gdt")  # limit 23, base gdt
    return asm.assemble()


def write_ops(memory, ops: list[Op]) -> None:
    """Write the table (and its end marker) into guest RAM, results zeroed."""
    table = bytearray()
    for op in ops:
        table += OP.pack(op.kind, op.target & 0xFFFF_FFFF, op.value & 0xFFFF_FFFF, 0)
    table += OP.pack(0, 0, 0, 0)
    memory.write(TABLE, table)


def read_results(memory, count: int) -> list[int]:
    """What each entry's read or load found (0 for the others)."""
    data = memory.read(TABLE, OP.size * count)
    return [entry[3] for entry in OP.iter_unpack(data)]
