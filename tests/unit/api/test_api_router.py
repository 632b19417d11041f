"""The control API's router: every route, and every way a request can be wrong."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.api.http_connection import Request
from kvmlet.api.router import MAX_CONSOLE_BYTES, Router
from tests.helpers.api import FakeMachine


def call(router: Router, method: str, target: str, body: object = None, **headers: str):
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = Request(method, target, {"content-type": "application/json", **headers}, raw)
    return router(request)


@pytest.fixture
def machine():
    return FakeMachine()


@pytest.fixture
def router(machine):
    return Router(machine)


def test_describe(router):
    status, body, _ = call(router, "GET", "/v1/vm")
    assert status == 200 and body["state"] == "running" and body["vcpus"] == 2


def test_pause_resume_and_the_409_of_a_stopped_machine(router, machine):
    assert call(router, "PUT", "/v1/vm/pause")[1]["state"] == "paused"
    status, body, _ = call(router, "PUT", "/v1/vm/stop", {})
    assert (status, body) == (
        409,
        {"error": "the machine is paused: resume it first, or stop it with force"},
    )
    assert call(router, "PUT", "/v1/vm/resume")[1]["state"] == "running"
    assert call(router, "PUT", "/v1/vm/stop", {"force": True})[1]["clean"] is False
    status, body, _ = call(router, "PUT", "/v1/vm/pause")
    assert status == 409 and "stopped" in body["error"]


def test_stop_takes_defaults_and_its_two_fields(router, machine):
    call(router, "PUT", "/v1/vm/stop")
    call(router, "PUT", "/v1/vm/stop", {"force": False, "grace_seconds": 2.5})
    call(router, "PUT", "/v1/vm/stop", {"grace_seconds": 0})
    assert machine.calls == [("stop", False, 10.0), ("stop", False, 2.5), ("stop", False, 0.0)]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"force": 1}, "force must be true or false"),
        ({"force": "yes"}, "force must be true or false"),
        ({"grace_seconds": -1}, "between 0 and 600"),
        ({"grace_seconds": 1e9}, "between 0 and 600"),
        ({"grace_seconds": True}, "must be a number"),
        ({"grace_seconds": "5"}, "must be a number"),
        ({"grace": 5}, "unknown field 'grace'"),
        (b'{"grace_seconds": NaN}', "must be a number"),
        (b'{"grace_seconds": Infinity}', "must be a number"),
        (b"\n", "not JSON"),
        (b"  ", "not JSON"),
    ],
)
def test_stop_refuses_bad_fields(router, machine, body, fragment):
    status, answer, _ = call(router, "PUT", "/v1/vm/stop", body)
    assert status == 400 and fragment in answer["error"]
    assert machine.calls == []


def test_balloon_get_and_set(router, machine):
    assert call(router, "GET", "/v1/balloon")[1]["target_bytes"] == 0
    status, body, _ = call(router, "PUT", "/v1/balloon", {"target_bytes": 64 << 20})
    assert status == 200 and body["target_bytes"] == 64 << 20
    assert machine.calls == [("balloon", 64 << 20)]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "needs target_bytes"),
        ({"target_bytes": -1}, 400, "whole number"),
        ({"target_bytes": 1.5}, 400, "whole number"),
        ({"target_bytes": True}, 400, "whole number"),
        ({"target_bytes": "64M"}, 400, "whole number"),
        ({"target_bytes": 1, "deflate_on_oom": True}, 400, "unknown field"),
        ({"target_bytes": 1 << 40}, 409, "more than the guest"),
    ],
)
def test_balloon_refuses_bad_targets(router, body, status, fragment):
    answer, document, _ = call(router, "PUT", "/v1/balloon", body)
    assert answer == status and fragment in document["error"]


def test_a_machine_without_a_balloon_says_how_to_get_one():
    router = Router(FakeMachine(balloon=False))
    status, body, _ = call(router, "GET", "/v1/balloon")
    assert status == 409 and "--balloon" in body["error"]
    assert call(router, "GET", "/v1/vm/stats")[1]["balloon"] is None


def test_console_tail_and_its_query(router):
    assert call(router, "GET", "/v1/vm/console")[1]["text"] == "login: "
    assert call(router, "GET", "/v1/vm/console?bytes=3")[1]["text"] == "n: "
    for query in (
        "bytes=0",
        "bytes=-1",
        "bytes=abc",
        "bytes=",
        "bytes=³",
        "bytes=٣",
        f"bytes={MAX_CONSOLE_BYTES + 1}",
    ):
        status, body, _ = call(router, "GET", f"/v1/vm/console?{query}")
        assert status == 400 and "bytes must be" in body["error"], query
    status, body, _ = call(router, "GET", "/v1/vm/console?lines=3")
    assert status == 400 and "unknown query parameter 'lines'" in body["error"]
    status, body, _ = call(router, "GET", "/v1/vm/console?" + "&".join(["a=1"] * 20))
    assert status == 400


def test_routes_take_no_query_they_do_not_know(router):
    status, body, _ = call(router, "GET", "/v1/vm?verbose=1")
    assert status == 400 and "verbose" in body["error"]


def test_unknown_paths_are_404_and_say_what_exists(router):
    for target in ("/", "/v1", "/v1/vm/", "/v2/vm", "/v1/vm/pause/now", "/v1/balloon/statistics"):
        status, body, _ = call(router, "GET", target)
        assert status == 404 and "/v1/vm" in body["error"], target


def test_wrong_methods_are_405_with_allow(router):
    status, body, headers = call(router, "DELETE", "/v1/vm")
    assert (status, headers) == (405, [("allow", "GET")])
    assert "takes GET, not DELETE" in body["error"]
    assert call(router, "GET", "/v1/vm/pause")[::2] == (405, [("allow", "PUT")])
    assert call(router, "POST", "/v1/balloon")[2] == [("allow", "GET, PUT")]


@pytest.mark.parametrize(
    "raw", [b"{", b"[]", b"3", b'"x"', b"\xff\xfe", b"[" * 100000 + b"]" * 100000, b"null"]
)
def test_bodies_that_are_not_json_objects_are_400(router, machine, raw):
    status, body, _ = call(router, "PUT", "/v1/vm/stop", raw)
    assert status == 400 and "error" in body
    assert machine.calls == []


def test_a_body_that_is_not_json_is_415(router, machine):
    status, body, _ = call(
        router, "PUT", "/v1/balloon", b"target=1", **{"content-type": "text/plain"}
    )
    assert status == 415 and "text/plain" in body["error"]
    assert machine.calls == []


@given(
    st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "X"]),
    st.text(max_size=60),
    st.one_of(st.binary(max_size=200), st.dictionaries(st.text(max_size=10), st.integers())),
)
def test_any_request_gets_a_json_answer_with_a_known_status(method, target, body):
    router = Router(FakeMachine())
    status, document, _ = call(router, method, "/" + target, body)
    assert status in (200, 400, 404, 405, 409, 415)
    json.dumps(document)
    if status != 200:
        assert set(document) == {"error"}
