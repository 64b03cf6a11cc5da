"""Django cache backend on the shared store: ``prefork_sessions.django.MmapCache``.

::

    CACHES = {"default": {
        "BACKEND": "prefork_sessions.django.MmapCache",
        "LOCATION": "/var/cache/mysite/cache",  # the store file, the cache's own
        "TIMEOUT": 300,
        "OPTIONS": {"cache_size": 256 << 20},   # MmapStore options, used when the file is created
    }}

Rules
-----
1. ``LOCATION`` is the store file.  Every alias, thread and worker that names it
   shares the process's one MmapStore on it (``_shared.shared_mmap``, serializer
   ``"raw"``).  ``close()``, which Django calls after every request, only lets go
   of this object's reference: the store stays open and mapped for the others,
   and the next call finds it again.
2. ``OPTIONS`` are ``cache_size``, ``page_size`` (bytes) and ``lock_timeout``
   (seconds), passed to MmapStore (the first two matter only when the file is
   created).  ``MAX_ENTRIES`` and ``CULL_FREQUENCY``, which ``BaseCache`` reads,
   are accepted and have no effect: a page makes room by dropping expired, then
   least recently used entries, as many as the new entry needs
   (``stats()["evictions"]`` counts live ones dropped).  Any other key is an error.
3. Values are pickled with ``pickle.HIGHEST_PROTOCOL``, as LocMemCache does, ints
   too (``set`` and ``add`` pickle before any lock is taken).  A value too large for a page raises the
   store's ValueTooLargeError from ``set`` and ``add`` (the key keeps its old
   value); ``set_many`` stores the others and returns the keys that did not fit.
4. Timeouts: ``DEFAULT_TIMEOUT`` means ``TIMEOUT``; ``None`` never expires; ``0``
   or less keeps nothing, as Django's own backends: ``set`` deletes the key,
   ``add`` stores nothing and returns whether the key was absent, ``touch``
   deletes it and returns whether it was there.  More than the store's 100 years
   means never.
5. ``incr``/``decr`` are one ``get_and_set`` each: atomic across threads and
   processes, and the entry keeps the lifetime it has left.  A missing key raises
   ValueError, as in every Django backend.
6. ``clear()`` empties the whole file, whatever ``KEY_PREFIX`` and ``VERSION``:
   give the cache a file of its own, never a session store's.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]  # Django ships no type hints
from django.core.cache.backends.base import (  # type: ignore[import-untyped]
    DEFAULT_TIMEOUT,
    BaseCache,
)

from ._args import MAX_LIFETIME
from ._base import MmapStats
from ._errors import InvalidArgumentError, ValueTooLargeError
from ._shared import shared_mmap
from ._store import NEVER, MmapStore

__all__ = ["MmapCache"]

_STORE_OPTIONS = frozenset({"cache_size", "page_size", "lock_timeout"})
_BASE_OPTIONS = frozenset({"MAX_ENTRIES", "CULL_FREQUENCY"})  # BaseCache reads them; no effect here
_SESSION_ENGINE = "prefork_sessions.django"


class _Missing(Exception):
    """Raised inside incr's get_and_set callback for an absent key: nothing is written."""


def _store_options(options: object) -> dict[str, Any]:
    """The MmapStore options in ``OPTIONS``, or InvalidArgumentError."""
    if not isinstance(options, Mapping):
        raise InvalidArgumentError(
            f"MmapCache OPTIONS must be a dict, not {type(options).__name__}: "
            'e.g. {"cache_size": 256 << 20}'
        )
    unknown = sorted(map(str, set(options) - _STORE_OPTIONS - _BASE_OPTIONS))
    if unknown:
        raise InvalidArgumentError(
            f"MmapCache OPTIONS has unknown keys {unknown}: use {sorted(_STORE_OPTIONS)} "
            f"({sorted(_BASE_OPTIONS)} are accepted but have no effect: room is made by LRU)"
        )
    return {k: v for k, v in options.items() if k in _STORE_OPTIONS}


def _store_file(location: object) -> str:
    """``LOCATION`` as an absolute path, or InvalidArgumentError."""
    if not location or not isinstance(location, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"MmapCache LOCATION={location!r}: name the cache's own store file, "
            'e.g. "LOCATION": "/var/cache/mysite/cache"'
        )
    path = os.path.abspath(os.fsdecode(location))
    if not settings.configured:  # made by hand, outside a Django project
        return path
    if getattr(settings, "SESSION_ENGINE", None) == _SESSION_ENGINE:
        from .django import session_store_path  # imports this module: here, not at the top

        if session_store_path() == path:
            raise InvalidArgumentError(
                f"MmapCache LOCATION {path} is the session store's file (PREFORK_SESSIONS, or "
                "its default), and cache.clear() empties the whole file: give the cache a "
                "file of its own"
            )
    return path


