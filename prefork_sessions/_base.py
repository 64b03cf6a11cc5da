"""What both stores share: the public contract, the argument handling they agree on,
the re-entry guard around ``get_and_set`` callbacks, and the typed ``stats()``.

``StoreBase`` writes the interface down once; ``MmapStore`` and ``RedisStore``
each implement it.  Hot paths in the stores read the attributes set here
(``_busy``, ``_codec``, ``_expire``, the counters) directly, never through a
method of this class, so sharing costs them nothing.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator
from typing import Any, Self, TypedDict

from ._args import key_bytes, lifetime
from ._errors import ReentrantCallError
from ._serializers import Codec

__all__ = ["CallbackThreads", "MmapStats", "RedisStats", "StoreBase", "StoreStats"]


class StoreStats(TypedDict):
    """What ``stats()`` reports on every store."""

    entries: int
    """Live entries now stored."""
    hits: int
    """This process's ``get()`` calls that found a value (since the store object was made)."""
    misses: int
    """This process's ``get()`` calls that found none (missing or expired)."""
    expirations: int
    """Entries removed because they expired (the file's total; on Redis, the server's)."""
    evictions: int
    """Unexpired entries dropped to make room: if it grows, the store is too small."""
    recovered_pages: int
    """Pages repaired after a writer died mid-change (always 0 on Redis)."""
    bytes_used: int
    """Bytes of keys, values and entry headers stored (on Redis, the server's ``used_memory``)."""
    capacity: int
    """Bytes the entries may fill (on Redis, ``maxmemory``; 0 means no limit)."""


class MmapStats(StoreStats):
    """``MmapStore.stats()``: the common counters plus the file's geometry."""

    pages: int
    """Pages in the file."""
    page_size: int
    """Bytes per page."""
    max_value_size: int
    """The largest value (serialised bytes) that fits, for a key of 64 bytes."""
    path: str
    """The store file."""


class RedisStats(StoreStats):
    """``RedisStore.stats()``: the common counters plus the server."""

    url: str
    """The redis-py URL the store was given."""


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


class StoreBase(abc.ABC):
    """The interface both stores offer, and the state they share.

    ``expire`` is the default lifetime in seconds (``0`` = never); ``serializer``
    is ``"json"``, ``"raw"``, ``"pickle"`` or an object with ``dumps``/``loads``.
    Both raise InvalidArgumentError when bad.  Keys are str or bytes by the rules
    of ``_args.key_bytes``, the same on every store.
    """

    serializer: str
    """The serializer's name."""

    def __init__(self, *, expire: float, serializer: Any) -> None:
        self._codec = Codec(serializer)
        self.serializer = self._codec.name
        self._expire = lifetime(expire)
        self._busy = CallbackThreads()
        self._hits = self._misses = 0

    @property
    def codec(self) -> Codec:
        """The store's serializer, resolved: ``encode``/``decode`` raise SerializationError."""
        return self._codec

    @staticmethod
    def _key(key: object) -> bytes:
        """``key`` as the bytes it is stored under; raises for a key no store accepts."""
        return key_bytes(key)[0]

    # ------------------------------------------------------------------ the contract

    @abc.abstractmethod
    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when missing or expired."""

    @abc.abstractmethod
    def set(self, key: str | bytes, value: Any, expire: float | None = None) -> None:
        """Store ``value`` under ``key``; ``expire`` in seconds (None: store default; 0: never).

        Raises ValueTooLargeError or SerializationError, and the old value stays.
        """

    @abc.abstractmethod
    def get_and_set(
        self, key: str | bytes, fn: Callable[[Any], Any], expire: float | None = None, *,
        missing: Any = None, keep_expiry: bool = False,
    ) -> Any:
        """Atomically store and return ``fn(current value)``.

        ``fn`` gets ``missing`` when the key is absent or expired: pass a sentinel
        of your own to tell that apart from a stored None.  ``expire`` sets the
        entry's lifetime; with ``keep_expiry`` an existing entry keeps the lifetime
        it has left (``expire`` then applies only to a new one).  Calling the store
        from ``fn`` raises ReentrantCallError; if ``fn`` raises, nothing is stored.
        """

    @abc.abstractmethod
    def add(self, key: str | bytes, value: Any, expire: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired, atomically; True if stored.

        Raises ValueTooLargeError or SerializationError as ``set`` does.
        """

    @abc.abstractmethod
    def touch(self, key: str | bytes, expire: float | None = None) -> bool:
        """Give ``key`` a new lifetime (None: the store default; 0: never), its value
        untouched; False if it is absent or expired."""

    @abc.abstractmethod
    def ttl(self, key: str | bytes) -> float | None:
        """Seconds ``key`` has left: None if absent or expired, ``math.inf`` if it
        never expires."""

    @abc.abstractmethod
    def delete(self, key: str | bytes) -> bool:
        """Remove ``key``; True if a live (unexpired) entry was removed."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether a live (unexpired) entry is stored under ``key``."""

    @abc.abstractmethod
    def keys(self) -> list[str | bytes]:
        """The live keys, as str or bytes."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many live keys there are."""

    def __iter__(self) -> Iterator[str | bytes]:
        return iter(self.keys())

    @abc.abstractmethod
    def purge(self) -> int:
        """Remove expired entries; returns how many were removed."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every entry of this store."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """The counters of ``StoreStats`` (each store adds its own keys)."""

    @abc.abstractmethod
    def check(self) -> list[str]:
        """The problems found (and repaired where the store can); empty when sound."""

    @abc.abstractmethod
    def reopen(self) -> None:
        """Open again after ``close()`` or in a forked child."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of the store's resources; later calls raise StoreClosedError until ``reopen()``."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
