"""RedisStore: MmapStore's interface on a Redis server, for more than one machine.

Atomic updates use optimistic transactions (WATCH/MULTI/EXEC): ``get_and_set``
reads, runs ``fn``, and commits only if nobody changed the key meanwhile,
otherwise it runs ``fn`` again on the newer value.  Expiry is Redis's own (PX).
Keys live under ``prefix`` so ``clear()`` and ``keys()`` never touch others'.

Outages: every call that cannot reach the server raises StoreUnavailableError
(also the builtin ConnectionError; redis-py's own is not), and never waits
without bound: a client made from ``url`` has ``socket_timeout`` and
``socket_connect_timeout`` of DEFAULT_SOCKET_TIMEOUT seconds and one retry, so a
call fails within 2 x (connect + command) timeouts, 8 s by default.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from ._args import lifetime, timeout
from ._base import RedisStats, StoreBase
from ._errors import (
    InvalidArgumentError,
    StoreClosedError,
    StoreUnavailableError,
    ValueTooLargeError,
)

__all__ = ["DEFAULT_SOCKET_TIMEOUT", "RedisStore"]

MAX_VALUE_SIZE = 512 << 20  # Redis's limit for a string value
DEFAULT_PREFIX = "prefork_sessions:"
DEFAULT_SOCKET_TIMEOUT = 2.0
"""Seconds a client made from a URL waits to connect, and for each answer."""
RETRIES = 1  # after a failed attempt: a stale pooled connection (server restarted) reconnects
_USERINFO = re.compile(r"//[^@/]*@")

P = ParamSpec("P")
R = TypeVar("R")


def _reaching(method: Callable[P, R]) -> Callable[P, R]:
    """``method`` with redis-py's connection and timeout errors raised as
    StoreUnavailableError (the cause chained)."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except Exception as e:
            store = args[0]
            assert isinstance(store, RedisStore)
            down = store.unavailable(e)
            if down is None:
                raise
            raise down from e

    return call


