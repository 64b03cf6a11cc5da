"""RedisStore: MmapStore's interface on a Redis server, for more than one machine.

Atomic updates take a short per-key lock (two Lua scripts and a FIFO handoff,
see _redis_lock): ``get_and_set`` waits its turn instead of retrying, and costs
2 commands alone, 3 when it waited.  Expiry is Redis's own (PX).
Each key lives at ``prefix + "{" + key + "}"`` (a Redis Cluster hash tag, see
_redis_keys), so ``clear()`` and ``keys()`` never touch others' keys, and a
key's auxiliary keys share its slot.  The client may be a ``redis.Redis``
(from ``url``, or Sentinel's ``master_for``) or a ``redis.cluster.RedisCluster``:
``keys()``, ``clear()`` and ``stats()`` then cover every primary.

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
    NoSpaceError,
    SerializationError,
    SessionStoreError,
    StoreClosedError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from ._redis_keys import check_prefix, data_key, data_pattern, every_pattern, store_key
from ._redis_lock import DEFAULT_LOCK_LEASE, KeyLock
from ._store import DEFAULT_LOCK_TIMEOUT

__all__ = ["DEFAULT_LOCK_LEASE", "DEFAULT_SOCKET_TIMEOUT", "RedisStore"]

MAX_VALUE_SIZE = 512 << 20  # Redis's limit for a string value
DEFAULT_PREFIX = "prefork_sessions:"
DEFAULT_SOCKET_TIMEOUT = 2.0
"""Seconds a client made from a URL waits to connect, and for each answer."""
RETRIES = 1  # after a failed attempt: a stale pooled connection (server restarted) reconnects
_UNTIMED_WAIT = 1.0  # longest BLPOP for a client without a socket timeout
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
            ours = store.error_for(e)
            if ours is None:
                raise
            raise ours from e

    return call


class RedisStore(StoreBase):
    """A store with MmapStore's interface on Redis (``pip install 'prefork_sessions[redis]'``).

    ``url`` is a redis-py URL (``redis://127.0.0.1:6379/0``), or pass ``client``
    (a ``redis.Redis``, Sentinel's ``master_for(...)`` or a ``RedisCluster``).
    ``expire`` is the default lifetime in seconds (0 = never); ``serializer`` as
    for MmapStore.  ``prefix`` (str or bytes) namespaces the keys (it may not be
    empty nor hold a brace).  ``socket_timeout`` (seconds, DEFAULT_SOCKET_TIMEOUT by default)
    bounds the wait to connect and for each answer, for a client made from
    ``url``; with one retry a call fails within 4 x ``socket_timeout``.  A server
    that cannot be reached raises StoreUnavailableError.  Bad arguments raise
    InvalidArgumentError.

    ``get_and_set`` holds a per-key lock while ``fn`` runs: ``lock_lease``
    (seconds, DEFAULT_LOCK_LEASE) is how long a holder may take before the next
    caller gets the key (a killed holder blocks it no longer than that; a slower
    ``fn`` runs again on the value then current), and ``lock_timeout`` (seconds,
    DEFAULT_LOCK_TIMEOUT) bounds the whole wait: LockTimeoutError after it.
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
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        lock_lease: float = DEFAULT_LOCK_LEASE,
    ) -> None:
        import redis
        import redis.backoff
        import redis.retry

        if not isinstance(url, str):
            raise InvalidArgumentError(f"url={url!r}: give a redis:// URL as a str")
        self._prefix = check_prefix(self._key(prefix))
        super().__init__(expire=expire, serializer=serializer)
        if socket_timeout is not None and client is not None:
            raise InvalidArgumentError(
                "socket_timeout applies to the client made from url; set it on the client you pass"
            )
        seconds = timeout(
            DEFAULT_SOCKET_TIMEOUT if socket_timeout is None else socket_timeout, "socket_timeout"
        )
        self.socket_timeout: float | None = seconds
        """Seconds each answer may take (None: a client passed without one)."""
        self._lock_timeout = timeout(lock_timeout, "lock_timeout")
        self._lock_lease = timeout(lock_lease, "lock_lease")
        self._socket_args: dict[str, Any] = {"socket_timeout": seconds, "socket_connect_timeout": seconds}
        self._redis = redis
        self._down_errors = (
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.ClusterDownError, redis.exceptions.SlotNotCoveredError,
        )
        self.url = url
        self._client: Any = client if client is not None else self._connect()
        self._owns_client = client is None
        self._cluster = isinstance(self._client, redis.cluster.RedisCluster)
        if not self._owns_client:
            self.url = _describe(self._client)
            self.socket_timeout = _socket_timeout_of(self._client)
        self._lock = self._key_lock()
        self._closed = False

    @property
    def client(self) -> Any:
        """The redis-py client in use (a ``Redis`` or a ``RedisCluster``), for
        commands of your own on ``redis_key()``; a new one after ``reopen()``."""
        return self._client

    def redis_key(self, key: str | bytes) -> bytes:
        """The Redis key ``key`` lives under: ``prefix + b"{" + key + b"}"`` (a hash
        tag; an empty key or one starting with ``}`` or a backslash gets a backslash
        first).  Keys of your own for it should be this plus a suffix holding no
        ``}``: they land on its Cluster slot and never clash with a store key.
        Raises StoreClosedError, InvalidArgumentError or ValueTooLargeError for a
        bad key, and ReentrantCallError from a callback, as every method does."""
        return self._k(key)

    # ------------------------------------------------------------------ helpers

    def _k(self, key: object) -> bytes:
        if self._closed:
            raise StoreClosedError("store is closed; call reopen() to use it again")
        if self._busy:
            self._busy.check()
        return data_key(self._prefix, self._key(key))

    def _key_lock(self) -> KeyLock:
        longest = _UNTIMED_WAIT if self.socket_timeout is None else self.socket_timeout / 2
        return KeyLock(self._client, lease=self._lock_lease, timeout=self._lock_timeout, longest_wait=longest)

    def _connect(self) -> Any:
        retry = self._redis.retry.Retry(self._redis.backoff.NoBackoff(), RETRIES)
        return self._redis.Redis.from_url(self.url, retry=retry, **self._socket_args)

    def error_for(self, e: BaseException) -> SessionStoreError | None:
        """The error of our tree that redis-py's error ``e`` means (None for any other
        exception): StoreUnavailableError when the server cannot be reached or cannot
        serve now (a replica, loading, a cluster without a master for the slot);
        NoSpaceError at ``maxmemory``; SerializationError for a key that holds
        another Redis type than this store's operation needs; SessionStoreError else."""
        down = self.unavailable(e)
        if down is not None or not isinstance(e, self._redis.exceptions.RedisError):
            return down
        x, text = self._redis.exceptions, str(e)
        if isinstance(e, (x.ReadOnlyError, x.TryAgainError, x.MasterDownError)):
            return self.unavailable(x.ConnectionError(text))  # a failover, a resharding
        if isinstance(e, x.OutOfMemoryError):
            return NoSpaceError(
                f"Redis is full ({text}); nothing was changed. Raise maxmemory, or choose a "
                "maxmemory-policy that evicts (volatile-lru keeps keys without an expiry)."
            )
        if text.startswith("WRONGTYPE"):
            return SerializationError(
                f"a key holds another Redis type than this operation works on ({text}): it was "
                "written by something else (a session is a HASH: read it through the session "
                "layer). Nothing was changed."
            )
        return SessionStoreError(
            f"Redis refused the command ({type(e).__name__}: {text}); nothing was changed."
        )

    def unavailable(self, e: BaseException) -> StoreUnavailableError | None:
        """The StoreUnavailableError that redis-py's error ``e`` means, or None when
        ``e`` is not about reaching the server."""
        if not isinstance(e, self._down_errors):
            return None
        where = _USERINFO.sub("//", self.url)  # never show a password from the URL
        if self.socket_timeout is None:
            bound = "the client passed has no socket_timeout, so calls may wait forever: give it one"
        elif self._owns_client:
            bound = f"calls give up within {4 * self.socket_timeout:g} s (socket_timeout={self.socket_timeout:g})"
        else:
            bound = f"the client passed waits {self.socket_timeout:g} s per try (socket_timeout)"
        return StoreUnavailableError(
            f"Redis at {where} is unavailable ({type(e).__name__}: {e}); nothing was changed. "
            f"Check that redis-server is running and reachable from this host; {bound}."
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

        Runs ``fn`` holding the key's lock, waiting in line for it (LockTimeoutError
        after ``lock_timeout``).  ``fn`` runs again on the newer value if it outlived
        ``lock_lease`` or a plain ``set``/``delete`` changed the key meanwhile, so
        keep it free of side effects.  If ``fn`` raises, nothing is stored.  With
        ``keep_expiry`` an existing key keeps its remaining lifetime (KEEPTTL).
        """
        k = self._k(key)
        px = self._px(expire)

        def compute(raw: bytes | None) -> tuple[bytes, Any]:
            current = missing if raw is None else self._codec.decode(raw, self.url)
            new = self._busy.run(fn, current)
            return self._encode(key, new), new

        return self._lock.update(k, compute, px, keep_expiry)

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

    def _scan(self, pattern: bytes) -> Iterator[bytes]:
        """The Redis keys matching ``pattern``, from every primary on a cluster
        (redis-py's RedisCluster.scan_iter walks each primary's cursor)."""
        if self._closed:
            raise StoreClosedError("store is closed; call reopen() to use it again")
        found: Iterator[bytes] = self._client.scan_iter(match=pattern, count=1000)
        return found

    @_reaching
    def keys(self) -> list[str | bytes]:
        """The live keys under this store's prefix (str when they decode as UTF-8)."""
        out: list[str | bytes] = []
        for found in self._scan(data_pattern(self._prefix)):
            k = store_key(self._prefix, found)
            try:
                out.append(k.decode())
            except UnicodeDecodeError:
                out.append(k)
        return out

    @_reaching
    def __len__(self) -> int:
        return sum(1 for _ in self._scan(data_pattern(self._prefix)))

    def purge(self) -> int:
        """Redis removes expired keys itself: nothing to do, returns 0."""
        return 0

    @_reaching
    def clear(self) -> None:
        """Remove every key under this store's prefix, auxiliary keys (locks) too."""
        batch: list[bytes] = []
        for k in self._scan(every_pattern(self._prefix)):
            batch.append(k)
            if len(batch) >= 1000:
                self._client.unlink(*batch)
                batch.clear()
        if batch:
            self._client.unlink(*batch)

    @_reaching
    def stats(self) -> RedisStats:
        """This process's hits and misses; server-wide expirations, evictions and
        memory (on a cluster, summed over the primaries)."""
        if self._cluster:
            infos = list(self._client.info(target_nodes=self._redis.cluster.RedisCluster.PRIMARIES).values())
        else:
            infos = [self._client.info()]
        total = {name: sum(info.get(name, 0) for info in infos)
                 for name in ("expired_keys", "evicted_keys", "used_memory", "maxmemory")}
        return {
            "entries": len(self),
            "hits": self._hits,
            "misses": self._misses,
            "expirations": total["expired_keys"],
            "evictions": total["evicted_keys"],
            "recovered_pages": 0,
            "bytes_used": total["used_memory"],
            "capacity": total["maxmemory"],
            "url": self.url,
        }

    def check(self) -> list[str]:
        """Redis keeps its own data sound; this checks that the server (on a
        cluster, every node) answers PING."""
        nodes = self._client.get_nodes() if self._cluster else [None]
        problems = []
        for node in nodes:
            where = _USERINFO.sub("//", self.url) if node is None else f"cluster node {node.name}"
            try:
                answered = self._client.ping() if node is None else self._client.ping(target_nodes=node)
            except Exception as e:
                down = self.unavailable(e)
                if down is None:
                    raise
                problems.append(f"{where}: {down}" if node is not None else str(down))
                continue
            if not answered:
                problems.append(f"{where} did not answer PING")
        return problems

    def reopen(self) -> None:
        """Reconnect (redis-py already replaces its connections in a forked child)."""
        if self._owns_client:
            self._client.close()
            self._client = self._connect()
            self._lock = self._key_lock()
        self._closed = False

    def close(self) -> None:
        """Close the connections; later calls raise StoreClosedError until reopen()."""
        if self._owns_client:
            self._client.close()
        self._closed = True


def _describe(client: Any) -> str:
    """Where a client passed to RedisStore connects, for messages and stats()."""
    nodes = getattr(client, "nodes_manager", None)
    if nodes is not None:  # RedisCluster
        return "Redis Cluster " + ",".join(sorted(nodes.startup_nodes))
    kwargs = client.connection_pool.connection_kwargs
    service = getattr(client.connection_pool, "service_name", None)
    if service is not None:  # Sentinel's master_for
        return f"Sentinel service {service!r}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def _socket_timeout_of(client: Any) -> float | None:
    """The socket timeout a client passed to RedisStore waits per answer (None: forever)."""
    nodes = getattr(client, "nodes_manager", None)
    kwargs = nodes.connection_kwargs if nodes is not None else client.connection_pool.connection_kwargs
    seconds = kwargs.get("socket_timeout")
    return None if seconds is None else float(seconds)
