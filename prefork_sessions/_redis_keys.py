"""Where RedisStore's keys live in Redis: one Redis Cluster hash tag per store key.

Rules (the lock protocol and the native session merge rely on them):

1. A store key ``k`` (bytes) lives at the *data key* ``prefix + b"{" + t + b"}"``,
   where ``t`` is ``k`` itself, or ``b"\\" + k`` when ``k`` is empty or starts with
   ``}`` or ``\\``.  Redis hashes only what lies between the first ``{`` and the
   first ``}`` after it, and the whole key when that is empty (``{}``): the escape
   keeps the tag non-empty for every key, and is undone exactly by ``store_key``.
2. The prefix may hold no brace, so the first ``{`` is always ours: the tag is the
   head of ``t`` up to its first ``}``, never empty, and two prefixes' data keys
   never look alike (``P{...}`` matches only prefix ``P``).
3. A key's *auxiliary* keys (lock, queue, wake lists) are its data key plus a
   suffix holding no ``}``: they hash to the data key's slot (the tag closes
   inside the data key), never end in ``}`` as data keys do, and the last ``}``
   of any of our keys ends its data key, so no two keys' names ever meet.
"""

from __future__ import annotations

from ._errors import InvalidArgumentError

__all__ = ["check_prefix", "data_key", "data_pattern", "every_pattern", "store_key"]

_ESCAPE = b"\\"


def check_prefix(prefix: bytes) -> bytes:
    """``prefix`` if it can namespace a store (rule 2); InvalidArgumentError otherwise."""
    if not prefix:
        raise InvalidArgumentError("prefix may not be empty: clear() would empty the whole Redis database")
    if b"{" in prefix or b"}" in prefix:
        raise InvalidArgumentError(
            f"prefix={prefix!r} holds a brace; RedisStore puts each key in a Redis Cluster "
            "hash tag ({key}) after the prefix: use a prefix without { and }"
        )
    return prefix


def data_key(prefix: bytes, key: bytes) -> bytes:
    """The Redis key store key ``key`` lives under (rule 1)."""
    if not key or key[0] in b"}\\":
        return prefix + b"{" + _ESCAPE + key + b"}"
    return prefix + b"{" + key + b"}"


def store_key(prefix: bytes, found: bytes) -> bytes:
    """The store key of data key ``found`` (one that ``data_pattern`` matched)."""
    t = found[len(prefix) + 1:-1]
    return t[1:] if t[:1] == _ESCAPE else t


def data_pattern(prefix: bytes) -> bytes:
    """A SCAN MATCH pattern for this prefix's data keys only."""
    return _glob_escape(prefix) + b"{*}"


def every_pattern(prefix: bytes) -> bytes:
    """A SCAN MATCH pattern for every key of this prefix, auxiliaries included."""
    return _glob_escape(prefix) + b"{*"


def _glob_escape(b: bytes) -> bytes:
    out = bytearray()
    for c in b:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)
