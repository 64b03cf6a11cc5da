"""Flask sessions on a shared store: ``init_app(app)``, or
``app.session_interface = PreforkSessionInterface(store)``.

Imported only explicitly (``pip install 'prefork_sessions[flask]'``): nothing else
in the package imports Flask.  The session core (``_session``) loads, tracks
changes and saves (whole, merge or expiry refresh); this module translates
Flask's configuration, values and cookie rules to it.

Rules
-----
1. Flask's settings are read per app at request time (one interface may serve
   several apps): ``SESSION_COOKIE_NAME``/``_DOMAIN``/``_PATH``/``_HTTPONLY``/
   ``_SECURE``/``_SAMESITE``/``_PARTITIONED`` through SessionInterface's own
   getters, ``PERMANENT_SESSION_LIFETIME`` and ``SESSION_REFRESH_EACH_REQUEST``.
2. The cookie is ``<id>.<p|s><tag>``: the core's session id, whether the session
   is permanent, and a keyed BLAKE2b tag of both under a key derived from
   ``SECRET_KEY`` (each of ``SECRET_KEY_FALLBACKS`` also verifies; a cookie is
   re-signed with ``SECRET_KEY`` when next sent).  A cookie whose tag fails is
   ignored before the store is touched, so rotating ``SECRET_KEY`` ends every
   session not covered by a fallback.  Without a secret key the session is
   Flask's ``NullSession``.  The store key is the core's one-way digest of the id.
3. Values go through Flask's tagged JSON (the interface's ``serializer``, Flask's
   own ``session_json_serializer`` by default) on their way into and out of the
   store, so tuple, bytes, Markup, UUID and datetime come back as themselves.
4. ``open_session`` never touches the store: a request that does not use the
   session costs no store access and sets no cookie.  It gets ``Vary: Cookie``
   only when its cookie says the session is permanent and
   ``SESSION_REFRESH_EACH_REQUEST`` is on, where Flask's own session would have
   refreshed (and so varied).
5. ``session.clear()``, or a request that leaves a stored session empty, ends the
   session: the stored copy is deleted and the cookie expired, and a concurrent
   request's save then writes nothing (Flask drops an empty session's cookie).
   Data set after ``clear()`` starts a new session under a fresh id.
6. Permanent sessions get a cookie with Max-Age/Expires equal to the stored
   expiry; others a browser-session cookie, and the same server-side lifetime.
   With ``SESSION_REFRESH_EACH_REQUEST`` (Flask's default) a used permanent
   session re-sends its cookie on every response, and the stored expiry is
   re-saved only once it is ``REFRESH_INTERVAL`` old, so reads rarely write;
   without it the lifetime counts from the last change.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, overload

from flask import Flask, Request, Response
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SessionInterface, SessionMixin, session_json_serializer
from werkzeug.exceptions import ServiceUnavailable

from ._base import StoreBase
from ._errors import InvalidArgumentError, SerializationError, StoreUnavailableError
from ._records import SessionRecords, WholeRecords
from ._redis import RedisStore
from ._redis_sessions import HashRecords
from ._serializers import Codec
from ._session import (
    DEFAULT_KEY_PREFIX,
    Session,
    SessionManager,
    SessionOptions,
    SessionStore,
    now,
    request_cookie_values,
)
from ._shared import shared_mmap, shared_redis
from ._store import default_path
from ._wsgi import RETRY_AFTER

__all__ = ["REFRESH_INTERVAL", "PreforkSession", "PreforkSessionInterface", "default_store_path",
           "init_app", "unavailable"]

log = logging.getLogger("prefork_sessions")

REFRESH_INTERVAL = 60.0
"""Seconds: with SESSION_REFRESH_EACH_REQUEST, a read re-saves the stored expiry once it
is this old (a tenth of the lifetime for lifetimes under ten minutes)."""

EXTENSION_KEY = "prefork_sessions"

_TAG_BYTES = 16  # 128-bit tags: 22 URL-safe base64 characters
_TAG_CHARS = 22
_ID_CHARS = 43  # new_session_id()
_COOKIE_CHARS = _ID_CHARS + 2 + _TAG_CHARS  # "<id>.<flag><tag>"
_TAG_PERSON = b"pfs.flask.cookie"  # BLAKE2b personalisation (16 bytes at most)
_MAX_COOKIES = 4  # several cookies of our name (other paths): verify at most this many
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_CACHED = 64  # signers (secret sets) and managers (lifetime settings) kept per interface


# -- cookies ------------------------------------------------------------------------


def _secret_bytes(secret: object, name: str) -> bytes:
    if isinstance(secret, str):
        return secret.encode()
    if isinstance(secret, bytes):
        return secret
    raise InvalidArgumentError(
        f"{name} must be a str or bytes, not {type(secret).__name__}: set it to a random "
        "value such as secrets.token_hex(32), the same in every process of the app"
    )


class _Signer:
    """Tags cookies with the current secret key; verifies with it and the fallbacks."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[bytes]) -> None:  # current first
        self._keys = tuple(
            hashlib.blake2b(s, digest_size=32, person=_TAG_PERSON).digest() for s in secrets
        )

    @staticmethod
    def _tag(key: bytes, head: str) -> str:
        mac = hashlib.blake2b(head.encode(), key=key, digest_size=_TAG_BYTES).digest()
        return base64.urlsafe_b64encode(mac)[:_TAG_CHARS].decode()

    def sign(self, sid: str, permanent: bool) -> str:
        head = f"{sid}.{'p' if permanent else 's'}"
        return head + self._tag(self._keys[0], head)

    def check(self, value: str) -> int:
        """The index of the key that made ``value``'s tag, or -1."""
        if len(value) != _COOKIE_CHARS or value[_ID_CHARS] != ".":
            return -1
        head, tag = value[:-_TAG_CHARS], value[-_TAG_CHARS:]
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(tag, self._tag(key, head)):
                return index
        return -1


