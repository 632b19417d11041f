"""The control plane: every running machine answers an HTTP/JSON API on a UNIX socket.

`names` (machine names and socket paths), `http` (the bounded HTTP/1.1 server: its I/O and
handler threads), `http_connection` (one client's h11 state, request and answer), `cpu_budget`
(what the server's threads may take from the guest), `router` (paths and request checks),
`control` (the API's view of a `Machine`), `server` (`serve`: all of it for one machine),
`client` (`kvmlet.connect`), `report` (what the CLI prints). docs/api.yaml is the OpenAPI
description.
"""
