"""The control API's routes: which method on which path does what, and what a request may hold.

docs/api.yaml describes the same API in OpenAPI 3; the unit tests check this router against it.
Every answer is JSON: a result with 200, or `{"error": MESSAGE}` with 400 (a malformed query
or body), 404 (no such path), 405 (a method the path does not take, with `Allow`), 409 (the
machine's state does not allow it: a `KvmletError` from the machine), or 415 (a body that is
not JSON). Bodies are strict: an unknown field is an error, not something ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import NamedTuple, Protocol
from urllib.parse import parse_qs

from kvmlet.api.http_connection import Reply, Request
from kvmlet.errors import KvmletError

API_PREFIX = "/v1"
MAX_CONSOLE_BYTES = 1 << 20
DEFAULT_CONSOLE_BYTES = 4096
MAX_GRACE_SECONDS = 600.0
DEFAULT_GRACE_SECONDS = 10.0
MAX_QUERY_FIELDS = 8
SNAPSHOT_THEN = ("resume", "pause", "stop")
"""What a machine does once its snapshot is taken (kvmlet/machine/snapshot.py's THEN)."""


class ApiError(Exception):
    """A request the API refuses: its HTTP status and the message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Target(Protocol):
    """What the API controls: one machine (`kvmlet.api.control.MachineControl`)."""

    def describe(self) -> dict: ...
    def pause(self) -> dict: ...
    def resume(self) -> dict: ...
    def stop(self, force: bool, grace_seconds: float) -> dict: ...
    def stats(self) -> dict: ...
    def balloon(self) -> dict: ...
    def set_balloon(self, target_bytes: int) -> dict: ...
    def console(self, size: int) -> dict: ...
    def snapshot(self, path: str, then: str) -> dict: ...


Operation = Callable[[dict[str, list[str]], dict], object]


class Route(NamedTuple):
    operation: Operation
    query: frozenset[str] = frozenset()  # the query parameters it takes


class Router:
    """Dispatches `Request`s to a `Target` (the HTTP server's handler)."""

    def __init__(self, target: Target):
        self.target = target
        self.routes: dict[str, dict[str, Route]] = {
            "/v1/vm": {"GET": Route(lambda query, body: target.describe())},
            "/v1/vm/pause": {"PUT": Route(lambda query, body: target.pause())},
            "/v1/vm/resume": {"PUT": Route(lambda query, body: target.resume())},
            "/v1/vm/stop": {"PUT": Route(self._stop)},
            "/v1/vm/stats": {"GET": Route(lambda query, body: target.stats())},
            "/v1/vm/console": {"GET": Route(self._console, frozenset({"bytes"}))},
            "/v1/vm/snapshot": {"PUT": Route(self._snapshot)},
            "/v1/balloon": {
                "GET": Route(lambda query, body: target.balloon()),
                "PUT": Route(self._balloon),
            },
        }

    def __call__(self, request: Request) -> Reply:
        path, _, query_text = request.target.partition("?")
        methods = self.routes.get(path)
        if methods is None:
            return _error(404, f"no such path {path!r}: the API is {', '.join(self.routes)}")
        route = methods.get(request.method)
        if route is None:
            allowed = ", ".join(sorted(methods))
            reply = _error(405, f"{path} takes {allowed}, not {request.method}")
            return reply[0], reply[1], [("allow", allowed)]
        try:
            query = _query(query_text, route.query)
            body = _body(request) if request.method == "PUT" else {}
            return 200, route.operation(query, body), []
        except ApiError as error:
            return _error(error.status, error.message)
        except KvmletError as error:
            return _error(409, str(error))

    # -- operations with parameters -------------------------------------------------------------

    def _stop(self, query: dict[str, list[str]], body: dict) -> object:
        _only(body, "force", "grace_seconds")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ApiError(400, "force must be true or false")
        grace = _number(body.get("grace_seconds", DEFAULT_GRACE_SECONDS), "grace_seconds")
        if not 0 <= grace <= MAX_GRACE_SECONDS:
            raise ApiError(400, f"grace_seconds must be between 0 and {MAX_GRACE_SECONDS:g}")
        return self.target.stop(force, float(grace))

    def _balloon(self, query: dict[str, list[str]], body: dict) -> object:
        _only(body, "target_bytes")
        if "target_bytes" not in body:
            raise ApiError(400, "the body needs target_bytes: the balloon's size in bytes")
        target = body["target_bytes"]
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ApiError(400, "target_bytes must be a whole number of bytes, 0 or more")
        return self.target.set_balloon(target)

    def _snapshot(self, query: dict[str, list[str]], body: dict) -> object:
        _only(body, "path", "then")
        path = body.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ApiError(400, "path must be the snapshot file's absolute path")
        then = body.get("then", "resume")
        if then not in SNAPSHOT_THEN:
            raise ApiError(400, f"then must be one of {', '.join(SNAPSHOT_THEN)}")
        return self.target.snapshot(path, then)

    def _console(self, query: dict[str, list[str]], body: dict) -> object:
        text = query.get("bytes", [str(DEFAULT_CONSOLE_BYTES)])[-1]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_CONSOLE_BYTES:
            raise ApiError(400, f"bytes must be a number from 1 to {MAX_CONSOLE_BYTES}")
        return self.target.console(int(text))


def _query(text: str, allowed: frozenset[str]) -> dict[str, list[str]]:
    if not text:
        return {}
    try:
        query = parse_qs(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise ApiError(400, f"a query of at most {MAX_QUERY_FIELDS} fields") from None
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0]!r}")
    return query


def _body(request: Request) -> dict:
    """A PUT's JSON object ({} for an empty body; whitespace alone is not JSON)."""
    if not request.body:
        return {}
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind.lower() != "application/json":
        raise ApiError(415, f"the body must be application/json, not {kind}")
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _only(body: dict, *fields: str) -> None:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (fields: {', '.join(fields)})")


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number")
    return value


def _error(status: int, message: str) -> Reply:
    return status, {"error": message}, []
