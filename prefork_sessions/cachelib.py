"""A cachelib cache on the shared store: one cache every gunicorn worker sees, no server.

``MmapCache`` is a ``cachelib.BaseCache``, so Flask-Caching, Flask-Session's
cachelib interface and anything else written against cachelib can use it::

    from prefork_sessions.cachelib import MmapCache
    cache = MmapCache("/var/cache/myapp/cache", default_timeout=300, cache_size=256 << 20)

    # Flask-Caching builds it itself, as MmapCache(*CACHE_ARGS, default_timeout=...,
    # ignore_delete_many_errors=..., **CACHE_OPTIONS), because its import path
    # contains "cachelib":
    CACHE_TYPE = "prefork_sessions.cachelib.MmapCache"
    CACHE_OPTIONS = {"path": "/var/cache/myapp/cache", "cache_size": 256 << 20}

Imported only explicitly (``pip install 'prefork_sessions[cachelib]'``): nothing
else in the package imports cachelib.

Rules
-----
1. cachelib's semantics, not the store's: timeouts go through
   ``BaseCache._normalize_timeout`` (whole seconds or a ``timedelta``; ``None``
   is ``default_timeout``; ``0``, or more than the store's 100 years, never
   expires; a negative one has expired already, as in SimpleCache and
   FileSystemCache: ``set`` drops the key).
2. Values go through ``self.serializer`` (pickle, the format SimpleCache and
   FileSystemCache store; replace it per class or per instance as cachelib
   allows) and are stored as the bytes it returns.
3. ``set`` and ``add`` return False when the value (or key) cannot fit in one
   page or the serializer returns None: logged, nothing stored, the key keeps
   its old value and no other entry is touched, as FileSystemCache and
   RedisCache keep the old value when a write fails.
4. ``add``, ``inc`` and ``dec`` are atomic across threads and processes.  A
   counter keeps the lifetime it has left (as Redis's INCR does); a new one gets
   ``default_timeout``.  Incrementing a value that is not a number raises (the
   TypeError of ``value + delta``, as BaseCache's own ``inc``) and changes nothing.
5. ``key_prefix`` is put before every key; with one, ``clear()`` removes only
   the keys under it (as RedisCache), without one it empties the whole file.
6. One store object per file per process (``_shared.shared_mmap``); a forked
   worker reopens it by itself.  ``path=None`` is ``<tempdir>/prefork_sessions_cachelib``,
   never a session store's file, because ``clear()`` empties the file it is on;
   the session file the gunicorn hooks use (``PREFORK_SESSIONS_PATH``) is refused.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from typing import Any, Final

from cachelib.base import BaseCache
from cachelib.serializers import BaseSerializer

from ._args import MAX_LIFETIME
from ._errors import InvalidArgumentError, ValueTooLargeError
from ._shared import shared_mmap
from ._store import DEFAULT_CACHE_SIZE, MmapStore
from .gunicorn import PATH_ENV

__all__ = ["DEFAULT_FILE_NAME", "MmapCache", "MmapSerializer"]

DEFAULT_FILE_NAME = "prefork_sessions_cachelib"
"""The file ``MmapCache(path=None)`` uses, in ``tempfile.gettempdir()``."""
_STORE_OPTIONS = frozenset({"page_size", "lock_timeout"})

_log = logging.getLogger(__name__)
_MISSING: Final = object()  # what get_and_set hands inc() for an absent key


class MmapSerializer(BaseSerializer):
    """Default serializer for MmapCache: pickle, as SimpleCache and FileSystemCache."""


class MmapCache(BaseCache):
    """A cachelib cache in one memory-mapped file shared by every process that opens it.

    ``path`` is the store file (default ``<tempdir>/prefork_sessions_cachelib``);
    ``cache_size`` (bytes, default 64 MiB) and the store options ``page_size``
    (bytes: the largest value is a little under one page) and ``lock_timeout``
    (seconds) only matter when the file is created.  ``default_timeout``
    (seconds or ``timedelta``, ``0`` = never) is cachelib's.  Raises
    InvalidArgumentError for an unknown option, a negative ``default_timeout`` or
    the gunicorn hooks' session file, and the store's errors when the file cannot be opened.
    """

    serializer: BaseSerializer = MmapSerializer()

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        default_timeout: int | dt.timedelta = 300,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        key_prefix: str | None = "",
        ignore_delete_many_errors: bool = True,
        **store_options: Any,
    ) -> None:
        unknown = sorted(set(store_options) - _STORE_OPTIONS)
        if unknown:
            raise InvalidArgumentError(
                f"MmapCache got unknown option(s) {', '.join(unknown)}; it takes path, "
                "default_timeout, cache_size, key_prefix, ignore_delete_many_errors and the "
                f"store options {', '.join(sorted(_STORE_OPTIONS))} (values are always cachelib's "
                "serializer's bytes, lifetimes always cachelib's timeouts)"
            )
        super().__init__(default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        if self.default_timeout < 0:
            raise InvalidArgumentError(
                f"default_timeout={default_timeout!r}: use 0 (never expire) or a positive number "
                "of seconds; with a negative one nothing would ever be kept"
            )
        if key_prefix is None:
            key_prefix = ""
        if not isinstance(key_prefix, str):
            raise InvalidArgumentError(f"key_prefix={key_prefix!r}: use a str")
        self.key_prefix = key_prefix
        where = os.path.join(tempfile.gettempdir(), DEFAULT_FILE_NAME) if path is None else os.fspath(path)
        sessions = os.environ.get(PATH_ENV)
        if sessions and os.path.abspath(sessions) == os.path.abspath(where):
            raise InvalidArgumentError(
                f"MmapCache path {where} is the session store's file ({PATH_ENV}), and clear() "
                "empties the whole file: give the cache a file of its own"
            )
        self._store = shared_mmap(where, serializer="raw", cache_size=cache_size, **store_options)

    @property
    def store(self) -> MmapStore:
        """The MmapStore under the cache (``store.stats()`` tells whether the file is big enough)."""
        return self._store

    def __repr__(self) -> str:
        return f"<MmapCache {self._store.path!r} key_prefix={self.key_prefix!r}>"

    def _key(self, key: str) -> str:
        if not isinstance(key, str):
            raise InvalidArgumentError(f"cachelib keys are str, not {type(key).__name__}")
        return self.key_prefix + key

    def _life(self, timeout: int | dt.timedelta | None) -> int:
        """Seconds for the store (0: never); negative: expired already."""
        seconds = self._normalize_timeout(timeout)
        return 0 if seconds > MAX_LIFETIME else seconds  # the store's limit; as Django's backend

    def _refused(self, key: str, error: Exception) -> bool:
        _log.warning("MmapCache on %s did not store %r: %s", self._store.path, key, error)
        return False

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> Any:
        found = self._store.get(self._key(key))
        return None if found is None else self.serializer.loads(found)

    def has(self, key: str) -> bool:
        return self._key(key) in self._store

    # ------------------------------------------------------------------ writes

    def set(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        k = self._key(key)
        life = self._life(timeout)
        data = self.serializer.dumps(value)
        if data is None:  # the serializer could not pickle it, and logged why
            return False
        if life < 0:
            self._store.delete(k)
            return True
        try:
            self._store.set(k, data, life)
        except ValueTooLargeError as e:
            return self._refused(key, e)
        return True

    def add(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        k = self._key(key)
        life = self._life(timeout)
        data = self.serializer.dumps(value)
        if data is None:
            return False
        if life < 0:  # added and expired at once, if the key was free
            return k not in self._store
        try:
            return self._store.add(k, data, life)
        except ValueTooLargeError as e:
            return self._refused(key, e)

    def delete(self, key: str) -> bool:
        return self._store.delete(self._key(key))

    def clear(self) -> bool:
        if not self.key_prefix:
            self._store.clear()
            return True
        for k in self._store:
            if isinstance(k, str) and k.startswith(self.key_prefix):
                self._store.delete(k)
        return True

    def inc(self, key: str, delta: int = 1) -> int | None:
        serializer = self.serializer
        new = 0

        def bump(current: Any) -> bytes:
            nonlocal new
            new = (0 if current is _MISSING else serializer.loads(current) or 0) + delta
            data = serializer.dumps(new)
            if data is None:
                raise _Unstorable
            return data

        try:
            self._store.get_and_set(self._key(key), bump, self._life(None),
                                    missing=_MISSING, keep_expiry=True)
        except _Unstorable:
            return None
        return new

    def dec(self, key: str, delta: int = 1) -> int | None:
        return self.inc(key, -delta)


class _Unstorable(Exception):
    """The serializer returned None for a counter's new value: store nothing."""