class RedisStore(StoreBase):
    """A store with MmapStore's interface on Redis (``pip install 'prefork_sessions[redis]'``).

    ``url`` is a redis-py URL (``redis://127.0.0.1:6379/0``), or pass ``client``.
    ``expire`` is the default lifetime in seconds (0 = never); ``serializer`` as
    for MmapStore.  ``prefix`` (str or bytes) namespaces the keys (it may not be
    empty).  ``socket_timeout`` (seconds, DEFAULT_SOCKET_TIMEOUT by default)
    bounds the wait to connect and for each answer, for a client made from
    ``url``; with one retry a call fails within 4 x ``socket_timeout``.  A server
    that cannot be reached raises StoreUnavailableError.  Bad arguments raise
    InvalidArgumentError.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        client: Any = None,
        prefix: str | bytes = DEFAULT_PREFIX,
        expire: float = 0,
        serializer: Any = "json",
        socket_timeout: float | None = None,
    ) -> None:
        import redis
        import redis.backoff
        import redis.retry

        if not isinstance(url, str):
            raise InvalidArgumentError(f"url={url!r}: give a redis:// URL as a str")
        self._prefix = self._key(prefix)
        if not self._prefix:
            raise InvalidArgumentError("prefix may not be empty: clear() would empty the whole Redis database")
        super().__init__(expire=expire, serializer=serializer)
        if socket_timeout is not None and client is not None:
            raise InvalidArgumentError(
                "socket_timeout applies to the client made from url; set it on the client you pass"
            )
        seconds = timeout(
            DEFAULT_SOCKET_TIMEOUT if socket_timeout is None else socket_timeout, "socket_timeout"
        )
        self.socket_timeout = seconds
        self._socket_args: dict[str, Any] = {"socket_timeout": seconds, "socket_connect_timeout": seconds}
        self._redis = redis
        self._down_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self.url = url
        self._client: Any = client if client is not None else self._connect()
        self._owns_client = client is None
        self._closed = False

    # ------------------------------------------------------------------ helpers

    def _k(self, key: object) -> bytes:
        if self._closed:
            raise StoreClosedError("store is closed; call reopen() to use it again")
        if self._busy:
            self._busy.check()
        return self._prefix + self._key(key)

    def _connect(self) -> Any:
        retry = self._redis.retry.Retry(self._redis.backoff.NoBackoff(), RETRIES)
        return self._redis.Redis.from_url(self.url, retry=retry, **self._socket_args)

    def unavailable(self, e: BaseException) -> StoreUnavailableError | None:
        """The StoreUnavailableError that redis-py's error ``e`` means, or None when
        ``e`` is not about reaching the server."""
        if not isinstance(e, self._down_errors):
            return None
        where = _USERINFO.sub("//", self.url)  # never show a password from the URL
        return StoreUnavailableError(
            f"Redis at {where} is unavailable ({type(e).__name__}: {e}); nothing was changed. "
            "Check that redis-server is running and reachable from this host; calls give up "
            f"within {4 * self.socket_timeout:g} s (socket_timeout={self.socket_timeout:g})."
        )

    def _encode(self, key: object, value: Any) -> bytes:
        vb = self._codec.encode(key, value)
        if len(vb) > MAX_VALUE_SIZE:
            raise ValueTooLargeError(f"value of {len(vb)} bytes exceeds Redis's limit of {MAX_VALUE_SIZE} bytes")
        return vb

    def _px(self, expire: float | None) -> int | None:
        life = self._expire if expire is None else lifetime(expire)
        return math.ceil(life * 1000) if life else None

    # ------------------------------------------------------------------ API

    @_reaching
    def get(self, key: str | bytes, default: Any = None) -> Any:
        raw = self._client.get(self._k(key))
        if raw is None:
            self._misses += 1
            return default
        self._hits += 1
        return self._codec.decode(raw, self.url)

    @_reaching
    def __contains__(self, key: object) -> bool:
        return bool(self._client.exists(self._k(key)))

    @_reaching
    def set(self, key: str | bytes, value: Any, expire: float | None = None) -> None:
        k = self._k(key)
        self._client.set(k, self._encode(key, value), px=self._px(expire))

    @_reaching
    def delete(self, key: str | bytes) -> bool:
        return bool(self._client.delete(self._k(key)))

    @_reaching
    def get_and_set(
        self, key: str | bytes, fn: Callable[[Any], Any], expire: float | None = None, *,
        missing: Any = None, keep_expiry: bool = False,
    ) -> Any:
        """Atomically store and return ``fn(current value)`` (``missing`` when absent).

        Optimistic: if another client changes the key while ``fn`` runs, ``fn``
        runs again on the new value, so keep it free of side effects.  If ``fn``
        raises, nothing is stored.  With ``keep_expiry`` an existing key keeps its
        remaining lifetime (SET ... KEEPTTL).
        """
        k = self._k(key)
        px = self._px(expire)
        with self._client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(k)
                    raw: bytes | None = pipe.get(k)
                    current = missing if raw is None else self._codec.decode(raw, self.url)
                    new = self._busy.run(fn, current)
                    vb = self._encode(key, new)
                    pipe.multi()
                    if keep_expiry and raw is not None:
                        pipe.set(k, vb, keepttl=True)
                    else:
                        pipe.set(k, vb, px=px)
                    pipe.execute()
                    return new
                except self._redis.WatchError:
                    continue

    @_reaching
    def add(self, key: str | bytes, value: Any, expire: float | None = None) -> bool:
        k = self._k(key)
        return bool(self._client.set(k, self._encode(key, value), px=self._px(expire), nx=True))

    @_reaching
    def touch(self, key: str | bytes, expire: float | None = None) -> bool:
        k = self._k(key)
        px = self._px(expire)
        if px is not None:
            return bool(self._client.pexpire(k, px))
        with self._client.pipeline() as pipe:  # PERSIST alone says 0 for a key without expiry too
            found, _ = pipe.exists(k).persist(k).execute()
        return bool(found)

    @_reaching
    def ttl(self, key: str | bytes) -> float | None:
        ms = self._client.pttl(self._k(key))
        if ms == -2:
            return None
        return math.inf if ms == -1 else ms / 1000

    def _scan(self) -> Iterator[bytes]:
        if self._closed:
            raise StoreClosedError("store is closed; call reopen() to use it again")
        found: Iterator[bytes] = self._client.scan_iter(match=_glob_escape(self._prefix) + b"*", count=1000)
        return found

    @_reaching
    def keys(self) -> list[str | bytes]:
        """The live keys under this store's prefix (str when they decode as UTF-8)."""
        out: list[str | bytes] = []
        n = len(self._prefix)
        for k in self._scan():
            try:
                out.append(k[n:].decode())
            except UnicodeDecodeError:
                out.append(k[n:])
        return out

    @_reaching
    def __len__(self) -> int:
        return sum(1 for _ in self._scan())

    def purge(self) -> int:
        """Redis removes expired keys itself: nothing to do, returns 0."""
        return 0

    @_reaching
    def clear(self) -> None:
        """Remove every key under this store's prefix."""
        batch: list[bytes] = []
        for k in self._scan():
            batch.append(k)
            if len(batch) >= 1000:
                self._client.unlink(*batch)
                batch.clear()
        if batch:
            self._client.unlink(*batch)

    @_reaching
    def stats(self) -> RedisStats:
        """This process's hits and misses; server-wide expirations, evictions and memory."""
        info = self._client.info()
        return {
            "entries": len(self),
            "hits": self._hits,
            "misses": self._misses,
            "expirations": info.get("expired_keys", 0),
            "evictions": info.get("evicted_keys", 0),
            "recovered_pages": 0,
            "bytes_used": info.get("used_memory", 0),
            "capacity": info.get("maxmemory", 0),
            "url": self.url,
        }

    def check(self) -> list[str]:
        """Redis keeps its own data sound; this checks the server answers."""
        try:
            answered = self._client.ping()
        except Exception as e:
            down = self.unavailable(e)
            if down is None:
                raise
            return [str(down)]
        return [] if answered else [f"{_USERINFO.sub('//', self.url)} did not answer PING"]

    def reopen(self) -> None:
        """Reconnect (redis-py already replaces its connections in a forked child)."""
        if self._owns_client:
            self._client.close()
            self._client = self._connect()
        self._closed = False

    def close(self) -> None:
        """Close the connections; later calls raise StoreClosedError until reopen()."""
        if self._owns_client:
            self._client.close()
        self._closed = True


def _glob_escape(b: bytes) -> bytes:
    out = bytearray()
    for c in b:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)
