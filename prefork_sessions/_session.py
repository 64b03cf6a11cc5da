"""Server-side sessions on a shared store: ids, the Session mapping, and saving.

Theory of operation
===================

A browser holds only an opaque session id in a cookie; the data lives in the
store under ``key_prefix + digest(id)``: on RedisStore as a HASH with a field
per data key, on any other store as one value::

    {"d": {...session data...}, "e": <expiry, epoch seconds>, "f": [[category, message], ...]}

(``_records`` owns both forms).  The session keeps its own expiry (``"e"``)
with its data; the store's own expiry is set to the same lifetime so abandoned
sessions are reclaimed.

Rules
-----
1. Ids come from :func:`secrets.token_urlsafe` (256 bits).  A cookie is checked
   against the exact id format before the store is touched; a malformed,
   unknown or expired id gets a fresh id.  A client-chosen id is never adopted.
2. The id itself is never stored, nor logged: the store key holds a one-way
   digest of it (keyed BLAKE2b with a key derived from ``secret`` when one is
   given, SHA-256 otherwise), so whoever can read the store file or the Redis
   keys learns no cookie (Rack's ``private_id``, after CVE-2019-16782).
3. The session is loaded lazily, on first use.  A request that never touches it
   costs no store access, sets no cookie and adds no ``Vary: Cookie``.
4. Nothing is written unless something changed.  A read-only request writes
   only when the remaining lifetime has fallen under ``refresh_threshold``
   (sliding expiry), and then only the expiry.
5. A save of a loaded session is a merge: the keys this request set, mutated
   or deleted are applied to the latest stored copy (inside ``get_and_set``; on
   Redis by one script that sends only those keys, without reading), so two
   concurrent requests changing different keys both keep their changes.  If
   the stored copy vanished meanwhile (a concurrent logout or rotation, expiry,
   eviction) nothing is written: a session is never resurrected.
6. A new, rotated or invalidated-then-refilled session is written whole under
   its fresh id; ids it replaces are deleted only after that write succeeded.
7. A save that fails (value not serialisable, too large, lock timeout) writes
   nothing and leaves the stored session as it was; the WSGI layer answers 500
   (503 with Retry-After when the store cannot be reached).  Every front end
   saves by the same plan (``Plan``: nothing, whole, merge, refresh, end),
   reported by ``SessionManager.finish`` for it to translate.
8. Nothing a client sends can raise: a Cookie header of any bytes, length or
   repetition yields at most a fresh session.  A stored value of the wrong
   shape (written by someone else) is treated as no session.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeGuard

from werkzeug.http import dump_cookie
from werkzeug.sansio.http import parse_cookie

from ._errors import (
    InvalidArgumentError,
    SerializationError,
    SessionStoreError,
    StoreUnavailableError,
)
from ._records import (
    SessionRecords,
    SessionStore,
    Stored,
    WholeRecords,
    merge_changes,
)

__all__ = [
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "MIN_SECRET_BYTES",
    "Plan",
    "Saved",
    "Session",
    "SessionManager",
    "SessionOptions",
    "SessionStore",
    "StoreKeys",
    "changes",
    "is_valid_session_id",
    "merge_changes",
    "new_session_id",
    "now",
]

log = logging.getLogger("prefork_sessions")

DEFAULT_COOKIE_NAME = "session_id"
DEFAULT_LIFETIME = 14 * 24 * 3600.0  # seconds: two weeks
# Browsers keep a cookie at most 400 days whatever its Max-Age (RFC 6265bis): a
# longer lifetime would only keep sessions in the store that no browser can present.
MAX_LIFETIME = 400 * 24 * 3600.0
MIN_SECRET_BYTES = 32  # a secret shorter than this is more likely a placeholder than a key
DEFAULT_KEY_PREFIX = "session:"
SESSION_ID_BYTES = 32  # 256 bits
# token_urlsafe(32) is 43 characters of the URL-safe base64 alphabet; the last
# one carries 4 bits of data and 2 zero bits, so only 16 characters can end it.
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
# A client may send several cookies of the same name (different paths or
# domains); look up no more than this many well-formed ids, so a flood costs nothing.
_MAX_COOKIE_CANDIDATES = 4
_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1123, ASCII form
_MAX_HOST_NAME = 253  # characters of a host name in its ASCII form
# RFC 6265 path-value: any CHAR but controls and ";" (werkzeug 2.x passes ";" through).
_BAD_PATH_RE = re.compile(r"[\x00-\x1f\x7f;]")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
# Personalisation of the BLAKE2b that turns ``secret`` into the id-digest key, so
# an application secret used for other purposes too yields a key of its own.
_SECRET_PERSON = b"prefork_sessions"

# The clock for session expiry (epoch seconds); a module attribute so tests
# can move time without touching the store.
_clock: Callable[[], float] = time.time


def now() -> float:
    """The session clock, epoch seconds: what every session expiry is measured against."""
    return _clock()

Flash = tuple[str, Any]  # (category, message)


def new_session_id() -> str:
    """Return a fresh session id: 256 random bits, 43 URL-safe characters."""
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def is_valid_session_id(value: object) -> bool:
    """True if ``value`` has exactly the shape :func:`new_session_id` produces."""
    return isinstance(value, str) and _SESSION_ID_RE.fullmatch(value) is not None


# A Cookie header as browsers send it: "name=value; name=value", plain characters only.
_PLAIN_COOKIE_HEADER = re.compile(r"[A-Za-z0-9_.~+/=-]+(?:; ?[A-Za-z0-9_.~+/=-]+)*")


def cookie_values(header: str | None, name: str) -> list[str]:
    """The values of the cookies called ``name`` in a ``Cookie`` header, in order.

    The same result as werkzeug's ``parse_cookie(header).getlist(name)``,
    without building the whole mapping on every request.
    """
    if not header or name not in header:
        return []  # a parsed name is a substring of the header: none can match
    if not _PLAIN_COOKIE_HEADER.fullmatch(header):
        # Quotes, spaces, control characters...: werkzeug's parser, whose rules for
        # these differ between its releases.
        return parse_cookie(header).getlist(name)
    # name=value pairs of plain characters: every werkzeug release splits these at
    # ";" and the first "=".
    out = []
    for part in header.split(";"):
        key, _, value = part.lstrip(" ").partition("=")
        if key == name:
            out.append(value)
    return out


def request_cookie_values(header: object, name: str) -> list[str]:
    """The values of the cookies called ``name`` in a WSGI ``HTTP_COOKIE`` value.

    PEP 3333 gives the header's bytes as a latin-1 string; it may hold any
    bytes (not always UTF-8), or, from a non-conforming server, anything else.
    A session id and our cookie name are ASCII, so a non-ASCII character can
    only make a cookie unusable: each is replaced by ``?`` (neither a separator
    nor a space, so the header splits as before) and nothing can fail to decode.
    """
    if not isinstance(header, str) or not header:
        return []
    if not header.isascii():
        header = _NON_ASCII_RE.sub("?", header)
    return cookie_values(header, name)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_VARY_COOKIE = ("Vary", "Cookie")
_SESSION_ID_LENGTH = 43  # characters of new_session_id()
_COOKIE_MAX_SIZE = 4093  # dump_cookie's default max_size: it warns above this
_EPOCH_EXPIRES = "Expires=Thu, 01 Jan 1970 00:00:00 GMT"
# (second, its HTTP date): every response in the same second sends the same Expires.
_http_date_cache: tuple[int, str] = (0, "Thu, 01 Jan 1970 00:00:00 GMT")


def _http_date(seconds: int) -> str:
    """``seconds`` (epoch, UTC) as an HTTP date, the string werkzeug's http_date gives."""
    global _http_date_cache
    cached = _http_date_cache
    if cached[0] == seconds:
        return cached[1]
    t = time.gmtime(seconds)
    text = (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )
    _http_date_cache = (seconds, text)  # one tuple, swapped whole: safe across threads
    return text


