"""Django session engine on the shared store: ``SESSION_ENGINE = "prefork_sessions.django"``.

Settings (every key optional)::

    PREFORK_SESSIONS = {
        "path": None,        # the store file; None: <tempdir>/<project>_django_session_data
        "cache_size": 64 << 20,  # bytes, used when the file is created
        "redis_url": None,   # "redis://host:6379/0": sessions in Redis, no file
    }

``<project>`` is the first dotted part of ``ROOT_URLCONF`` (``mysite`` for
``mysite.urls``), ``prefork`` without one.  Each process opens one store per file
(or URL) and shares it between threads.  The store is opened when Django loads
this engine (its SessionMiddleware does, as the app is built), so a bad setting
stops the app at start-up, and with gunicorn's ``--preload`` the master opens it:
``prefork_sessions.gunicorn.post_fork`` then reopens it in each worker before the
worker drops to ``--user``.  A forked worker would also reopen it by itself.

On Redis (``redis_url``) each session is a HASH, a field per key in
``SESSION_SERIALIZER``'s form, and a save sends only what changed
(``_redis_sessions``).  For a 503 with ``Retry-After`` instead of a 500 while
Redis is unreachable, use ``prefork_sessions.django.SessionMiddleware`` in place
of Django's (it is Django's, plus that).

Rules
-----
1. The store never holds a session key: a record lives under
   ``django.session:`` + keyed BLAKE2b-256 of the key, the BLAKE2b key derived
   from ``SECRET_KEY`` (the core's ``StoreKeys``); whoever reads the 0640 file
   learns no usable cookie.  Rotating ``SECRET_KEY`` ends every session, but for
   those found under a key of ``SECRET_KEY_FALLBACKS``: these load, and move to
   the current key when next saved.
2. A record is ``SessionBase.encode(data)`` (Django's signed, serialised form,
   ``SESSION_SERIALIZER``) and expires in the store after ``get_expiry_age()``
   seconds; an age of 0 or less expires it at once (nothing is stored).
3. ``save(must_create=True)`` writes only if the key is unused, atomically
   (``get_and_set``), else ``CreateError``.  Any other save writes only if the
   record still exists, else ``UpdateError``: a session deleted by a concurrent
   logout is never brought back.
4. A save of a loaded session is a key-level merge into the latest record (the
   core's plan ``MERGE``): the keys this request changed or deleted, compared
   with the record as loaded, are applied to it, so concurrent requests changing
   different keys keep both.  A new session is written whole (``WHOLE``); one
   whose expiry age is 0 or less is deleted (``END``).
5. ``load()`` of an unknown, expired or undecodable record returns ``{}`` and
   drops the key, so the next save makes a new one; it never creates a record.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]  # Django ships no type hints
from django.contrib.sessions.backends.base import (  # type: ignore[import-untyped]
    CreateError,
    SessionBase,
    UpdateError,
)
from django.contrib.sessions.middleware import (  # type: ignore[import-untyped]
    SessionMiddleware as DjangoSessionMiddleware,
)
from django.http import HttpRequest, HttpResponse  # type: ignore[import-untyped]

from ._base import StoreBase
from ._django_cache import MmapCache
from ._errors import InvalidArgumentError, SessionStoreError, StoreUnavailableError
from ._records import Stored
from ._redis import RedisStore
from ._redis_sessions import HashRecords
from ._serializers import Codec
from ._session import MAX_LIFETIME, Plan, StoreKeys, changes, merge_changes, now
from ._shared import close_shared, shared_mmap, shared_redis
from ._store import DEFAULT_CACHE_SIZE, default_path
from ._wsgi import RETRY_AFTER

__all__ = ["KEY_PREFIX", "SETTING", "MmapCache", "SessionMiddleware", "SessionStore",
           "close_stores", "get_store", "session_store_path", "store_key", "unavailable"]

log = logging.getLogger("prefork_sessions")

SETTING = "PREFORK_SESSIONS"
KEY_PREFIX = "django.session:"
_KEYS = frozenset({"path", "cache_size", "redis_url"})
# Personalisation of the BLAKE2b that turns SECRET_KEY into the digest key, so
# the key differs from every other use Django makes of SECRET_KEY.
_SECRET_PERSON = b"pfs.django"
_CREATE_TRIES = 100  # a CreateError means a concurrent creator took the same random key
_MAX_KEYRINGS = 16  # StoreKeys kept for (SECRET_KEY, SECRET_KEY_FALLBACKS) sets

_keyrings: dict[tuple[bytes, ...], StoreKeys] = {}
# per store, engine class (its signing salt) and SESSION_SERIALIZER
_hashes: dict[tuple[RedisStore, type, type], HashRecords] = {}


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
    if url is not None:
        return shared_redis(url, serializer="raw")
    return shared_mmap(path or _default_path(), serializer="raw", cache_size=cache_size)


def session_store_path() -> str | None:
    """The absolute path of the file ``settings.PREFORK_SESSIONS`` keeps sessions in
    (its default when unset); None when they are in Redis."""
    path, _, url = _options()
    return None if url is not None else os.path.abspath(path or _default_path())


def close_stores() -> None:
    """Close every store the adapters opened in this process (the next use opens
    them again): for tests that change settings.PREFORK_SESSIONS, and shutdown."""
    close_shared()


def _keyring() -> StoreKeys:
    """StoreKeys for SECRET_KEY, then each of SECRET_KEY_FALLBACKS."""
    secrets = tuple(
        s.encode() if isinstance(s, str) else bytes(s)
        for s in (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ()))
    )
    keys = _keyrings.get(secrets)
    if keys is None:
        if len(_keyrings) >= _MAX_KEYRINGS:
            _keyrings.clear()
        keys = _keyrings[secrets] = StoreKeys(KEY_PREFIX, secrets, person=_SECRET_PERSON)
    return keys


def store_key(session_key: str) -> str:
    """The store key of ``session_key``: KEY_PREFIX + 64 hex digits of keyed
    BLAKE2b-256, keyed by a digest of ``settings.SECRET_KEY``."""
    return _keyring()(session_key)


class SessionStore(SessionBase):  # type: ignore[misc]  # SessionBase is untyped (Any)
    """Django's ``SessionBase`` on MmapStore (or RedisStore): see the module's rules."""

    def __init__(self, session_key: str | None = None) -> None:
        super().__init__(session_key)
        self._store = get_store()
        # On Redis, a HASH per session merged natively (``_redis_sessions``).
        self._hash = self._records() if isinstance(self._store, RedisStore) else None
        # (session key, record as loaded, store key it was found under): the base
        # of the merge in save(), and where a fallback-keyed record came from.  The
        # record is the stored bytes in a file, a pristine copy of the data on Redis.
        self._loaded: tuple[str, Any, str] | None = None

    def _records(self) -> HashRecords:
        """The HASH sessions of this Redis store, each value in SESSION_SERIALIZER's form."""
        assert isinstance(self._store, RedisStore)
        which = (self._store, type(self), self.serializer)
        records = _hashes.get(which)
        if records is None:
            if len(_hashes) >= _MAX_KEYRINGS:
                _hashes.clear()
            records = _hashes[which] = HashRecords(
                self._store, Codec(self.serializer()), whole=self._whole_record
            )
        return records

    def _whole_record(self, raw: bytes, at: float) -> Stored | None:
        """A record written whole (by ``prefork-sessions import`` from a file), for its
        conversion to a HASH.  It keeps its key's remaining lifetime; ``e`` only has
        to be in the future until the next save sets it.  (Any object of this class
        decodes alike: the signing salt and serializer are the class's.)"""
        data = self._data(raw)
        return Stored(data, at + MAX_LIFETIME, [], ()) if data else None

    def _record(self, data: dict[str, Any]) -> bytes:
        encoded: str = self.encode(data)
        return encoded.encode("ascii")  # signing.dumps output is URL-safe base64 and ":"

    def _data(self, record: bytes) -> dict[str, Any]:
        data: dict[str, Any] = self.decode(record.decode("ascii", "replace"))
        return data

    def load(self) -> dict[str, Any]:
        key = self.session_key
        if key is not None:
            keys = _keyring()
            for skey in (keys(key), *keys.fallbacks(key)):
                if self._hash is not None:
                    stored = self._hash.load(skey, now())
                    if stored is not None:
                        self._loaded = (key, copy.deepcopy(stored.data), skey)
                        return stored.data
                    continue
                record = self._store.get(skey)
                if record is not None:
                    # An undecodable record reads as {} (Django logs it), as in its own engines.
                    self._loaded = (key, record, skey)
                    return self._data(record)
        self._session_key = None
        self._loaded = None
        return {}

    def exists(self, session_key: str | None) -> bool:
        if not session_key:
            return False
        keys = _keyring()
        return any(k in self._store for k in (keys(session_key), *keys.fallbacks(session_key)))

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

    def _plan(self, key: str, must_create: bool, age: float) -> Plan:
        """The core's save plan for this save."""
        if age <= 0:
            return Plan.END
        loaded = self._loaded
        if must_create or loaded is None or loaded[0] != key:
            return Plan.WHOLE
        return Plan.MERGE

    def _merged(self, current: bytes, data: dict[str, Any]) -> bytes:
        """The record ``current`` with this object's changes since it loaded applied."""
        assert self._loaded is not None
        changed, deleted = changes(self._data(self._loaded[1]), data)
        return self._record(merge_changes(self._data(current), data, changed, deleted))

    def save(self, must_create: bool = False) -> None:
        if self.session_key is None:
            self.create()
            return
        key: str = self.session_key
        data: dict[str, Any] = self._get_session(no_load=must_create)
        age = self.get_expiry_age()
        skey = store_key(key)
        plan = self._plan(key, must_create, age)
        loaded = self._loaded if self._loaded is not None and self._loaded[0] == key else None
        moved_from = loaded[2] if loaded is not None and not must_create else skey
        if plan is Plan.END:
            # Expired already: leave no record, but keep the create/update contract.
            if must_create:
                if skey in self._store:
                    raise CreateError
            elif not (self._store.delete(skey) | self._store.delete(moved_from)):
                raise UpdateError
            self._loaded = None
            return
        if self._hash is not None:
            self._save_hash(key, data, age, skey, plan, loaded, moved_from, must_create)
            return
        record = self._record(data)
        if moved_from != skey:  # found under a fallback key: move it to the current one
            current = self._store.get(moved_from)
            if current is not None:
                self._store.set(skey, self._merged(current, data), expire=age)
            if current is None or not self._store.delete(moved_from):
                # Deleted meanwhile (a logout deletes under every key): logout wins.
                self._store.delete(skey)
                raise UpdateError
            self._loaded = (key, record, skey)
            return
        base = loaded[1] if plan is Plan.MERGE and loaded is not None else None

        def write(current: bytes | None) -> bytes:
            if (current is not None) if must_create else (current is None):
                raise _Refused
            if base is None or current is None or current == base:
                # Whole, or nothing changed since this object loaded it (the usual
                # case): this object's record is the merge, with no decoding at all.
                return record
            return self._merged(current, data)

        try:
            self._store.get_and_set(skey, write, expire=age)
        except _Refused:
            raise (CreateError if must_create else UpdateError) from None
        # The next save of this object merges what changed since this one.
        self._loaded = (key, record, skey)

    def _save_hash(
        self, key: str, data: dict[str, Any], age: float, skey: str, plan: Plan,
        loaded: tuple[str, Any, str] | None, moved_from: str, must_create: bool,
    ) -> None:
        """save() on Redis: by the same rules, natively merged (no read but for a move)."""
        assert self._hash is not None
        records, at = self._hash, now()
        expires = at + age
        base = loaded[1] if plan is Plan.MERGE and loaded is not None else None
        if moved_from != skey:  # found under a fallback key: move it to the current one
            stored = records.load(moved_from, at)
            if stored is not None:
                changed, deleted = changes(base or {}, data)
                merged = merge_changes(stored.data, data, changed, deleted)
                records.write(skey, merged, expires, [], age)
            if stored is None or not self._store.delete(moved_from):
                self._store.delete(skey)  # deleted meanwhile: logout wins
                raise UpdateError
        elif must_create:
            if not records.write(skey, data, expires, [], age, when="absent"):
                raise CreateError
        elif base is not None:
            changed, deleted = changes(base, data)
            if not records.merge(skey, data, changed, deleted, expires, age, at):
                raise UpdateError
        elif not records.write(skey, data, expires, [], age, when="present"):
            raise UpdateError
        self._loaded = (key, copy.deepcopy(data), skey)

    def delete(self, session_key: str | None = None) -> None:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
        keys = _keyring()
        for skey in (keys(session_key), *keys.fallbacks(session_key)):
            self._store.delete(skey)

    @classmethod
    def clear_expired(cls) -> None:
        get_store().purge()


