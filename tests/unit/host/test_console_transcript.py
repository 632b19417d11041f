"""The console transcript: a bounded ring that keeps the newest output and counts the rest."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmlet.host.console import TRANSCRIPT_LIMIT, Console


def test_the_default_ring_is_bounded():
    assert TRANSCRIPT_LIMIT <= 1 << 20


def test_output_past_the_limit_overwrites_the_oldest_bytes():
    console = Console(limit=8)
    console.output(b"abcdef")
    console.output(b"ghij")
    assert console.transcript() == b"cdefghij"
    assert console.tail(3) == (b"hij", 10)
    console.output(b"k")
    assert console.text() == "defghijk"
    console.output(b"0123456789")  # more than the ring holds at once
    assert console.transcript() == b"23456789"
    assert console.tail(100) == (b"23456789", 21)
    console.close()


@given(st.lists(st.binary(max_size=20), max_size=30), st.integers(1, 16), st.data())
def test_the_ring_keeps_the_end_of_everything_and_read_returns_what_is_new(chunks, limit, data):
    console = Console(limit=limit)
    written = b""
    read_up_to = 0
    for chunk in chunks:
        console.output(chunk)
        written += chunk
        if data.draw(st.booleans()):
            kept_from = max(len(written) - limit, 0)
            assert console.read() == written[max(read_up_to, kept_from) :]
            read_up_to = len(written)
    assert console.transcript() == written[-limit:]
    assert console.tail(limit) == (written[-limit:], len(written))
    console.close()