def _is_number(value: object) -> TypeGuard[float]:
    """An int or float, not a bool (True is 1 to Python, never a number of seconds here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_domain(domain: str) -> None:
    """InvalidArgumentError unless the ASCII form dump_cookie sends for ``domain`` is a
    host name (RFC 1123 labels, IDNA allowed, one optional leading dot)."""
    host = domain.removeprefix(".")
    try:
        # dump_cookie's own conversion, checked after it: IDNA maps some characters
        # to ASCII (a fullwidth semicolon becomes ";"), so the input proves nothing.
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_host = ""
    labels = ascii_host.split(".")
    if len(ascii_host) > _MAX_HOST_NAME or not all(map(_HOST_LABEL_RE.fullmatch, labels)):
        raise InvalidArgumentError(
            f"domain {domain!r} is not a host name: give labels of letters, digits and '-' "
            "joined by dots, such as 'example.org', '.example.org' or 'bücher.example' (no "
            "port, spaces, ';', ',' or '='), or None for a cookie sent only to the host "
            "that set it"
        )


def _secret_bytes(secret: object) -> bytes:
    """``secret`` as bytes; InvalidArgumentError (never showing it) unless it is
    str or bytes of at least MIN_SECRET_BYTES."""
    how = (
        f"give at least {MIN_SECRET_BYTES} random bytes, e.g. secrets.token_urlsafe(32), "
        "the same in every process that serves the app"
    )
    if isinstance(secret, str):
        try:
            raw = secret.encode()
        except UnicodeError:
            raise InvalidArgumentError(f"secret is not encodable as UTF-8: {how}") from None
    elif isinstance(secret, bytes):
        raw = secret
    else:
        raise InvalidArgumentError(
            f"secret must be str or bytes, not {type(secret).__name__}: {how}"
        )
    if len(raw) < MIN_SECRET_BYTES:
        raise InvalidArgumentError(f"secret is {len(raw)} bytes long, too short: {how}")
    return raw


class StoreKeys:
    """One-way store keys of session ids: ``prefix`` + 64 hex digits of a digest of the id.

    With ``secrets`` (current first, then fallbacks) the digest is keyed BLAKE2b-256,
    its key a BLAKE2b of the secret personalised with ``person``; without, SHA-256.
    Whoever reads the store learns digests, never an id a cookie could carry.
    """

    __slots__ = ("_keys", "_prefix")

    def __init__(
        self, prefix: str, secrets: Sequence[bytes] = (), person: bytes = _SECRET_PERSON
    ) -> None:
        self._prefix = prefix
        self._keys = tuple(
            hashlib.blake2b(s, digest_size=32, person=person).digest() for s in secrets
        )

    def __call__(self, sid: str) -> str:
        """The key ``sid`` is stored under now (with the current secret)."""
        raw = sid.encode()
        if not self._keys:
            return self._prefix + hashlib.sha256(raw).hexdigest()
        return self._prefix + hashlib.blake2b(raw, key=self._keys[0], digest_size=32).hexdigest()

    def fallbacks(self, sid: str) -> list[str]:
        """The keys ``sid`` was stored under with each fallback secret, in order."""
        raw = sid.encode()
        return [
            self._prefix + hashlib.blake2b(raw, key=key, digest_size=32).hexdigest()
            for key in self._keys[1:]
        ]


def changes(base: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(changed, deleted): the keys of ``data`` whose value differs from ``base``'s
    (deeply, telling 1, 1.0 and True apart) or is new, and the keys of ``base``
    that ``data`` lacks.  For front ends that cannot track each change (Django)."""
    changed = [k for k, v in data.items() if k not in base or not _same(v, base[k])]
    return changed, [k for k in base if k not in data]


