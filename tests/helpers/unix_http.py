"""A `requests` session that speaks HTTP over a UNIX socket (schemathesis sends with requests).

Every request of the session goes to the socket at `path`, whatever host its URL names."""

from __future__ import annotations

import socket

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **options):
        super().__init__("localhost", **options)
        self.unix_path = path

    def _new_conn(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(self.timeout)
        client.connect(self.unix_path)
        return client


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str, **options):
        super().__init__("localhost", **options)
        self.unix_path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.unix_path, timeout=self.timeout.connect_timeout)


class _UnixAdapter(HTTPAdapter):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return _UnixPool(self.path)


def unix_session(path: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", _UnixAdapter(path))
    return session
