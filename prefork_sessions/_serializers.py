"""Value serialisers: "json" (default, orjson), "raw" (bytes), "pickle", or custom."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

Dumps = Callable[[Any], bytes]
Loads = Callable[[bytes], Any]

# Reject what the standard library's json rejects (datetimes, dataclasses) rather
# than silently turning it into strings; non-str keys become strings as in json.
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


_json_dumps: Dumps = partial(orjson.dumps, option=_JSON_OPTIONS)


def _raw_dumps(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"serializer='raw' stores bytes, not {type(value).__name__}")


def _pickle_dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def resolve(spec: Any) -> tuple[str, Dumps, Loads | None]:
    """Return (name, dumps, loads) for a serializer spec; loads None means bytes as is."""
    if spec == "json":
        return "json", _json_dumps, orjson.loads
    if spec == "raw":
        return "raw", _raw_dumps, None
    if spec == "pickle":
        return "pickle", _pickle_dumps, pickle.loads
    hint = "use 'json', 'raw', 'pickle' or an object with dumps() and loads()"
    if isinstance(spec, str):
        raise ValueError(f"unknown serializer {spec!r}: {hint}")
    if not (callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None))):
        raise TypeError(f"serializer {spec!r} has no dumps()/loads(): {hint}")
    custom_dumps, custom_loads = spec.dumps, spec.loads

    def dumps(value: Any) -> bytes:
        out = custom_dumps(value)
        return out.encode() if isinstance(out, str) else bytes(out)

    return getattr(spec, "__name__", type(spec).__name__), dumps, custom_loads