def records_for(store: SessionStore) -> SessionRecords:
    """How sessions are kept in ``store``: natively merged HASHes on RedisStore
    (``_redis_sessions``), whole values on any other store."""
    from ._redis import RedisStore

    if isinstance(store, RedisStore):
        from ._redis_sessions import HashRecords

        return HashRecords(store)
    return WholeRecords(store)


class Plan(enum.Enum):
    """How a save wrote a session; every front end (werkzeug, Flask, Django) saves by one."""

    NOTHING = "nothing"  # nothing to write: unused, unchanged, a 5xx, or new and empty
    WHOLE = "whole"  # new or rotated: written whole under its (fresh) id
    MERGE = "merge"  # changed keys applied to the latest stored copy
    REFRESH = "refresh"  # unchanged, expiry re-saved (sliding expiry)
    END = "end"  # invalidated and left empty: the stored copy deleted
    VANISHED = "vanished"  # a merge or refresh found the stored copy gone: nothing written


class Saved(NamedTuple):
    """What :meth:`SessionManager.finish` did for a response, for the front end to send."""

    plan: Plan
    cookie: Literal["keep", "set", "expire"]  # leave the cookie, (re)send it, expire it
    expires: float = 0.0  # with "set": the stored expiry, epoch seconds
    vary: bool = False  # the response depends on the cookie (the session was used)


