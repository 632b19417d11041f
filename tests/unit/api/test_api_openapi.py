"""docs/api.yaml against the server: schemathesis generates requests from the description and
checks every answer (documented status, JSON of the documented schema, no 5xx).

Schemathesis sends with `requests`; a session adapter carries that over the UNIX socket. This
tier serves a `FakeMachine` (no KVM): it holds the router and the HTTP server to the
description; tests/kvm/test_api_machine.py does the same against a real machine's documents.
"""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[test]'")

from tests.helpers.api import FakeMachine, serving  # noqa: E402
from tests.helpers.unix_http import unix_session  # noqa: E402

DESCRIPTION = Path(__file__).resolve().parents[3] / "docs" / "api.yaml"
schema = schemathesis.openapi.from_path(DESCRIPTION)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "api.sock")
    with serving(path, FakeMachine()):
        yield unix_session(path)


@schema.parametrize()
def test_the_server_answers_as_its_description_says(case, api):
    response = case.call(session=api, base_url="http://localhost")
    case.validate_response(response)


def test_every_route_is_described():
    from kvmlet.api.router import Router

    described = {
        (method.upper(), path)
        for path, operations in schema.raw_schema["paths"].items()
        for method in operations
    }
    served = {
        (method, path)
        for path, methods in Router(FakeMachine()).routes.items()
        for method in methods
    }
    assert described == served
