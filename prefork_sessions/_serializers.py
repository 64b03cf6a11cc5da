"""What both stores share about values: serialisers ("json" (default, orjson), "raw",
"pickle", or custom) with typed errors."""

from __future__ import annotations

import enum
import math
import pickle
from collections.abc import Callable
from typing import Any

import orjson

from ._errors import InvalidArgumentError, SerializationError
from ._pager import ACCELERATED

if ACCELERATED:
    from . import _speedups

Dumps = Callable[[Any], bytes]
Loads = Callable[[bytes], Any]

# Reject what the standard library's json rejects (datetimes, dataclasses) rather
# than silently turning it into strings; non-str keys become strings as in json.
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS




def _json_dumps(value: Any) -> bytes:
    out = orjson.dumps(value, option=_JSON_OPTIONS)
    # orjson writes NaN and infinities as null without a word; look for them only
    # when a null is there at all, so the common value costs one substring search.
    if b"null" in out and _non_finite(value):
        raise ValueError(
            "NaN and infinity have no JSON form (orjson would store them as null); "
            "store None or a string instead"
        )
    return out


def _has_non_finite(value: Any) -> bool:
    """Whether a NaN or infinite float is anywhere in what orjson serialised."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(k) or _has_non_finite(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, enum.Enum):
        return _has_non_finite(value.value)
    return False


_non_finite: Callable[[Any], bool] = _has_non_finite
if ACCELERATED:  # the same walk in C: ~30x faster, and a session with a None in it pays it every save

    def _non_finite(value: Any) -> bool:
        return _speedups.has_non_finite(value, enum.Enum)


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
        raise InvalidArgumentError(f"unknown serializer {spec!r}: {hint}")
    if not (callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None))):
        raise InvalidArgumentError(f"serializer {spec!r} has no dumps()/loads(): {hint}")
    custom_dumps, custom_loads = spec.dumps, spec.loads

    def dumps(value: Any) -> bytes:
        out = custom_dumps(value)
        if isinstance(out, bytes):
            return out
        if isinstance(out, (bytearray, memoryview)):
            return bytes(out)
        if isinstance(out, str):
            return out.encode()
        # bytes(out) would accept an int (5 -> five zero bytes) or any iterable of ints
        raise TypeError(f"its dumps() returned {type(out).__name__}; it must return bytes (or str)")

    return getattr(spec, "__name__", type(spec).__name__), dumps, custom_loads


_ENCODE_HINTS = {
    "json": "Store JSON-compatible values (dict, list, str, int, finite float, bool, None), "
    "or choose serializer='pickle' or a custom serializer.",
    "raw": "serializer='raw' stores bytes as they are: encode the value first.",
    "pickle": "Store values that pickle can serialise.",
}


class Codec:
    """A resolved serializer whose failures raise SerializationError naming the fix.

    ``dumps``/``loads`` are the bare functions (``loads`` None: bytes as they are),
    for hot paths that handle errors inline with ``encode_error``/``decode_error``.
    """

    __slots__ = ("dumps", "loads", "name")

    def __init__(self, spec: Any) -> None:
        self.name, self.dumps, self.loads = resolve(spec)

    def encode(self, key: object, value: Any) -> bytes:
        try:
            return self.dumps(value)
        except Exception as e:
            raise self.encode_error(key, e) from e

    def decode(self, raw: bytes, where: str) -> Any:
        if self.loads is None:
            return raw
        try:
            return self.loads(raw)
        except Exception as e:
            raise self.decode_error(where, e) from e

    def encode_error(self, key: object, e: Exception) -> SerializationError:
        hint = _ENCODE_HINTS.get(self.name, "Make the serializer's dumps() return bytes for every value stored.")
        shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."
        return SerializationError(
            f"cannot store the value for {shown} with serializer {self.name!r}: {e}. {hint}"
        )

    def decode_error(self, where: str, e: Exception) -> SerializationError:
        return SerializationError(
            f"a value in {where} cannot be read with serializer {self.name!r}: {e}. "
            "Was it written with another serializer?"
        )

