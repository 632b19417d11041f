"""Port 0x80 sink: writes are counted, reads float high."""

from kvmlet.devices.post import PostCodeSink


def test_post_sink_counts_writes_and_keeps_last_code():
    sink = PostCodeSink()
    assert sink.last_code is None
    sink.write(0, 1, 0x12)
    sink.write(0, 1, 0x1AB)
    assert (sink.writes, sink.last_code) == (2, 0xAB)


def test_post_port_reads_as_open_bus():
    sink = PostCodeSink()
    assert sink.read(0, 1) == 0xFF
    assert sink.read(0, 2) == 0xFFFF
    assert sink.writes == 0
