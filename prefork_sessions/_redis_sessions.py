"""Sessions on RedisStore, merged natively: one HASH per session.

A session's HASH has a field per data key and per flash message, plus two of
its own::

    e      expiry, epoch seconds (a decimal string)
    n      the last flash number given (HINCRBY)
    d:K    the value of data key K, encoded by the codec
    f:N    flash message number N, [category, message] encoded by the codec

The key's own expiry (PEXPIRE) is the session's lifetime, one for the whole
session.  Every write is one script, so it is atomic and costs one round trip:

- ``merge`` sends only the fields a request changed and the names of those it
  removed (consumed flashes included); new flashes get the next numbers.  It
  reads nothing first, and writes nothing when the session is gone or its
  ``e`` has passed (a concurrent logout or expiry): no resurrection.
- ``write`` replaces the whole HASH (a new or rotated session), optionally only
  when the key is absent (a create) or present (an update).
- ``load`` is one HGETALL.  A session stored whole as a string (by
  ``prefork-sessions import`` from a store file, or by an older release) is
  converted to a HASH as it loads, if it did not change meanwhile, keeping its
  remaining lifetime: moving live sessions from a file to Redis needs no
  downtime.  (A merge that finds a string, rewritten meanwhile by a process of
  an older release, writes nothing, as for a session gone: run one release.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from ._errors import SerializationError
from ._records import FAR_FUTURE, Stored, When, is_flash, parse_stored
from ._redis import RedisStore
from ._serializers import Codec

__all__ = ["HashRecords"]

_EXPIRES = b"e"
_DATA = b"d:"
_FLASH = b"f:"

# ``command`` (HSET, HDEL) on ARGV[from..to], in chunks of 200 (whole name, value
# pairs for HSET) that stay far below Lua's limit on unpack()ed arguments.
_HSET = """
local function chunked(command, key, from, to)
  local i = from
  while i <= to do
    local j = math.min(i + 199, to)
    redis.call(command, key, unpack(ARGV, i, j))
    i = j + 1
  end
