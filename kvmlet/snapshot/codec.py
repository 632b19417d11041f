"""The state document's encoding: JSON, with bytes as base64.

Every saved state is a plain value: dicts with string keys, lists, ints, floats, strings,
booleans, None, and bytes (registers, configuration spaces, KVM's structures), which JSON
has no type for; a bytes value is written as `{"$bytes": BASE64}`. Tuples come back as lists.
JSON keeps the file readable (`python3 -m json.tool`) and decoding it is safe whatever a file
holds: nothing in it is code.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kvmlet.errors import KvmletError

BYTES_KEY = "$bytes"


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"a saved state holds a {type(value).__name__}: {value!r}")


def _object(document: dict) -> Any:
    if len(document) == 1 and BYTES_KEY in document:
        try:
            return base64.b64decode(document[BYTES_KEY], validate=True)
        except (TypeError, ValueError):
            raise KvmletError("the snapshot's state holds damaged bytes") from None
    return document


def encode(state: Any) -> bytes:
    """`state` as compact JSON (UTF-8)."""
    return json.dumps(state, default=_default, separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes) -> Any:
    """What `encode` wrote; KvmletError when it is not such a document."""
    try:
        return json.loads(data, object_hook=_object)
    except (ValueError, RecursionError) as error:
        raise KvmletError(f"the snapshot's state is not readable: {error}") from None