class _SignedIds(Sequence[str]):
    """The session ids of a request's cookies whose tag holds, verified on first use
    (a request that never uses its session verifies nothing)."""

    def __init__(self, values: list[str], signer: _Signer) -> None:
        self._values, self._signer = values, signer
        self._ids: list[str] | None = None
        self.by_fallback = False  # some id verified only with a fallback key
        self.permanent = False  # the first valid cookie says its session is permanent

    def _verified(self) -> list[str]:
        ids = self._ids
        if ids is None:
            ids = self._ids = []
            for value in self._values[:_MAX_COOKIES]:
                index = self._signer.check(value)
                if index >= 0:
                    if not ids:
                        self.permanent = value[_ID_CHARS + 1] == "p"
                    ids.append(value[:_ID_CHARS])
                    self.by_fallback = self.by_fallback or index > 0
        return ids

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._verified()[index]

    def __len__(self) -> int:
        return len(self._verified())

    def __iter__(self) -> Iterator[str]:
        return iter(self._verified())


# -- values ---------------------------------------------------------------------------


class _TaggedStore:
    """A store seen through Flask's tagged JSON: what the core stores is tagged on the
    way in and untagged on the way out, whatever the store's own serializer."""

    def __init__(self, store: SessionStore, serializer: TaggedJSONSerializer) -> None:
        self.store, self._serializer = store, serializer

    def _untag(self, value: Any) -> Any:
        if isinstance(value, dict):
            return self._serializer.untag({k: self._untag(v) for k, v in value.items()})
        if isinstance(value, list):
            return [self._untag(item) for item in value]
        return value

    def _read(self, key: str, value: Any) -> Any:
        try:
            return self._untag(value)
        except Exception as e:  # a tag's payload that is not what the tag says (bad base64...)
            raise SerializationError(
                f"the stored session under {key!r} is not Flask tagged JSON ({e}); was it "
                "written by something else? It is treated as no session."
            ) from e

    def get(self, key: str, default: Any = None) -> Any:
        value = self.store.get(key)
        return default if value is None else self._read(key, value)

    def set(self, key: str, value: Any, expire: float | None = None) -> None:
        self.store.set(key, self._serializer.tag(value), expire)

    def delete(self, key: str) -> bool:
        return self.store.delete(key)

    def records(self) -> SessionRecords:
        """How the core keeps sessions here: a HASH per session with each value tagged
        on RedisStore, else one tagged value per session through this object."""
        if isinstance(self.store, RedisStore):
            return HashRecords(self.store, Codec(self._serializer))
        return WholeRecords(self)

    def get_and_set(self, key: str, fn: Callable[[Any], Any], expire: float | None = None) -> Any:
        result: list[Any] = []

        def tagged(current: Any) -> Any:
            result.append(fn(None if current is None else self._read(key, current)))
            return self._serializer.tag(result[-1])

        self.store.get_and_set(key, tagged, expire)
        return result[-1]


# -- the session ----------------------------------------------------------------------


class _Cookie(NamedTuple):
    """What a response does with the session cookie."""

    action: Literal["none", "set", "delete"]
    expires: float | None = None  # epoch seconds; None: a browser-session cookie