end
local function hset(key, from, to) chunked('HSET', key, from, to) end
local function hdel(key, from, to) chunked('HDEL', key, from, to) end
"""

# ARGV: the string as loaded, then (name, value) pairs.  1 if converted.
_CONVERT = _HSET + """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
hset(KEYS[1], 2, #ARGV)
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""

# ARGV: when ('always', 'absent', 'present'), px, then (name, value) pairs.
_WRITE = _HSET + """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if (ARGV[1] == 'absent' and exists) or (ARGV[1] == 'present' and not exists) then return 0 end
redis.call('DEL', KEYS[1])
hset(KEYS[1], 3, #ARGV)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# ARGV: now, px, 2 x #fields set, (name, value) pairs, #fields removed, names,
# then new flash messages.  0 (nothing written) when the session is gone.
_MERGE = _HSET + """
local k = KEYS[1]
if redis.call('TYPE', k).ok ~= 'hash' then return 0 end
local e = tonumber(redis.call('HGET', k, 'e'))
if not e or e <= tonumber(ARGV[1]) then return 0 end
local i = 4
local n = tonumber(ARGV[3])
hset(k, i, i + n - 1)
i = i + n
n = tonumber(ARGV[i])
hdel(k, i + 1, i + n)
i = i + n + 1
while i <= #ARGV do
  redis.call('HSET', k, 'f:' .. redis.call('HINCRBY', k, 'n', 1), ARGV[i])
  i = i + 1
end
redis.call('PEXPIRE', k, ARGV[2])
return 1
"""



_WHERE = "a session in Redis"  # never the URL: it may hold a password


def _name(prefix: bytes, key: str) -> bytes:
    try:
        return prefix + key.encode()
    except UnicodeEncodeError as e:
        raise SerializationError(
            f"session key {key!r} cannot be stored: {e}. Use str keys without lone surrogates."
        ) from None


def _px(life: float) -> int:
    return max(1, math.ceil(life * 1000))


def _stamp(expires: float) -> bytes:
    return repr(float(expires)).encode()


class HashRecords:
    """``_records.SessionRecords`` on a RedisStore, a HASH per session.

    ``codec`` encodes each value (default: the store's serializer).  ``whole``
    reads a session stored whole as a string (default: the codec's decoding of a
    ``_records.record``), for conversion as it loads.
    """

    __slots__ = ("_codec", "_convert", "_merge", "_redis_error", "_store", "_whole", "_write")

    def __init__(
        self,
        store: RedisStore,
        codec: Codec | None = None,
        whole: Callable[[bytes, float], Stored | None] | None = None,
    ) -> None:
        import redis

        self._store = store
        self._redis_error = redis.exceptions.RedisError
        self._codec = store.codec if codec is None else codec
        self._whole = self._whole_record if whole is None else whole
        # Scripts run on the store's client of the moment (reopen() replaces it).
        client = store.client
        self._convert = client.register_script(_CONVERT)
        self._write = client.register_script(_WRITE)
        self._merge = client.register_script(_MERGE)

    def _whole_record(self, raw: bytes, now: float) -> Stored | None:
        return parse_stored(self._codec.decode(raw, _WHERE), now)

    def _call(self, script: Any, key: str, args: Sequence[Any]) -> Any:
        rkey = self._store.redis_key(key)
        try:
            return script(keys=[rkey], args=args, client=self._store.client)
        except self._redis_error as e:
            self._raise_as_ours(e)

    def _read(self, command: Callable[[bytes], Any], rkey: bytes) -> Any:
        """``command(rkey)``, or None when the key holds another Redis type."""
        try:
            return command(rkey)
        except self._redis_error as e:
            if str(e).startswith("WRONGTYPE"):
                return None
            self._raise_as_ours(e)

    def _raise_as_ours(self, e: BaseException) -> NoReturn:
        """Raise redis-py's error ``e`` as the store's error of our tree (error_for
        has one for every RedisError)."""
        ours = self._store.error_for(e)
        assert ours is not None
        raise ours from e

    def _fields(self, data: Mapping[str, Any], keys: Iterable[str], key: str) -> list[Any]:
        encode = self._codec.encode
        out: list[Any] = []
        for name in keys:
            out += (_name(_DATA, name), encode(key, data[name]))
        return out

    def _flash_fields(self, flashes: Sequence[list[Any]], key: str) -> list[Any]:
        encode = self._codec.encode
        out: list[Any] = []
        for number, item in enumerate(flashes, 1):
            out += (_FLASH + b"%d" % number, encode(key, item))
        return out

    # ------------------------------------------------------------------ SessionRecords

    def load(self, key: str, now: float) -> Stored | None:
        rkey = self._store.redis_key(key)
        for _ in range(2):  # a second time only when a string changed while converting
            # A plain HGETALL, no script: the one command of most requests.
            client = self._store.client
            fields = self._read(client.hgetall, rkey)
            if fields is not None:
                return self._parse(fields, now)
            raw = self._read(client.get, rkey)  # stored whole?
            stored = None if raw is None else self._whole(raw, now)  # None: a list, a set...
            if stored is None:
                return None
            fields = [_EXPIRES, _stamp(stored.expires), b"n", b"%d" % len(stored.flashes)]
            fields += self._fields(stored.data, stored.data, key)
            fields += self._flash_fields(stored.flashes, key)
            if self._call(self._convert, key, [raw, *fields]):
                ids = [_FLASH + b"%d" % n for n in range(1, len(stored.flashes) + 1)]
                return stored._replace(flash_ids=ids)
        return None

    def _parse(self, fields: dict[bytes, bytes], now: float) -> Stored | None:
        """The session in a HASH's ``fields`` ({} when there is none)."""
        decode, where = self._codec.decode, _WHERE
        data: dict[str, Any] = {}
        flashes: list[tuple[int, bytes, list[Any]]] = []
        expires = math.nan
        for name, value in fields.items():
            if name.startswith(_DATA):
                try:
                    data[name[2:].decode()] = decode(value, where)
                except UnicodeDecodeError:
                    continue  # not a name we wrote: not session data
            elif name.startswith(_FLASH):
                item = decode(value, where)
                if is_flash(item) and name[2:].isdigit():
                    flashes.append((int(name[2:]), name, item))
            elif name == _EXPIRES:
                try:
                    expires = float(value)
                except ValueError:
                    return None
        if not now < expires < FAR_FUTURE:  # also NaN: no or a bad expiry
            return None
        flashes.sort()
        return Stored(data, expires, [item for *_, item in flashes], [f for _, f, _ in flashes])

    def write(
        self, key: str, data: Mapping[str, Any], expires: float, flashes: Sequence[list[Any]],
        life: float, when: When = "always",
    ) -> bool:
        args = [when, _px(life), _EXPIRES, _stamp(expires), b"n", b"%d" % len(flashes)]
        args += self._fields(data, data, key)
        args += self._flash_fields(flashes, key)
        return bool(self._call(self._write, key, args))

    def merge(
        self, key: str, data: Mapping[str, Any], changed: Iterable[str], deleted: Iterable[str],
        expires: float, life: float, now: float, consumed: Sequence[Any] = (),
        new_flashes: Sequence[list[Any]] = (),
    ) -> bool:
        fields = [_EXPIRES, _stamp(expires), *self._fields(data, changed, key)]
        gone = [_name(_DATA, name) for name in deleted]
        gone += consumed
        encode = self._codec.encode
        args = [repr(now), _px(life), len(fields), *fields, len(gone), *gone]
        args += [encode(key, item) for item in new_flashes]
        return bool(self._call(self._merge, key, args))

    def refresh(self, key: str, expires: float, life: float, now: float) -> bool:
        args = [repr(now), _px(life), 2, _EXPIRES, _stamp(expires), 0]
        return bool(self._call(self._merge, key, args))

    def delete(self, key: str) -> bool:
        return self._store.delete(key)
