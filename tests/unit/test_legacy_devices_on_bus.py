"""The legacy devices wired on a port I/O space the way the machine does, through the bus."""

from __future__ import annotations

from kvmlet.bus import AccessSizes, IoRegion, port_io_space
from kvmlet.devices import i8042, post, rtc, serial
from kvmlet.devices.irq import RecordingIrqLine

BYTE_WIDE = AccessSizes(1, 1, False)


def test_ports_reach_their_devices():
    space = port_io_space()
    output: list[bytes] = []
    resets: list[bool] = []
    uarts = []
    for port in serial.LEGACY_SERIAL_PORTS:
        uart = serial.Uart16550(RecordingIrqLine(), output.append)
        uarts.append(uart)
        region = IoRegion(
            port.name, serial.REGION_SIZE, uart, valid=BYTE_WIDE, impl=BYTE_WIDE, lock=None
        )
        space.root.add_subregion(port.base, region)
    controller = i8042.I8042Controller(lambda: resets.append(True))
    space.root.add_subregion(0x60, IoRegion("i8042", i8042.REGION_SIZE, controller))
    clock = rtc.CmosRtc(lambda: 0.0)
    space.root.add_subregion(0x70, IoRegion("rtc", rtc.REGION_SIZE, clock, valid=BYTE_WIDE))
    sink = post.PostCodeSink()
    space.root.add_subregion(post.POST_PORT, IoRegion("post", post.REGION_SIZE, sink))

    for index, port in enumerate(serial.LEGACY_SERIAL_PORTS):
        space.write(port.base, 1, ord("0") + index)
        space.write(port.base + 7, 1, 0x40 + index)
    assert output == [b"0", b"1", b"2", b"3"]
    assert [space.read(p.base + 7, 1) for p in serial.LEGACY_SERIAL_PORTS] == [
        0x40,
        0x41,
        0x42,
        0x43,
    ]
    assert space.read(0x3F8 + 5, 1) == 0x60
    space.write(0x70, 1, 0x09)
    assert space.read(0x71, 1) == 0x70  # 1970 in BCD
    space.write(0x80, 1, 0x34)
    assert (sink.writes, sink.last_code) == (1, 0x34)
    space.write(0x64, 1, 0xAA)
    assert space.read(0x64, 1) & 0x01
    assert space.read(0x60, 1) == 0x55
    space.write(0x64, 1, 0xFE)
    assert resets == [True]
