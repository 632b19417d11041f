"""A 9P2000.L file server in pure Python, for virtio-9p (`kvmlet.virtio.p9`).

`Server(path, read_only=...)` shares one host directory; `handle(readable, writable)` serves
one request from guest buffers. `messages` is the protocol codec, usable on its own.
"""

from kvmlet.ninep.server import MAX_MSIZE, Server

__all__ = ["MAX_MSIZE", "Server"]