_NO_COOKIE = _Cookie("none")


class PreforkSession(SessionMixin):
    """A request's session: a mapping of str keys to values Flask's tagged JSON can
    store, loaded on first use.  Changes are tracked per key, also in-place changes
    to lists and dicts (``modified = True`` is never needed, but still forces a
    save of every key).  ``clear()`` ends the session; ``rotate()`` gives it a
    fresh id and keeps its data (call on login)."""

    def __init__(self, core: Session, manager: SessionManager, cookies: _SignedIds) -> None:
        self._core, self._manager, self._cookies = core, manager, cookies
        self._marked = False  # set by Flask (3.1.3+) whenever the session proxy is used
        # A key was assigned, maybe its own value again: Flask's session counts that as a
        # change and re-sends the cookie; the core has nothing to write for it.
        self._assigned = False

    def __getitem__(self, key: str) -> Any:
        return self._core[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._core.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self._core[key] = value
        self._assigned = True

    def __delitem__(self, key: str) -> None:
        del self._core[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._core)

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, key: object) -> bool:
        return key in self._core

    def __repr__(self) -> str:
        return f"<PreforkSession {self._core!r}>"

    def clear(self) -> None:
        """End the session: its stored copy is deleted and its cookie expired when the
        response is saved; keys set afterwards start a new session under a fresh id."""
        self._core.invalidate()

    def rotate(self) -> None:
        """Give the session a fresh id, keeping its data; the old id stops working."""
        self._core.rotate()

    @property
    def id(self) -> str:
        """The session id (the cookie carries it, tagged)."""
        return self._core.id

    @property
    def new(self) -> bool:  # type: ignore[override]  # Flask's is a plain attribute
        """True if no stored session was found for this request (or it was cleared)."""
        return self._core.new

    @property
    def modified(self) -> bool:
        """True if this request changed the session (or assigned a key); set True to
        save every key."""
        return self._assigned or self._core.modified

    @modified.setter
    def modified(self, value: bool) -> None:
        self._core.modified = value
        self._assigned = bool(value)

    @property
    def accessed(self) -> bool:
        """True once the session was used in this request (its response varies by cookie)."""
        return self._marked or self._core.accessed

    @accessed.setter
    def accessed(self, value: bool) -> None:
        self._marked = bool(value)

    def finish(self, status: int, refresh_each_request: bool) -> _Cookie:
        """Save for a response with HTTP ``status`` (PreforkSessionInterface calls this)
        and say what to do with the cookie.  Raises the store's SessionStoreError
        if the save failed (logged by the core, nothing written): Flask answers 500."""
        core = self._core
        if not core.accessed:  # never loaded: nothing to save
            return _NO_COOKIE
        changed, new = core.modified, core.new  # changed: the core has something to write
        touched = changed or self._assigned
        if changed and not new and not len(core):
            core.invalidate()  # emptied: Flask's session would drop its cookie (rule 5)
        saved = self._manager.finish(core, status)  # a SessionStoreError goes to Flask
        sent = saved.cookie != "keep"
        if not len(core):
            # The core sends a cookie for an empty session only to expire it.
            return _Cookie("delete") if sent else _NO_COOKIE
        permanent = self.permanent
        if sent:
            if permanent:
                return _Cookie("set", saved.expires)
            if touched or new or self._cookies.by_fallback:
                return _Cookie("set")
            return _NO_COOKIE  # an expiry refresh: a browser-session cookie has none to move
        if status >= 500 or changed or new:
            return _NO_COOKIE  # not saved: a 5xx, or the session ended meanwhile
        if touched or (permanent and refresh_each_request) or self._cookies.by_fallback:
            return _Cookie("set", core.expires if permanent else None)
        return _NO_COOKIE

    def varies(self, refresh_each_request: bool) -> bool:
        """Whether the response depends on the cookie (rule 4)."""
        if self.accessed:
            return True
        return refresh_each_request and bool(self._cookies) and self._cookies.permanent


# -- stores -----------------------------------------------------------------------------

def default_store_path(app: Flask) -> str:
    """Where an app's store file goes when no path is given:
    ``<tempdir>/flask_<app.name>_<12 hex digits>_session_data``, the digits from a
    SHA-256 of the app's import name and root path, so two apps that share a name
    (every ``app.py``) never share a file by accident."""
    name = _UNSAFE_NAME.sub("_", app.name)[:64]
    digest = hashlib.sha256(f"{app.import_name}\0{app.root_path}".encode()).hexdigest()[:12]
    return default_path(f"flask_{name}_{digest}")


