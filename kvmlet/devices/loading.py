"""Finding a device model's factory from its name: "package.module:Name" or "path/file.py:Name".

The command line (`--device`) and a recording's header name device models this way; a file
is loaded as a module of its own (its name derived from the path), once per process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from kvmlet.errors import KvmletError


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable `spec` names; KvmletError (one line) when it cannot be found."""
    location, _, attribute = spec.rpartition(":")
    if not location or not attribute:
        raise KvmletError(f"device model {spec!r}: use module:Name or path/to/file.py:Name")
    if location.endswith(".py") or os.sep in location:
        module = _load_file(location)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise KvmletError(f"device model {spec!r}: cannot import {location}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise KvmletError(f"device model {spec!r}: {location} has no callable {attribute!r}")
    return factory


def _load_file(path: str):
    absolute = os.path.abspath(path)
    name = "kvmlet_device_" + "".join(c if c.isalnum() else "_" for c in absolute)
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(absolute):
        raise KvmletError(f"device model file {path} does not exist")
    spec = importlib.util.spec_from_file_location(name, absolute)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise KvmletError(f"device model file {path} failed to load: {error!r}") from None
    return module


def factory_name(factory: Callable[..., Any] | str) -> str:
    """How a recording names a factory: the spec as given (a file's path made absolute, so a
    replay from elsewhere finds it), or module:qualname."""
    if isinstance(factory, str):
        location, _, attribute = factory.rpartition(":")
        if location.endswith(".py") or os.sep in location:
            return f"{os.path.abspath(location)}:{attribute}"
        return factory
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if module is None or qualname is None or "<locals>" in qualname:
        raise KvmletError(f"cannot name device model {factory!r} for a recording")
    if module.startswith("kvmlet_device_"):
        path = sys.modules[module].__file__
        return f"{path}:{qualname}"
    return f"{module}:{qualname}"
