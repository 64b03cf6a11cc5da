"""Django session engine on the shared store: ``SESSION_ENGINE = "prefork_sessions.django"``.

Settings (every key optional)::

    PREFORK_SESSIONS = {
        "path": None,        # the store file; None: <tempdir>/<project>_django_session_data
        "cache_size": 64 << 20,  # bytes, used when the file is created
        "redis_url": None,   # "redis://host:6379/0": sessions in Redis, no file
    }

``<project>`` is the first dotted part of ``ROOT_URLCONF`` (``mysite`` for
``mysite.urls``), ``prefork`` without one.  Each process opens one store per file
(or URL) and shares it between threads; a forked worker reopens it by itself,
and ``prefork_sessions.gunicorn.post_fork`` opens it at once.

Rules
-----
1. The store never holds a session key: a record lives under
   ``django.session:`` + keyed BLAKE2b-256 of the key, the BLAKE2b key derived
   from ``SECRET_KEY``; whoever reads the 0640 file learns no usable cookie.
   Rotating ``SECRET_KEY`` ends every session (fallbacks are not consulted).
2. A record is ``SessionBase.encode(data)`` (Django's signed, serialised form,
   ``SESSION_SERIALIZER``) and expires in the store after ``get_expiry_age()``
   seconds; an age of 0 or less expires it at once (nothing is stored).
3. ``save(must_create=True)`` writes only if the key is unused, atomically
   (``get_and_set``), else ``CreateError``.  Any other save writes only if the
   record still exists, else ``UpdateError``: a session deleted by a concurrent
   logout is never brought back.
4. A save of a loaded session is a key-level merge into the latest record: the
   keys this request changed or deleted (compared with the record as loaded) are
   applied to it, so concurrent requests changing different keys keep both.
5. ``load()`` of an unknown, expired or undecodable record returns ``{}`` and
   drops the key, so the next save makes a new one; it never creates a record.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]  # Django ships no type hints
from django.contrib.sessions.backends.base import (  # type: ignore[import-untyped]
    CreateError,
    SessionBase,
    UpdateError,
)

from ._base import StoreBase
from ._errors import InvalidArgumentError, SessionStoreError
from ._redis import RedisStore
from ._store import DEFAULT_CACHE_SIZE, MmapStore, default_path

__all__ = ["KEY_PREFIX", "SETTING", "SessionStore", "close_stores", "get_store", "store_key"]

SETTING = "PREFORK_SESSIONS"
KEY_PREFIX = "django.session:"
_KEYS = frozenset({"path", "cache_size", "redis_url"})
# Personalisation of the BLAKE2b that turns SECRET_KEY into the digest key, so
# the key differs from every other use Django makes of SECRET_KEY.
_SECRET_PERSON = b"pfs.django"
_CREATE_TRIES = 100  # a CreateError means a concurrent creator took the same random key

_stores: dict[tuple[str, Any], StoreBase] = {}
_stores_lock = threading.Lock()
_digest_keys: dict[str, bytes] = {}


class _Refused(Exception):
    """Raised inside get_and_set so that nothing is written."""


def _options() -> tuple[str | None, int, str | None]:
    """(path, cache_size, redis_url) from settings.PREFORK_SESSIONS, checked."""
    conf = getattr(settings, SETTING, None) or {}
    if not isinstance(conf, Mapping):
        raise InvalidArgumentError(
            f"settings.{SETTING} must be a dict, not {type(conf).__name__}: "
            f'e.g. {{"path": "/run/myapp/sessions"}}'
        )
    unknown = sorted(map(str, set(conf) - _KEYS))
    if unknown:
        raise InvalidArgumentError(
            f"settings.{SETTING} has unknown keys {unknown}: use {sorted(_KEYS)}"
        )
    path, url = conf.get("path"), conf.get("redis_url")
    if path is not None and url is not None:
        raise InvalidArgumentError(
            f"settings.{SETTING} gives both 'path' and 'redis_url': keep the one store to use"
        )
    if url is not None and not isinstance(url, str):
        raise InvalidArgumentError(
            f"settings.{SETTING}['redis_url'] must be a redis:// URL str, not {url!r}"
        )
    return path, conf.get("cache_size", DEFAULT_CACHE_SIZE), url


def _default_path() -> str:
    project = str(getattr(settings, "ROOT_URLCONF", "") or "").split(".")[0]
    return default_path(f"{project if project.isidentifier() else 'prefork'}_django")


def get_store() -> StoreBase:
    """The store ``settings.PREFORK_SESSIONS`` names, opened once per process.

    Raises InvalidArgumentError for a bad setting, and the store's own errors
    (StorePathError, UnsafeFileError...) when the file cannot be used.
    """
    path, cache_size, url = _options()
    where = url if url is not None else path or _default_path()
    ident = ("redis" if url is not None else "mmap", where)
    store = _stores.get(ident)
    if store is None:
        with _stores_lock:
            store = _stores.get(ident)
            if store is None:
                if url is not None:
                    store = RedisStore(url, serializer="raw")
                else:
                    store = MmapStore(where, cache_size=cache_size, serializer="raw")
                _stores[ident] = store
    return store


def close_stores() -> None:
    """Close every store get_store() opened in this process (the next use opens
    them again): for tests that change settings.PREFORK_SESSIONS, and shutdown."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