# -- the interface ------------------------------------------------------------------


class PreforkSessionInterface(SessionInterface):
    """Flask's session interface on an MmapStore (or RedisStore, or ``store``).

    ``store``: any prefork_sessions store, shared by every app this interface
    serves.  Without it, ``redis_url`` selects a RedisStore, else each app gets
    an MmapStore at ``path`` (default: :func:`default_store_path`), created with
    ``cache_size`` bytes if it does not exist; one store object per file or URL
    per process.  ``key_prefix`` is prepended to the id's digest in store keys.
    Raises InvalidArgumentError for bad arguments.
    """

    serializer: TaggedJSONSerializer = session_json_serializer
    """Flask's tagged JSON serializer (its default instance: tags registered on it apply)."""

    def __init__(
        self,
        store: StoreBase | None = None,
        *,
        path: str | None = None,
        cache_size: int | None = None,
        redis_url: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        if store is not None and (path, cache_size, redis_url) != (None, None, None):
            raise InvalidArgumentError(
                "give either store or path/cache_size/redis_url (they choose the store "
                "PreforkSessionInterface makes), not both"
            )
        if redis_url is not None and (path, cache_size) != (None, None):
            raise InvalidArgumentError(
                "redis_url selects a RedisStore: path and cache_size apply to the mmap file only"
            )
        SessionOptions(key_prefix=key_prefix)  # check it now, not at the first request
        self._store, self._path, self._cache_size = store, path, cache_size
        self._redis_url, self.key_prefix = redis_url, key_prefix
        self._stores: weakref.WeakKeyDictionary[Flask, _TaggedStore] = (
            weakref.WeakKeyDictionary()
        )
        self._managers: dict[tuple[_TaggedStore, float, bool], SessionManager] = {}
        self._signers: dict[tuple[bytes, ...], _Signer] = {}

    def store_for(self, app: Flask) -> StoreBase:
        """The store serving ``app``'s sessions (opened on first call)."""
        return self._tagged_store(app).store  # type: ignore[return-value]

    def _tagged_store(self, app: Flask) -> _TaggedStore:
        tagged = self._stores.get(app)
        if tagged is None:
            store = self._store
            if store is None:
                store = self._open_store(app)
            tagged = self._stores[app] = _TaggedStore(store, self.serializer)
        return tagged

    def _open_store(self, app: Flask) -> StoreBase:
        if self._redis_url is not None:
            return shared_redis(self._redis_url)
        path = self._path if self._path is not None else default_store_path(app)
        if self._cache_size is None:
            return shared_mmap(path)
        return shared_mmap(path, cache_size=self._cache_size)

    def manager_for(self, app: Flask) -> SessionManager:
        """The session core for ``app``'s current PERMANENT_SESSION_LIFETIME and
        SESSION_REFRESH_EACH_REQUEST (InvalidArgumentError if the lifetime is not
        above 0 and at most 400 days)."""
        lifetime = app.permanent_session_lifetime.total_seconds()
        refresh = bool(app.config["SESSION_REFRESH_EACH_REQUEST"])
        store = self._tagged_store(app)
        key = (store, lifetime, refresh)
        manager = self._managers.get(key)
        if manager is None:
            try:
                threshold = lifetime - min(REFRESH_INTERVAL, lifetime / 10) if refresh else 0.0
                options = SessionOptions(
                    lifetime=lifetime, refresh_threshold=threshold, key_prefix=self.key_prefix
                )
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"PERMANENT_SESSION_LIFETIME: {e}") from None
            if len(self._managers) >= _MAX_CACHED:
                self._managers.clear()
            manager = self._managers[key] = SessionManager(store, options, store.records())
        return manager

    def _signer(self, app: Flask) -> _Signer | None:
        secret = app.secret_key
        if not secret:
            return None
        fallbacks = app.config.get("SECRET_KEY_FALLBACKS") or ()
        keys = (_secret_bytes(secret, "SECRET_KEY"),) + tuple(
            _secret_bytes(s, "SECRET_KEY_FALLBACKS item") for s in fallbacks
        )
        signer = self._signers.get(keys)
        if signer is None:
            if len(self._signers) >= _MAX_CACHED:
                self._signers.clear()
            signer = self._signers[keys] = _Signer(keys)
        return signer

    def open_session(self, app: Flask, request: Request) -> PreforkSession | None:
        """The request's session, not yet loaded; None (Flask's NullSession) without
        a secret key."""
        signer = self._signer(app)
        if signer is None:
            return None
        values = request_cookie_values(request.environ.get("HTTP_COOKIE"), self.get_cookie_name(app))
        cookies = _SignedIds(values, signer)
        manager = self.manager_for(app)
        return PreforkSession(manager.open(cookies), manager, cookies)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Save what the request changed and set, refresh or expire the cookie."""
        if not isinstance(session, PreforkSession):
            raise InvalidArgumentError(
                f"PreforkSessionInterface saves the sessions it opened, not a "
                f"{type(session).__name__}"
            )
        name = self.get_cookie_name(app)
        samesite = self.get_cookie_samesite(app)
        if samesite not in (None, "Strict", "Lax", "None"):  # refused before anything is saved
            raise InvalidArgumentError(
                f"SESSION_COOKIE_SAMESITE={samesite!r}: use 'Lax', 'Strict', 'None' or None"
            )
        refresh = bool(app.config["SESSION_REFRESH_EACH_REQUEST"])
        if session.varies(refresh):
            response.vary.add("Cookie")
        try:
            action, expires = session.finish(response.status_code, refresh)
        except StoreUnavailableError as e:
            # Flask would turn an error raised here into a 500: answer 503 in its place.
            down = unavailable(e)
            response.status_code = down.status_code
            response.set_data(down.get_data())
            response.content_type = down.content_type
            response.headers["Retry-After"] = down.headers["Retry-After"]
            return
        if action == "none":
            return
        attributes: dict[str, Any] = {
            "domain": self.get_cookie_domain(app),
            "path": self.get_cookie_path(app),
            "secure": self.get_cookie_secure(app),
            "partitioned": self.get_cookie_partitioned(app),
            "samesite": samesite,
            "httponly": self.get_cookie_httponly(app),
        }
        response.vary.add("Cookie")
        if action == "delete":
            response.delete_cookie(name, **attributes)
            return
        signer = self._signer(app)
        assert signer is not None  # open_session gave a NullSession otherwise
        value = signer.sign(session.id, session.permanent)
        if expires is None:
            response.set_cookie(name, value, **attributes)
        else:
            max_age = max(0, int(expires - now()))
            response.set_cookie(name, value, max_age=max_age, expires=int(expires), **attributes)


def unavailable(e: StoreUnavailableError) -> Response:
    """Flask's answer when the session store cannot be reached (Redis went away): 503
    with ``Retry-After``.  ``init_app`` registers it as the app's handler for
    StoreUnavailableError; with ``app.session_interface = ...`` set by hand, register
    it yourself: ``app.register_error_handler(StoreUnavailableError, unavailable)``."""
    log.error("session store unavailable, answering 503 (Retry-After: %d): %s", RETRY_AFTER, e)
    down = ServiceUnavailable(retry_after=RETRY_AFTER).get_response()
    return Response(down.get_data(), down.status_code, list(down.headers.items()))


def init_app(app: Flask, store: StoreBase | None = None) -> PreforkSessionInterface:
    """Give ``app`` server-side sessions; returns the interface, also registered as
    ``app.extensions["prefork_sessions"]``.

    Without ``store``, the store comes from ``app.config``: ``PREFORK_SESSIONS_REDIS_URL``
    (a RedisStore), else an MmapStore at ``PREFORK_SESSIONS_PATH`` (default
    :func:`default_store_path`) of ``PREFORK_SESSIONS_CACHE_SIZE`` bytes.
    ``PREFORK_SESSIONS_KEY_PREFIX`` prefixes store keys.  The store is opened
    now, so a bad setting fails at start-up (InvalidArgumentError or the
    store's own error) and the file exists before gunicorn forks.
    """
    config = app.config
    if store is None:
        interface = PreforkSessionInterface(
            path=config.get("PREFORK_SESSIONS_PATH"),
            cache_size=config.get("PREFORK_SESSIONS_CACHE_SIZE"),
            redis_url=config.get("PREFORK_SESSIONS_REDIS_URL"),
            key_prefix=config.get("PREFORK_SESSIONS_KEY_PREFIX", DEFAULT_KEY_PREFIX),
        )
    else:
        interface = PreforkSessionInterface(
            store, key_prefix=config.get("PREFORK_SESSIONS_KEY_PREFIX", DEFAULT_KEY_PREFIX)
        )
    interface.manager_for(app)  # opens the store and checks the lifetime
    app.session_interface = interface
    app.register_error_handler(StoreUnavailableError, unavailable)
    app.extensions[EXTENSION_KEY] = interface
    return interface

