"""How a session is kept in a store: the record operations every front end saves by.

A session is (data, expiry, flash messages).  The session layers load it and
then save by one of four writes (``_session.Plan``): whole, merge, refresh,
delete.  Two kinds of store keep it differently:

- ``WholeRecords``, on any store with ``get``/``set``/``get_and_set``/``delete``
  (MmapStore; any store object of one's own): the session is one value,
  ``{"d": data, "e": expiry, "f": [[category, message], ...]}``, and a merge
  reads the latest copy and applies the request's changes to it inside
  ``get_and_set``, under the store's lock.
- ``_redis_sessions.HashRecords``, on RedisStore: one Redis HASH per session, a
  field per data key; a merge sends only the changed fields and the deleted
  names, in one script, without reading the session first.

Both keep the same rules: a merge or refresh writes nothing when the stored
session has gone (a concurrent logout, expiry, eviction), so a session is never
resurrected; the whole session has one expiry; a new session is written whole.
Flash messages are handed out with an id each (``Stored.flash_ids``) that a
merge names to remove the ones this request consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, TypeGuard

__all__ = [
    "FAR_FUTURE",
    "SessionRecords",
    "SessionStore",
    "Stored",
    "When",
    "WholeRecords",
    "is_flash",
    "merge_changes",
    "parse_stored",
    "record",
]

# Keys of the stored value.
DATA = "d"
EXPIRES = "e"
FLASHES = "f"

# No session we write expires this late; the bound keeps float() of a stored int finite.
FAR_FUTURE = 2.0**53

When = Literal["always", "absent", "present"]
"""When a whole write happens: always, only if no session is stored under the key
(a create), or only if one is (an update that must not resurrect)."""


class SessionStore(Protocol):
    """What ``WholeRecords`` needs from a store (MmapStore and RedisStore provide it)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any, expire: float | None = None) -> None: ...

    def delete(self, key: str) -> bool: ...

    def get_and_set(
        self, key: str, fn: Callable[[Any], Any], expire: float | None = None
    ) -> Any: ...


class Stored(NamedTuple):
    """A session as loaded: its data, expiry (epoch seconds), flash messages
    (``[category, message]`` pairs, oldest first) and an id for each of them."""

    data: dict[str, Any]
    expires: float
    flashes: list[list[Any]]
    flash_ids: Sequence[Any]


class SessionRecords(Protocol):
    """The record operations of one store.  Every method raises the store's
    SessionStoreError when it fails, and then wrote nothing."""

    def load(self, key: str, now: float) -> Stored | None:
        """The session under ``key``, or None when absent, expired at ``now`` or of
        the wrong shape; SerializationError when it cannot be decoded."""

    def write(
        self, key: str, data: Mapping[str, Any], expires: float, flashes: Sequence[list[Any]],
        life: float, when: When = "always",
    ) -> bool:
        """Store a whole session living ``life`` seconds; False when ``when`` refused."""

    def merge(
        self, key: str, data: Mapping[str, Any], changed: Iterable[str], deleted: Iterable[str],
        expires: float, life: float, now: float, consumed: Sequence[Any] = (),
        new_flashes: Sequence[list[Any]] = (),
    ) -> bool:
        """Apply one request's changes to the latest stored session: the ``changed``
        keys take ``data``'s values, the ``deleted`` ones go, the ``consumed``
        flash ids go and ``new_flashes`` join; the expiry becomes ``expires``.
        False, writing nothing, when the session is gone (or expired at ``now``)."""

    def refresh(self, key: str, expires: float, life: float, now: float) -> bool:
        """Give the stored session a new expiry; False when it is gone."""

    def delete(self, key: str) -> bool:
        """Remove the session; True if one was stored."""


def is_flash(item: Any) -> TypeGuard[list[Any]]:
    """A flash message as stored: ``[category (str), message]``."""
    return type(item) is list and len(item) == 2 and type(item[0]) is str


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_stored(value: Any, now: float) -> Stored | None:
    """The session in a whole stored value, or None if unusable or expired at ``now``.

    Anything may be stored under a session's key (by another writer of the
    store): a value of any other shape, a NaN, infinite or huge expiry, or
    flashes that are not [category, message] pairs never raise later.
    """
    if not isinstance(value, dict):
        return None
    data, expires, flashes = value.get(DATA), value.get(EXPIRES), value.get(FLASHES)
    if not (isinstance(data, dict) and _is_number(expires) and now < expires < FAR_FUTURE):
        return None
    if not isinstance(flashes, list):
        flashes = []  # also when absent
    elif flashes and not all(is_flash(item) for item in flashes):
        flashes = [item for item in flashes if is_flash(item)]
    return Stored(data, float(expires), flashes, flashes)  # a flash is its own id


def record(data: Mapping[str, Any], expires: float, flashes: Sequence[list[Any]]) -> dict[str, Any]:
    """The whole stored value of a session."""
    return {DATA: data, EXPIRES: expires, FLASHES: list(flashes)}


def merge_changes(
    stored: dict[str, Any], data: Mapping[str, Any], changed: Iterable[str], deleted: Iterable[str]
) -> dict[str, Any]:
    """``stored`` (the latest stored data) with this request's changes applied: the
    ``changed`` keys take ``data``'s values, the ``deleted`` ones go.  Every other
    key keeps what a concurrent request may have written meanwhile."""
    for key in changed:
        stored[key] = data[key]
    for key in deleted:
        stored.pop(key, None)
    return stored


class _Refused(Exception):
    """Raised inside get_and_set so that nothing is written."""


class WholeRecords:
    """Sessions as one value each, on any ``SessionStore`` (see the module docstring)."""

    __slots__ = ("store",)

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def load(self, key: str, now: float) -> Stored | None:
        return parse_stored(self.store.get(key), now)

    def write(
        self, key: str, data: Mapping[str, Any], expires: float, flashes: Sequence[list[Any]],
        life: float, when: When = "always",
    ) -> bool:
        value = record(data, expires, flashes)
        if when == "always":
            self.store.set(key, value, expire=life)
            return True

        def write(current: Any) -> Any:
            # A stored value of another shape counts as no session, as load() says.
            present = current is not None and parse_stored(current, 0.0) is not None
            if present != (when == "present"):
                raise _Refused
            return value

        try:
            self.store.get_and_set(key, write, expire=life)
        except _Refused:
            return False
        return True

    def merge(
        self, key: str, data: Mapping[str, Any], changed: Iterable[str], deleted: Iterable[str],
        expires: float, life: float, now: float, consumed: Sequence[Any] = (),
        new_flashes: Sequence[list[Any]] = (),
    ) -> bool:
        def merge(current: Any) -> Any:
            stored = parse_stored(current, now)
            if stored is None:
                raise _Refused
            flashes = stored.flashes
            if consumed or new_flashes:
                flashes = list(flashes)
                for item in consumed:
                    try:
                        flashes.remove(item)
                    except ValueError:
                        pass  # a concurrent request consumed it already
                flashes += new_flashes
            return record(merge_changes(stored.data, data, changed, deleted), expires, flashes)

        return self._update(key, merge, life)

    def refresh(self, key: str, expires: float, life: float, now: float) -> bool:
        def refresh(current: Any) -> Any:
            if parse_stored(current, now) is None:
                raise _Refused
            current[EXPIRES] = expires
            return current

        return self._update(key, refresh, life)

    def _update(self, key: str, fn: Callable[[Any], Any], life: float) -> bool:
        try:
            self.store.get_and_set(key, fn, expire=life)
        except _Refused:
            return False
        return True

    def delete(self, key: str) -> bool:
        return self.store.delete(key)