def unavailable(e: StoreUnavailableError) -> HttpResponse:
    """The answer when the session store cannot be reached (Redis went away): 503
    with ``Retry-After`` and no cookie, logged once."""
    log.error("session store unavailable, answering 503 (Retry-After: %d): %s", RETRY_AFTER, e)
    response = HttpResponse(
        "The service is unavailable for a moment; try again shortly.\n",
        status=503, content_type="text/plain; charset=utf-8",
    )
    response["Retry-After"] = str(RETRY_AFTER)
    return response


class SessionMiddleware(DjangoSessionMiddleware):  # type: ignore[misc]  # untyped base
    """Django's SessionMiddleware, answering 503 with ``Retry-After`` instead of a 500
    when the session store cannot be reached, while a view uses the session or as
    the session saves.  Use it in MIDDLEWARE in place of
    ``django.contrib.sessions.middleware.SessionMiddleware``; the next request tries
    the store again, so service resumes by itself when it returns."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, StoreUnavailableError):
            return unavailable(exception)
        return None

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        try:
            out: HttpResponse = super().process_response(request, response)
        except StoreUnavailableError as e:
            return unavailable(e)
        return out


if settings.configured and getattr(settings, "SESSION_ENGINE", None) == __name__:
    get_store()  # see the module docstring: open it as the app is built, not at the first request