_UNUSED = Saved(Plan.NOTHING, "keep")  # never loaded: no store access, no Vary
_UNCHANGED = Saved(Plan.NOTHING, "keep", vary=True)  # also a 5xx: saves nothing
_ENDED = Saved(Plan.END, "expire", vary=True)
_GONE = Saved(Plan.VANISHED, "keep", vary=True)


@dataclass(frozen=True, kw_only=True)
class SessionOptions:
    """Cookie and lifetime options; every keyword of ``with_session`` and
    ``SessionMiddleware`` is a field here.  Raises InvalidArgumentError (a
    ValueError and TypeError) for bad values.

    ``lifetime``: seconds a session lives after its last save (at most
    MAX_LIFETIME, 400 days); also the cookie's Max-Age.  ``refresh_threshold``:
    a read-only request re-saves the expiry (and re-sends the cookie) only when
    less than this many seconds remain; ``None`` means ``lifetime / 2``, ``0``
    means a fixed lifetime that only changes save.  ``secure``: send the cookie
    over HTTPS only (turn on in production).  ``domain``: a host name, or None
    for the host that set the cookie.  ``key_prefix``: prepended to the id's
    digest to form the store key.  ``secret``: str or bytes of at least 32
    bytes, the same in every process; with it the store key is a keyed digest
    of the id (never shown by ``repr``).
    """

    cookie_name: str = DEFAULT_COOKIE_NAME
    lifetime: float = DEFAULT_LIFETIME
    refresh_threshold: float | None = None
    secure: bool = False
    httponly: bool = True
    samesite: Literal["Lax", "Strict", "None"] | None = "Lax"
    path: str = "/"
    domain: str | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX
    secret: str | bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        name = self.cookie_name
        if not (isinstance(name, str) and _COOKIE_NAME_RE.fullmatch(name)):
            raise InvalidArgumentError(
                f"cookie_name {name!r} is not a cookie name token: use letters, digits and "
                "!#$%&'*+-.^_`|~"
            )
        lifetime = self.lifetime
        if not (_is_number(lifetime) and 0 < lifetime <= MAX_LIFETIME):
            raise InvalidArgumentError(
                f"lifetime must be a number of seconds above 0 and at most {MAX_LIFETIME:.0f} "
                f"(400 days, as long as browsers keep a cookie), not {lifetime!r}"
            )
        threshold = self.refresh_threshold
        if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= lifetime):
            raise InvalidArgumentError(
                f"refresh_threshold must be None or between 0 and lifetime ({lifetime}) "
                f"seconds, not {threshold!r}"
            )
        for flag in ("secure", "httponly"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidArgumentError(
                    f"{flag} must be True or False, not {getattr(self, flag)!r}"
                )
        if self.samesite not in ("Lax", "Strict", "None", None):
            raise InvalidArgumentError(
                f"samesite must be 'Lax', 'Strict', 'None' or None, not {self.samesite!r}"
            )
        if self.samesite == "None" and not self.secure:
            raise InvalidArgumentError(
                "samesite='None' requires secure=True; browsers reject it otherwise"
            )
        path = self.path
        if not (isinstance(path, str) and path.startswith("/")) or _BAD_PATH_RE.search(path):
            raise InvalidArgumentError(
                f"path must be a str starting with '/' without ';' or control characters, "
                f"not {path!r}"
            )
        if self.domain is not None:
            if not isinstance(self.domain, str):
                raise InvalidArgumentError(
                    f"domain must be a str or None, not {type(self.domain).__name__}"
                )
            _check_domain(self.domain)
        # Browsers drop a prefixed cookie that breaks its prefix's rules, silently.
        if name.lower().startswith(("__secure-", "__host-")) and not self.secure:
            raise InvalidArgumentError(f"cookie_name {name!r} requires secure=True")
        if name.lower().startswith("__host-") and (self.domain is not None or path != "/"):
            raise InvalidArgumentError(f"cookie_name {name!r} requires domain=None and path='/'")
        if not isinstance(self.key_prefix, str):
            raise InvalidArgumentError(
                f"key_prefix must be a str, not {type(self.key_prefix).__name__}"
            )
        if self.secret is not None:
            _secret_bytes(self.secret)

    @property
    def threshold(self) -> float:
        """The effective refresh threshold in seconds."""
        return self.lifetime / 2 if self.refresh_threshold is None else self.refresh_threshold


_MISSING: Any = object()
_NO_SNAPSHOTS: Mapping[str, Any] = MappingProxyType({})
_NO_KEYS: frozenset[str] = frozenset()
_NOTHING: list[str] = []  # shared, never changed
_MUTABLE = (dict, list, set, bytearray)


def _same(a: Any, b: Any) -> bool:
    """Deep equality that also tells 1, 1.0 and True apart (they serialise differently)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class Session(MutableMapping[str, Any]):
    """The session of one request: a mapping of str keys to serialisable values.

    Loaded from the store on first use.  Changes are tracked per key, including
    in-place changes to list and dict values, and saved when the response is
    sent (not for 5xx responses or escaped exceptions).
    """

    # Class-level defaults for what most requests never change: a Session costs
    # three attribute writes until it is used, and its containers come with _load.
    _sid = ""
    _key = ""  # the store key of _sid, once found stored
    _new = True
    _expires = 0.0
    _force = False
    _rotated = False
    _invalidated = False
    _base: dict[str, Any]  # the data as loaded; values shared until replaced
    _data: dict[str, Any]  # _base itself until the first change (__setitem__, __delitem__)
    # Empty and immutable until first needed, then replaced, never changed in place:
    _snapshots: dict[str, Any] | Mapping[str, Any] = _NO_SNAPSHOTS  # pristine copies of
    _set_keys: set[str] | frozenset[str] = _NO_KEYS  # mutable values handed out; keys set
    _flashes: list[Any]  # as loaded: [category, message] pairs
    _flash_ids: Sequence[Any] = ()  # the store's id of each of _flashes, for the merge
    _consumed: frozenset[int] = frozenset()  # indexes into _flashes read by this request
    _new_flashes: tuple[list[Any], ...] = ()
    _dead_ids: tuple[str, ...] = ()  # stored ids to delete once the save succeeded

    def __init__(self, manager: SessionManager, candidates: Sequence[str]) -> None:
        self._manager = manager
        self._candidates = candidates
        self._loaded = False

    # -- loading --------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        now = _clock()
        tries = 0
        for sid in self._candidates:
            if not (isinstance(sid, str) and _SESSION_ID_RE.fullmatch(sid)):
                continue  # costs a regex match: junk is skipped, not counted
            tries += 1
            if tries > _MAX_COOKIE_CANDIDATES:
                break
            key = self._manager.store_key(sid)
            try:
                stored = self._manager.fetch(key, sid, now)
            except BaseException:
                self._loaded = False  # not loaded: nothing to save, and a later use tries again
                raise
            if stored is not None:
                self._sid, self._key, self._new = sid, key, False
                self._data, self._expires, self._flashes, self._flash_ids = stored
                self._base = self._data
                return
        self._sid = new_session_id()
        self._base = self._data = {}
        self._flashes = []

    # -- public attributes ----------------------------------------------------

    @property
    def id(self) -> str:
        """The session id (the cookie value); changes on rotate() and invalidate()."""
        self._load()
        return self._sid

    @property
    def new(self) -> bool:
        """True if no stored session was found for this request (or it was invalidated)."""
        self._load()
        return self._new

    @property
    def accessed(self) -> bool:
        """True once the session was used in this request (its responses vary by cookie)."""
        return self._loaded

    @property
    def modified(self) -> bool:
        """True if this request changed the session; set True to force saving every key."""
        if not self._loaded:
            return False
        return bool(
            self._force
            or self._rotated
            or self._invalidated
            or self._new_flashes
            or self._consumed
            or self.changed_keys()
            or self.deleted_keys()
        )

    @modified.setter
    def modified(self, value: bool) -> None:
        self._load()
        self._force = bool(value)

    @property
    def expires(self) -> float | None:
        """Server-side expiry of the stored session (epoch seconds); None if not stored."""
        self._load()
        return None if self._new else self._expires

    # -- the mapping ----------------------------------------------------------

    # The hot methods test _loaded themselves: a call to _load costs more than its work.

    def __getitem__(self, key: str) -> Any:
        if not self._loaded:
            self._load()
        value = self._data[key]
        if isinstance(value, _MUTABLE):
            self._handed_out(key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]`` if the key exists, else ``default`` (no KeyError raised and caught)."""
        if not self._loaded:
            self._load()
        data = self._data
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, _MUTABLE):
            self._handed_out(key, value)
        return value

    def _handed_out(self, key: str, value: Any) -> None:
        snapshots = self._snapshots
        if key not in snapshots and key not in self._set_keys:
            # Handed out and may be changed in place: keep a pristine copy to compare at save.
            if not isinstance(snapshots, dict):
                snapshots = self._snapshots = {}
            snapshots[key] = copy.deepcopy(value)

    def _own_data(self) -> dict[str, Any]:
        """_data, copied from _base before its first change (a read never copies)."""
        if self._data is self._base:
            self._data = dict(self._base)
        return self._data

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session keys must be str, not {type(key).__name__}")
        if not self._loaded:
            self._load()
        self._own_data()[key] = value
        keys = self._set_keys
        if not isinstance(keys, set):
            keys = self._set_keys = set()
        keys.add(key)

    def __delitem__(self, key: str) -> None:
        self._load()
        del self._own_data()[key]
        if key in self._set_keys:
            self._set_keys = self._set_keys - {key}

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._data)

    def __len__(self) -> int:
        self._load()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        if not self._loaded:
            self._load()
        return key in self._data

    def __repr__(self) -> str:
        if not self._loaded:
            return "<Session unloaded keys=[]>"
        state = "new" if self._new else "stored"
        return f"<Session {state} keys={sorted(self._data)!r}>"

    # -- change tracking --------------------------------------------------------

    def changed_keys(self) -> list[str]:
        """Keys whose value this request set or changed in place (and that still exist)."""
        if not self._loaded:
            return []
        if self._force:
            return list(self._data)
        data, base, snapshots = self._data, self._base, self._snapshots
        out = []
        for key in self._set_keys | snapshots.keys() if snapshots else self._set_keys:
            if key not in data:
                continue
            pristine = snapshots.get(key, base.get(key, _MISSING))
            if pristine is _MISSING or not _same(data[key], pristine):
                out.append(key)
        return out

    def deleted_keys(self) -> list[str]:
        """Keys that were stored when the session was loaded and are gone now."""
        if not self._loaded:
            return []
        return [key for key in self._base if key not in self._data]

    # -- lifecycle --------------------------------------------------------------

    def rotate(self) -> None:
        """Give the session a fresh id and keep its data (call on login).

        The old id is deleted from the store when the response is saved.
        """
        self._load()
        if not self._new:
            self._dead_ids = (*self._dead_ids, self._sid)
        self._sid = new_session_id()
        self._rotated = True

    def _stored(self, expires: float) -> None:
        """The manager saved this session, to expire at ``expires``."""
        self._new, self._expires = False, expires

    def invalidate(self) -> None:
        """Drop the session and its data (call on logout).

        The stored session is deleted and the cookie expired when the response
        is saved.  Data set afterwards (a flash message, say) starts a new
        session under a fresh id.
        """
        self._load()
        if not self._new:
            self._dead_ids = (*self._dead_ids, self._sid)
        self._sid = new_session_id()
        self._new = True
        self._invalidated = True
        self._base = self._data = {}
        self._snapshots, self._set_keys = _NO_SNAPSHOTS, _NO_KEYS
        self._force = False
        self._flashes, self._flash_ids, self._consumed, self._new_flashes = [], (), frozenset(), ()

    # -- flash messages ---------------------------------------------------------

    def flash(self, message: Any, category: str = "message") -> None:
        """Queue ``message`` (serialisable, usually str) to show on a later request.

        Raises InvalidArgumentError if ``category`` is not a str.
        """
        if type(category) is not str:
            raise InvalidArgumentError(
                f"flash category must be a str, not {type(category).__name__}"
            )
        self._load()
        self._new_flashes = (*self._new_flashes, [category, message])

    def get_flashed_messages(
        self, *, with_categories: bool = False, category_filter: Iterable[str] = ()
    ) -> list[Any]:
        """Return and consume the queued messages, oldest first.

        With ``category_filter`` only matching messages are returned and
        consumed.  With ``with_categories`` items are ``(category, message)``.
        """
        self._load()
        wanted = set(category_filter)
        out: list[Flash] = []
        consumed = set(self._consumed)
        for index, item in enumerate(self._flashes):
            if index in consumed or not (isinstance(item, list) and len(item) == 2):
                continue
            if not wanted or item[0] in wanted:
                consumed.add(index)
                out.append((item[0], item[1]))
        self._consumed = frozenset(consumed)
        kept = []
        for item in self._new_flashes:
            if not wanted or item[0] in wanted:
                out.append((item[0], item[1]))
            else:
                kept.append(item)
        self._new_flashes = tuple(kept)
        return list(out) if with_categories else [message for _, message in out]

    def _remaining_flashes(self) -> list[Any]:
        kept = [f for i, f in enumerate(self._flashes) if i not in self._consumed]
        return kept + list(self._new_flashes)

    def _consumed_ids(self) -> list[Any]:
        ids = self._flash_ids
        return [ids[index] for index in sorted(self._consumed)]


