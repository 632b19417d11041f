"""A running machine's control API: its name, its socket, and the HTTP server behind it.

    endpoint = claim("web")                    # before the machine is built: name and socket
    machine = Machine(config).start()
    with ApiServer(machine, endpoint).start():  # now `kvmlet stop web` works
        machine.wait()

or `serve(machine, name)` for both steps at once. Closing the server removes the socket and
frees the name.
"""

from __future__ import annotations

from kvmlet.api.control import MachineControl
from kvmlet.api.http import DEFAULT_LIMITS, HttpServer, Limits
from kvmlet.api.names import Endpoint, claim
from kvmlet.api.router import Router
from kvmlet.machine.machine import Machine


class ApiServer:
    """Serves the control API of `machine` on a claimed `endpoint` until `close()`."""

    def __init__(self, machine: Machine, endpoint: Endpoint, limits: Limits = DEFAULT_LIMITS):
        self.machine = machine
        self.endpoint = endpoint
        self.control = MachineControl(
            machine, endpoint.name, endpoint.path, lambda: self.http.counters
        )
        self.http = HttpServer(endpoint.listener, Router(self.control), limits)

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def socket_path(self) -> str:
        return self.endpoint.path

    def start(self) -> ApiServer:
        self.http.start()
        return self

    def close(self) -> None:
        """Let requests in progress finish (briefly), then remove the socket and the name."""
        self.http.close()
        self.endpoint.close()

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(machine: Machine, name: str | None = None, socket_path: str | None = None) -> ApiServer:
    """Claim a name (a fresh one when None) and serve `machine`'s control API on its socket."""
    endpoint = claim(name, socket_path)
    try:
        return ApiServer(machine, endpoint).start()
    except BaseException:
        endpoint.close()
        raise