def _lifetime(timeout: Any) -> float | None:
    """The store lifetime for a Django timeout (not DEFAULT_TIMEOUT): None to keep
    nothing (0 or less), NEVER for None or more than MAX_LIFETIME, else seconds."""
    if timeout is None:
        return NEVER
    if type(timeout) is not int and type(timeout) is not float:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            raise InvalidArgumentError(
                f"timeout={timeout!r}: give a number of seconds, None for no expiry, "
                "or 0 to keep nothing"
            )
        timeout = float(timeout)
    if timeout <= 0:
        return None
    if timeout > MAX_LIFETIME:  # infinity too
        return NEVER
    if math.isnan(timeout):
        raise InvalidArgumentError("timeout=nan: give a number of seconds, or None for no expiry")
    return float(timeout)


class MmapCache(BaseCache):  # type: ignore[misc]  # BaseCache is untyped (Any)
    """Django's ``BaseCache`` on one MmapStore file shared by every worker: see the module's rules.

    Raises InvalidArgumentError for a bad ``LOCATION`` or ``OPTIONS``, and the
    store's own errors (StorePathError, UnsafeFileError...) when the file cannot be used.
    """

    pickle_protocol = pickle.HIGHEST_PROTOCOL

    def __init__(self, location: object, params: dict[str, Any]) -> None:
        options = _store_options(params.get("OPTIONS", {}))
        super().__init__(params)
        self._path = _store_file(location)
        self._options = options
        self._store: MmapStore | None = None
        self._open()  # a file that cannot be used fails here, not in the first request

    def _open(self) -> MmapStore:
        self._store = store = shared_mmap(self._path, serializer="raw", **self._options)
        return store

    def _use(self) -> MmapStore:
        """The store, found again after close().  (Not ``self._store or ...``: a
        store's truth value is its length, which counts every entry.)"""
        store = self._store
        return self._open() if store is None else store

    def _life(self, timeout: Any) -> float | None:
        return _lifetime(self.default_timeout if timeout is DEFAULT_TIMEOUT else timeout)

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        k = self.make_and_validate_key(key, version=version)
        pickled = pickle.dumps(value, self.pickle_protocol)
        life = self._life(timeout)
        store = self._use()
        if life is None:
            return k not in store
        return store.add(k, pickled, life)

    def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
        k = self.make_and_validate_key(key, version=version)
        found = self._use().get(k)
        return default if found is None else pickle.loads(found)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> None:
        k = self.make_and_validate_key(key, version=version)
        pickled = pickle.dumps(value, self.pickle_protocol)
        life = self._life(timeout)
        store = self._use()
        if life is None:
            store.delete(k)
        else:
            store.set(k, pickled, life)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        k = self.make_and_validate_key(key, version=version)
        life = self._life(timeout)
        store = self._use()
        return store.delete(k) if life is None else store.touch(k, life)

    def delete(self, key: Any, version: Any = None) -> bool:
        k = self.make_and_validate_key(key, version=version)
        return self._use().delete(k)

    def has_key(self, key: Any, version: Any = None) -> bool:
        k = self.make_and_validate_key(key, version=version)
        return k in self._use()

    def incr(self, key: Any, delta: int = 1, version: Any = None) -> Any:
        k = self.make_and_validate_key(key, version=version)
        protocol = self.pickle_protocol
        new: Any = None

        def add_delta(current: bytes | None) -> bytes:
            nonlocal new
            if current is None:  # stored values are pickles, never None: None is a missing key
                raise _Missing
            new = pickle.loads(current) + delta
            return pickle.dumps(new, protocol)

        try:
            self._use().get_and_set(k, add_delta, keep_expiry=True)
        except _Missing:
            # A plain ValueError, as every Django backend raises here.
            raise ValueError(
                f"Key {key!r} not found (missing or expired): incr() and decr() change an "
                "existing number; add(key, 0) first"
            ) from None
        return new

    def get_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        store = self._use()
        found: dict[Any, Any] = {}
        for key in keys:
            value = store.get(self.make_and_validate_key(key, version=version))
            if value is not None:
                found[key] = pickle.loads(value)
        return found

    def set_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> list[Any]:
        """Store every item; returns the keys whose value was too large for a page
        (each keeps its old value).  Pickles them all first, so an unpicklable one
        raises before anything is stored."""
        protocol = self.pickle_protocol
        items = [(key, self.make_and_validate_key(key, version=version), pickle.dumps(v, protocol))
                 for key, v in data.items()]
        life = self._life(timeout)
        store = self._use()
        failed: list[Any] = []
        for key, k, pickled in items:
            if life is None:
                store.delete(k)
                continue
            try:
                store.set(k, pickled, life)
            except ValueTooLargeError:
                failed.append(key)
        return failed

    def delete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        store = self._use()
        for key in keys:
            store.delete(self.make_and_validate_key(key, version=version))

    def clear(self) -> None:
        """Empty the whole store file (every prefix and version, and anything else in it)."""
        self._use().clear()

    def close(self, **kwargs: Any) -> None:
        """Let go of this object's reference to the store; never closes or unmaps
        it (other threads' cache objects share it).  The next call finds it again."""
        self._store = None

    def stats(self) -> MmapStats:
        """The store file's counters (``MmapStore.stats()``): ``evictions`` counts
        live entries dropped for room; if it keeps growing, the file is too small."""
        return self._use().stats()
