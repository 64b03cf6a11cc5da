"""What both stores share about values: serialisers ("json" (default, orjson), "raw",
"pickle", or custom) with typed errors, and the guard around get_and_set callbacks."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from ._errors import ReentrantCallError, SerializationError

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
        return SerializationError(
            f"cannot store the value for {key!r} with serializer {self.name!r}: {e}. "
            "Store JSON-compatible values (dict, list, str, int, float, bool, None), "
            "or choose serializer='pickle' or a custom serializer."
        )

    def decode_error(self, where: str, e: Exception) -> SerializationError:
        return SerializationError(
            f"a value in {where} cannot be read with serializer {self.name!r}: {e}. "
            "Was it written with another serializer?"
        )


class CallbackThreads(set[int]):
    """The threads now running a ``get_and_set`` callback, which holds the store's
    lock: a call from one of them back into the store raises instead of deadlocking.
    Empty (false) in the common case, so stores test it before anything else."""

    def check(self) -> None:
        if threading.get_ident() in self:
            raise ReentrantCallError(
                "the store was called from inside a get_and_set() callback, which runs with the "
                "key locked; compute from the value passed to the callback and return the result"
            )

    def run(self, fn: Callable[[Any], Any], value: Any) -> Any:
        me = threading.get_ident()
        self.add(me)
        try:
            return fn(value)
        finally:
            self.discard(me)