class SessionManager:
    """Loads sessions from a store and saves them; shared by the WSGI layers.

    Thread-safe: it holds no per-request state.
    """

    def __init__(
        self, store: SessionStore, options: SessionOptions, records: SessionRecords | None = None
    ) -> None:
        self.store = store
        self.options = options
        self.records = records_for(store) if records is None else records
        """How sessions are kept in ``store`` (``_records``): a HASH each on
        RedisStore, one value each on any other store."""
        secrets = () if options.secret is None else (_secret_bytes(options.secret),)
        self.store_key = StoreKeys(options.key_prefix, secrets)
        """The store key of a session id: ``key_prefix`` + 64 hex digits of a one-way
        digest of it (keyed BLAKE2b-256 with a secret, else SHA-256)."""
        self._lifetime = options.lifetime
        self._threshold = options.threshold
        self._max_age = math.ceil(options.lifetime)
        self._cookie_attributes: dict[str, Any] = {
            "path": options.path,
            "domain": options.domain,
            "secure": options.secure,
            "httponly": options.httponly,
            "samesite": options.samesite,
        }
        # dump_cookie costs tens of microseconds a call: build werkzeug's header once
        # for these options and cut it around the value and the Expires date, so a
        # response only fills in the id (which never needs quoting) and the date.
        sample = dump_cookie(
            options.cookie_name,
            "",
            max_age=self._max_age,
            expires=0,
            max_size=0,  # no size warning for the sample; see below
            **self._cookie_attributes,
        )
        head = options.cookie_name.encode().decode("latin1") + "="
        before, found, after = sample[len(head) :].partition(_EPOCH_EXPIRES)
        self._cookie_template: tuple[str, str, str] | None = None
        if (
            sample.startswith(head)
            and found
            and len(sample) + _SESSION_ID_LENGTH <= _COOKIE_MAX_SIZE
        ):
            self._cookie_template = (head, before + "Expires=", after)
        # else dump_cookie on every response, so its too-large warning is still given

    def open(self, cookie_values: Sequence[str]) -> Session:
        """Return the (lazily loaded) session for the request's cookie values."""
        return Session(self, cookie_values)

    def fetch(self, key: str, sid: str, now: float) -> Stored | None:
        """Return the session stored under ``key`` (session ``sid``'s store key), or
        None (also when expired at ``now``, of the wrong shape or undecodable)."""
        try:
            return self.records.load(key, now)
        except SerializationError as e:
            # A serializer's complaint may quote the stored value, which an app may
            # have made hold the id: never log a session id.
            reason = str(e).replace(sid, "<id>")
            log.warning("stored session could not be read (%s); starting a new session", reason)
            return None

    def finish(self, session: Session, status: int) -> Saved:
        """Save ``session`` for a response with HTTP ``status``; say what was done.

        A 5xx ``status`` saves nothing.  Raises the store's SessionStoreError
        when the save failed: nothing was written, the stored session is as it
        was, the reason is logged (never with the id), and the front end
        answers 500.
        """
        if not session._loaded:
            return _UNUSED
        if status >= 500:
            return _UNCHANGED
        try:
            return self._save(session)
        except StoreUnavailableError:
            raise  # not the session's fault: the front end answers 503 and says why
        except SessionStoreError as e:
            # The store's message names the key (a digest: no secret) and may quote
            # a value, which an app may have made hold the id: never log a session id.
            reason = str(e).replace(session._sid, "<id>")
            log.error(
                "session not saved, answering 500: %s: %s (changed keys: %s). "
                "Session values must be "
                "serialisable by the store's serializer (JSON by default: str, int, float, bool, "
                "None, and lists and dicts of them) and fit in a store page; "
                "the stored session was left unchanged.",
                type(e).__name__,
                reason,
                sorted(session.changed_keys()),
            )
            raise

    def headers(self, saved: Saved, session: Session) -> list[tuple[str, str]]:
        """The response headers (Vary, Set-Cookie) that send ``saved`` for ``session``."""
        if not saved.vary:
            return []
        if saved.cookie == "keep":
            return [_VARY_COOKIE]
        if saved.cookie == "set":
            return [_VARY_COOKIE, ("Set-Cookie", self.cookie_header(session._sid, saved.expires))]
        return [_VARY_COOKIE, ("Set-Cookie", self.expired_cookie_header())]

    def cookie_header(self, sid: str, expires: float) -> str:
        """The Set-Cookie value that gives a browser ``sid`` until ``expires`` (epoch s)."""
        template = self._cookie_template
        if template is not None:
            return f"{template[0]}{sid}{template[1]}{_http_date(int(expires))}{template[2]}"
        return dump_cookie(
            self.options.cookie_name,
            sid,
            max_age=self._max_age,
            expires=int(expires),
            **self._cookie_attributes,
        )

    def expired_cookie_header(self) -> str:
        """The Set-Cookie value that makes a browser drop the session cookie."""
        return dump_cookie(
            self.options.cookie_name, "", max_age=0, expires=0, **self._cookie_attributes
        )

    # -- internals ----------------------------------------------------------------

    def _save(self, s: Session) -> Saved:
        """Write what changed, by the session's plan.

        The cookie is sent exactly when the stored expiry was set (a new,
        rotated or changed session, or a sliding refresh), so its Max-Age and
        Expires always match the server's; and expired with an invalidation.
        """
        records, key_of, lifetime = self.records, self.store_key, self._lifetime
        now = _clock()
        expires = now + lifetime
        if s._new or s._rotated:
            flashes = s._remaining_flashes()
            if s._new and not s._data and not flashes:
                for sid in s._dead_ids:
                    records.delete(key_of(sid))
                return _ENDED if s._invalidated else _UNCHANGED
            records.write(key_of(s._sid), s._data, expires, flashes, lifetime)
            for sid in s._dead_ids:
                records.delete(key_of(sid))
            s._stored(expires)
            return Saved(Plan.WHOLE, "set", expires, True)
        # Neither new, rotated nor invalidated (that makes it new): this is `modified`.
        # Keys only enter _data through __setitem__, which records them in _set_keys:
        # with none recorded, handed out or forced, and no key fewer, nothing changed.
        if s._set_keys or s._snapshots or s._force or len(s._data) != len(s._base):
            changed, deleted = s.changed_keys(), s.deleted_keys()
        else:
            changed = deleted = _NOTHING
        if changed or deleted or s._force or s._new_flashes or s._consumed:
            plan = Plan.MERGE
            kept = records.merge(  # s._key: it was found stored
                s._key, s._data, changed, deleted, expires, lifetime, now,
                s._consumed_ids(), s._new_flashes,
            )
        elif s._expires - now < self._threshold:
            plan = Plan.REFRESH
            kept = records.refresh(s._key, expires, lifetime, now)
        else:
            return _UNCHANGED
        if not kept:
            log.info("session ended by another request before this one saved; changes dropped")
            return _GONE
        s._stored(expires)
        return Saved(plan, "set", expires, True)
