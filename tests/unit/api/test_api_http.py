"""The control API's HTTP server against hostile clients: each gets a JSON error, none stops it."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from kvmlet.api.cpu_budget import CpuBudget
from kvmlet.api.http import Limits
from tests.helpers.api import (
    FakeMachine,
    closed_by_peer,
    exchange,
    raw_connection,
    read_response,
    request_bytes,
    serving,
)

QUICK = Limits(request_seconds=0.5, idle_seconds=0.5, send_seconds=0.5)
SLOW_REQUESTS = Limits(request_seconds=0.5, idle_seconds=30.0)
"""Only the request deadline is short: what ends a slow request is that deadline alone."""


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "api.sock")


def healthy(path: str) -> bool:
    """The server still answers a plain request correctly."""
    status, _, body = exchange(path, request_bytes("GET", "/v1/vm"))
    return status == 200 and body["name"] == "fake"


def test_requests_on_one_kept_alive_connection(path):
    with serving(path), raw_connection(path) as client:
        for _ in range(3):
            client.sendall(request_bytes("GET", "/v1/vm"))
            status, headers, body = read_response(client)
            assert (status, headers["content-type"], body["state"]) == (
                200,
                "application/json",
                "running",
            )


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v1/vm HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /v1/vm HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n", 400),
        (b"GET /v1/vm HTTP/2.0\r\nhost: x\r\n\r\n", 505),
        (b"PUT /v1/vm/stop HTTP/1.1\r\nhost: x\r\ncontent-length: -4\r\n\r\n", 400),
        (b"PUT /v1/vm/stop HTTP/1.1\r\nhost: x\r\ntransfer-encoding: bogus\r\n\r\n", 501),
    ],
)
def test_malformed_requests_get_a_json_error_and_the_server_goes_on(path, raw, status):
    with serving(path):
        answer, headers, body = exchange(path, raw)
        assert answer in (status, 400) and "error" in body
        assert headers["content-type"] == "application/json"
        assert healthy(path)


def test_headers_too_large_get_431(path):
    with serving(path):
        raw = request_bytes("GET", "/v1/vm", x_padding="a" * 20000)
        status, _, body = exchange(path, raw)
        assert status == 431 and "error" in body
        assert healthy(path)


def test_a_huge_body_is_refused_without_being_read(path):
    target = FakeMachine()
    with serving(path, target), raw_connection(path) as client:
        head = b"PUT /v1/balloon HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n"
        client.sendall(head + b"{")
        status, _, body = read_response(client)
        assert status == 413 and "65536 bytes" in body["error"]
        assert closed_by_peer(client, 2.0)
        assert target.calls == []
        assert healthy(path)


def test_a_chunked_body_over_the_limit_is_refused(path):
    with serving(path), raw_connection(path) as client:
        client.sendall(b"PUT /v1/balloon HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            for _ in range(100):
                client.sendall(b"4000\r\n" + b" " * 0x4000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(client)
        assert status == 413 and "error" in body
        assert healthy(path)


def test_a_slow_client_gets_408_and_is_closed(path):
    with serving(path, limits=SLOW_REQUESTS), raw_connection(path) as client:
        started = time.monotonic()
        client.sendall(b"GET /v1/v")  # and never the rest
        status, _, body = read_response(client)
        assert status == 408 and "0.5 s" in body["error"]
        assert time.monotonic() - started < 3
        assert healthy(path)


def test_a_trickling_client_cannot_hold_a_connection_past_the_request_deadline(path):
    with serving(path, limits=SLOW_REQUESTS), raw_connection(path) as client:
        started = time.monotonic()
        try:
            for byte in request_bytes("GET", "/v1/vm", x_long="b" * 200):
                client.sendall(bytes([byte]))
                time.sleep(0.02)  # each byte in time, the whole request not
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_response(client)
        assert answer[0] == 408
        assert time.monotonic() - started < 3


def test_an_idle_kept_alive_connection_is_closed(path):
    with serving(path, limits=QUICK), raw_connection(path) as client:
        client.sendall(request_bytes("GET", "/v1/vm"))
        assert read_response(client)[0] == 200
        assert closed_by_peer(client, 3.0)


def test_a_client_that_disconnects_mid_request_is_forgotten(path):
    target = FakeMachine()
    with serving(path, target, limits=QUICK) as server:
        for partial in (b"PUT /v1/vm/st", request_bytes("PUT", "/v1/vm/stop", b'{"force": tr')):
            client = raw_connection(path)
            client.sendall(partial[: len(partial) - 3])
            client.close()
        assert healthy(path)
        assert target.calls == []
        time.sleep(0.2)
        assert server.counters["connections"] == 3


def test_clients_beyond_the_connection_limit_get_503_at_once(path):
    limits = Limits(connections=4, request_seconds=5.0)
    results: list[int] = []

    def client():
        try:
            status, _, body = exchange(path, request_bytes("GET", "/v1/vm"))
            assert set(body) == {"error"}
        except OSError:
            status = -1
        results.append(status)

    with serving(path, limits=limits):
        holders = [raw_connection(path) for _ in range(4)]  # four half-sent requests
        for holder in holders:
            holder.sendall(b"GET /v1/vm HTTP/1.1\r\n")
        time.sleep(0.2)
        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert results == [503] * 30
        assert time.monotonic() - started < 5  # answered at once, not after a deadline
        for holder in holders:
            holder.close()
        time.sleep(0.2)
        assert healthy(path)


def test_idle_and_trickling_clients_do_not_hold_up_the_others(path):
    with serving(path, limits=Limits(request_seconds=5.0)):
        idle = [raw_connection(path) for _ in range(20)]
        trickling = [raw_connection(path) for _ in range(20)]
        for client in trickling:
            client.sendall(b"GET /v1/vm HTTP/1.1\r\nhost: x\r\n")  # and no more for now
        started = time.monotonic()
        for _ in range(5):
            assert healthy(path)
        assert time.monotonic() - started < 2.0
        for client in idle + trickling:
            client.close()


def test_fifty_concurrent_clients_are_all_served(path):
    statuses: list[int] = []

    def client():
        statuses.append(exchange(path, request_bytes("GET", "/v1/vm/stats"), timeout=20)[0])

    with serving(path):
        threads = [threading.Thread(target=client) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert statuses == [200] * 50


def test_a_peer_of_another_user_is_refused(path):
    with serving(path, allowed=lambda uid: False) as server:
        status, _, body = exchange(path, request_bytes("GET", "/v1/vm"))
        assert status == 403 and str(os.getuid()) in body["error"]
        assert server.counters["refused_peers"] == 1


def test_the_peer_check_sees_the_connecting_user(path):
    seen = []
    with serving(path, allowed=lambda uid: seen.append(uid) or True):
        assert healthy(path)
    assert seen == [os.geteuid()]


def test_a_handler_bug_is_a_500_with_a_json_message(path):
    class Broken(FakeMachine):
        def stats(self):
            raise ZeroDivisionError("bug")

    with serving(path, Broken()):
        status, _, body = exchange(path, request_bytes("GET", "/v1/vm/stats"))
        assert status == 500 and "ZeroDivisionError" in body["error"]
        assert healthy(path)


def test_a_client_that_never_reads_is_dropped(path):
    class Huge(FakeMachine):
        def console(self, size):
            return {"text": "x" * (8 << 20), "bytes": 8 << 20, "total_bytes": 8 << 20}

    with serving(path, Huge(), limits=QUICK) as server:
        client = raw_connection(path)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(request_bytes("GET", "/v1/vm/console"))
        time.sleep(1.5)  # the 8 MiB answer cannot fit: the server gives up after 0.5 s
        assert healthy(path)
        client.close()
        assert server.counters["requests"] >= 2


def test_close_ends_idle_connections_at_once(path):
    with serving(path) as server:
        client = raw_connection(path)
        client.sendall(request_bytes("GET", "/v1/vm"))
        read_response(client)
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 1.0
        assert closed_by_peer(client, 1.0)
        client.close()


def test_the_cpu_budget_makes_a_thread_wait_out_its_debt():
    budget = CpuBudget(share=0.5, burst=0.01)
    started = time.monotonic()
    budget.pay(0.005)  # within the burst: no wait
    assert time.monotonic() - started < 0.005
    budget.pay(0.1)  # 0.095 s in debt, repaid at 0.5 s of CPU per second
    assert 0.17 <= time.monotonic() - started < 0.4
    assert 0.17 <= budget.waited < 0.4


def test_a_flood_of_requests_waits_for_the_cpu_budget_and_is_still_served(path):
    limits = Limits(cpu_share=0.02, cpu_burst=0.001)
    statuses: list[int] = []

    def client():
        for _ in range(10):
            statuses.append(exchange(path, request_bytes("GET", "/v1/vm/stats"), timeout=30)[0])

    with serving(path, limits=limits) as server:
        threads = [threading.Thread(target=client) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert server.budget.waited > 0
    assert statuses == [200] * 50