def store_key(session_key: str) -> str:
    """The store key of ``session_key``: KEY_PREFIX + 64 hex digits of keyed
    BLAKE2b-256, keyed by a digest of ``settings.SECRET_KEY``."""
    secret = settings.SECRET_KEY
    key = _digest_keys.get(secret)
    if key is None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        key = _digest_keys[secret] = hashlib.blake2b(raw, digest_size=32, person=_SECRET_PERSON).digest()
    return KEY_PREFIX + hashlib.blake2b(session_key.encode(), key=key, digest_size=32).hexdigest()


class SessionStore(SessionBase):  # type: ignore[misc]  # SessionBase is untyped (Any)
    """Django's ``SessionBase`` on MmapStore (or RedisStore): see the module's rules."""

    def __init__(self, session_key: str | None = None) -> None:
        super().__init__(session_key)
        self._store = get_store()
        # (session key, record as loaded): the base of the merge in save().
        self._loaded: tuple[str, bytes] | None = None

    def _record(self, data: dict[str, Any]) -> bytes:
        encoded: str = self.encode(data)
        return encoded.encode("ascii")  # signing.dumps output is URL-safe base64 and ":"

    def _data(self, record: bytes) -> dict[str, Any]:
        data: dict[str, Any] = self.decode(record.decode("ascii", "replace"))
        return data

    def load(self) -> dict[str, Any]:
        key = self.session_key
        record = None if key is None else self._store.get(store_key(key))
        if key is not None and record is not None:
            # An undecodable record reads as {} (Django logs it), as in Django's own engines.
            self._loaded = (key, record)
            return self._data(record)
        self._session_key = None
        self._loaded = None
        return {}

    def exists(self, session_key: str | None) -> bool:
        if not session_key:
            return False
        return store_key(session_key) in self._store

    def create(self) -> None:
        for _ in range(_CREATE_TRIES):
            self._session_key = self._get_new_session_key()
            try:
                self.save(must_create=True)
            except CreateError:
                continue  # another process took this key between exists() and save()
            self.modified = True
            return
        raise SessionStoreError(
            f"no unused session key in {_CREATE_TRIES} tries: every new key reads as taken. "
            f"Check that nothing else writes {KEY_PREFIX!r} keys into the session store."
        )

    def save(self, must_create: bool = False) -> None:
        if self.session_key is None:
            self.create()
            return
        key: str = self.session_key
        data: dict[str, Any] = self._get_session(no_load=must_create)
        age = self.get_expiry_age()
        skey = store_key(key)
        record = self._record(data)
        if age <= 0:
            # Expired already: leave no record, but keep the create/update contract.
            if must_create:
                if skey in self._store:
                    raise CreateError
            elif not self._store.delete(skey):
                raise UpdateError
            self._loaded = None
            return
        loaded = self._loaded
        base = None
        if not must_create and loaded is not None and loaded[0] == key:
            base = self._data(loaded[1])

        def write(current: bytes | None) -> bytes:
            if (current is not None) if must_create else (current is None):
                raise _Refused
            if base is None or current is None:
                return record
            merged = self._data(current)
            for k, v in data.items():
                if k not in base or base[k] != v:
                    merged[k] = v
            for k in base.keys() - data.keys():
                merged.pop(k, None)
            return self._record(merged)

        try:
            self._store.get_and_set(skey, write, expire=age)
        except _Refused:
            raise (CreateError if must_create else UpdateError) from None
        # The next save of this object merges what changed since this one.
        self._loaded = (key, record)

    def delete(self, session_key: str | None = None) -> None:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
        self._store.delete(store_key(session_key))

    @classmethod
    def clear_expired(cls) -> None:
        get_store().purge()
