"""RateLimitedLog: messages a guest can trigger at will are logged a few times, then counted."""

from __future__ import annotations

import logging

from kvmlet.errors import LazyLogger, RateLimitedLog


def test_first_messages_then_a_count_per_interval(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("kvmlet.errors.time.monotonic", lambda: clock[0])
    limited = RateLimitedLog(LazyLogger("kvmlet.test"), burst=3, interval=10.0)
    caplog.set_level(logging.WARNING, logger="kvmlet.test")
    for number in range(100):
        limited.warning("flood", "message %d", number)
    limited.warning("other", "another key")
    assert [r.getMessage() for r in caplog.records] == [
        "message 0",
        "message 1",
        "message 2",
        "another key",
    ]
    assert limited.suppressed == 97
    clock[0] += 10.0
    limited.warning("flood", "message %d", 100)
    assert caplog.records[-1].getMessage() == "message 100 (97 similar messages suppressed)"
    limited.warning("flood", "message %d", 101)
    assert len(caplog.records) == 5, "then at most one per interval"


def test_keys_from_the_guest_are_bounded():
    limited = RateLimitedLog(LazyLogger("kvmlet.test"), burst=1)
    for key in range(5000):
        limited.log("debug", key, "unassigned %d", key)
    assert len(limited._keys) <= 1024
