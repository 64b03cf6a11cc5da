"""MmapStore: a key-value store in one memory-mapped file shared by processes and threads.

The layers, each in its own module:

* ``_layout``: the file format and its invariants (the one definition);
* ``_locks``: the page lock protocol (robust process-shared mutexes) and lock order;
* ``_pager``: the hot path (placement on two candidate pages, lock-free reads,
  the write path), with ``_speedups`` its C twin;
* ``_upkeep``: page maintenance (the page rewrite through the spare that serves
  making room, eviction, compaction and repair; reading a page by the repair rules);
* this module: the file's lifecycle, fork handling, the public API, and the
  whole-store operations (purge, clear, keys, items, stats, pages, check, verify).
"""

from __future__ import annotations

import contextlib
import enum
import math
import mmap
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final, Literal, NamedTuple, overload

from . import _layout as L
from ._args import key_bytes, lifetime, size, timeout
from ._base import CallbackThreads, MmapStats, StoreBase
from ._errors import (
    FileFormatError,
    InvalidArgumentError,
    LockTimeoutError,
    SerializationError,
    StoreClosedError,
    ValueTooLargeError,
)
from ._file import open_or_create
from ._layout import pages_of
from ._locks import recover
from ._pager import BUSY, FastPager
from ._serializers import Codec
from ._upkeep import Survey, Upkeep

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_PAGE_SIZE", "NEVER", "MmapStore", "PageInfo"]

NEVER = 0
"""Pass as ``expire`` for entries that never expire (so does ``math.inf``)."""
DEFAULT_CACHE_SIZE = 64 << 20
DEFAULT_PAGE_SIZE = 64 << 10
DEFAULT_LOCK_TIMEOUT = 10.0


_entry_at = L.ENTRY.unpack_from

_live_stores: weakref.WeakSet[MmapStore] = weakref.WeakSet()


def _too_large(page_size: int, max_entry: int, klen: int, vlen: int) -> ValueTooLargeError:
    return ValueTooLargeError(
        f"value of {vlen} bytes (key {klen} bytes) cannot fit in a page of {page_size} bytes: "
        f"the largest entry is {max_entry - L.ENTRY_SIZE} bytes of key plus value. Store less, "
        "or create the store file with a larger page_size."
    )


class PageInfo(NamedTuple):
    """One page as ``MmapStore.pages()`` read it, under its lock."""

    page: int
    entries: int
    """Entries in the page, expired ones included until purged."""
    expired: int
    """Of those, entries past their expiry (purge, or the next write that needs room, drops them)."""
    bytes_used: int
    """Bytes their entries fill (headers, keys, values, padding)."""
    capacity: int
    """Bytes of the page's data area."""
    lru_idle: float | None
    """Seconds since its least recently used entry was last read or written (what
    eviction drops first); None for an empty page.  Access times are hints of 1/16 s."""
    mru_idle: float | None
    """Seconds since its most recently used entry was last read or written."""
    evictions: int
    """Unexpired entries this page dropped for room, ever."""
    expirations: int
    """Expired entries removed from this page, ever."""
    recovered: int
    """Times this page was repaired."""
    problems: tuple[str, ...]
    """What is wrong with the page (``MmapStore.verify``); empty when sound."""


class _Absent(enum.Enum):
    """What add() and touch() have their update callback given for an absent key."""

    ABSENT = 0


_ABSENT: Final = _Absent.ABSENT


class _Refused(Exception):
    """Raised by add()'s and touch()'s callback so that nothing is written."""


def _after_fork_in_child() -> None:
    for store in list(_live_stores):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


def reopen_inherited() -> list[MmapStore]:
    """In a forked child: open now every store that was open when the process forked
    (each would otherwise reopen on its first use); returns them.  Closed ones stay
    closed, and stores opened since the fork are left as they are."""
    stores = [store for store in list(_live_stores) if store.inherited]
    for store in stores:
        store.reopen()
    return stores


def default_path(app_name: str | None) -> str:
    """``<tempdir>/<app_name>_session_data``, as Cache::FastMmap's session store names it."""
    if app_name is not None and (type(app_name) is not str or not app_name.isprintable() or "/" in app_name):
        raise InvalidArgumentError(
            f"app_name={app_name!r}: use a plain name (printable, no '/'), or pass path= for another directory"
        )
    return os.path.join(tempfile.gettempdir(), f"{app_name or 'prefork_sessions'}_session_data")


def store_path(path: object) -> str:
    """A ``path`` argument as a str path, or InvalidArgumentError."""
    try:
        raw = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgumentError(f"path={path!r}: use a str, bytes or os.PathLike file path") from None
    text = os.fsdecode(raw)
    if not text or "\0" in text:
        raise InvalidArgumentError(f"path={path!r}: use a non-empty file path without NUL characters")
    return text


class _Host:
    """What the pager of one open file asks of its store (``_upkeep.Host``): the
    errors to raise, naming the file, and resetting a damaged lock."""

    def __init__(
        self, path: str, lock_timeout: float, mm: mmap.mmap, fd: int, page_size: int, slots: int, codec: Codec
    ) -> None:
        self._path, self._lock_timeout, self._mm, self._fd, self._codec = path, lock_timeout, mm, fd, codec
        self._ps, self._slots = page_size, slots
        weakref.finalize(self, os.close, fd)  # the descriptor is the host's: it goes with the last pager

    def timeout(self, page: int) -> LockTimeoutError:
        return LockTimeoutError(
            f"page {page} of {self._path} stayed locked for {self._lock_timeout:g}s; a live process "
            "holds it (dead holders release automatically). Look for a slow get_and_set() callback "
            "or raise lock_timeout."
        )

    def meddled(self, page: int) -> FileFormatError:
        return FileFormatError(
            f"page {page} of {self._path} failed its checks again right after being repaired: "
            "something other than prefork_sessions is writing to the file. Stop it, or move the "
            "store to a path only this application uses."
        )

    def too_large(self, klen: int, vlen: int) -> ValueTooLargeError:
        return _too_large(self._ps, self._ps - L.data_start(self._slots), klen, vlen)

    def key(self, key: object) -> tuple[bytes, bool]:
        return key_bytes(key)

    def codec_error(self, error: Exception, key: object, decoding: bool) -> SerializationError:
        return self._codec.decode_error(self._path, error) if decoding else self._codec.encode_error(key, error)

    def recover(self, page: int, wedged: bool) -> None:
        recover(self._mm, self._fd, L.page_offset(self._ps, page) + L.OFF_LOCK, wedged)


class _Closed:
    """In place of a closed store's pager, words and maintenance: any use raises
    StoreClosedError.  close() only lets go of the open file's objects, never
    unmapping under a call still inside them (a thread in a get_and_set callback
    holds a page lock on that mapping); the mapping and descriptor go when the
    last of them lets go, at once when none is running."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> Any:
        raise StoreClosedError(f"store {self._path} is closed; call reopen() to use it again")


class MmapStore(StoreBase):
    """A session/cache store in one mmap'ed file, shared by forked workers and threads.

    ``cache_size`` and ``page_size`` (bytes) only matter when the file is created;
    an existing file's own geometry is adopted.  ``expire`` is the default
    lifetime in seconds (``0``/``NEVER`` = never).  ``serializer`` is ``"json"``,
    ``"raw"`` (bytes in, bytes out), ``"pickle"`` or an object with
    ``dumps``/``loads``.  ``lock_timeout`` (seconds) bounds every lock wait.

    With ``create=False`` only an existing file is opened (StorePathError if
    there is none).  Every open store holds the file's open lock shared;
    ``exclusive=True`` holds it alone, for maintenance that replaces the file:
    LockTimeoutError if another process keeps the file open for ``lock_timeout``.
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike[str] | None = None,
        *,
        app_name: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        page_size: int = DEFAULT_PAGE_SIZE,
        expire: float = NEVER,
        serializer: Any = "json",
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        create: bool = True,
        exclusive: bool = False,
    ) -> None:
        page_size = size(page_size, "page_size")
        cache_size = size(cache_size, "cache_size")
        self._lock_timeout = timeout(lock_timeout, "lock_timeout")
        if not (L.MIN_PAGE_SIZE <= page_size <= L.MAX_PAGE_SIZE) or page_size % 1024:
            raise InvalidArgumentError(
                f"page_size={page_size}: use a multiple of 1024 between {L.MIN_PAGE_SIZE} and {L.MAX_PAGE_SIZE}"
            )
        if not page_size <= cache_size <= page_size * L.U32_MASK:
            raise InvalidArgumentError(
                f"cache_size={cache_size}: use at least one page ({page_size} bytes) and at most "
                f"{L.U32_MASK} pages; raise page_size for a larger store"
            )
        self.path = store_path(path) if path is not None else default_path(app_name)
        self._want_geometry = (page_size, cache_size // page_size)
        self._create, self._exclusive = bool(create), bool(exclusive)
        super().__init__(expire=expire, serializer=serializer)
        self._dumps, self._loads = self._codec.dumps, self._codec.loads
        self._raw_dumps = None if self.serializer == "raw" else self._dumps  # raw: the pagers take bytes as is
        self._mm: mmap.mmap | None = None
        self._stale = False
        self._open_lock = threading.Lock()
        self._open()
        _live_stores.add(self)

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        fd, geo = open_or_create(self.path, *self._want_geometry, create=self._create,
                                 exclusive=self._exclusive, wait=self._lock_timeout)
        try:
            mm = mmap.mmap(fd, L.file_size(geo.page_size, geo.num_pages), mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._max_used = int(geo.slots * L.MAX_LOAD)
        self._w = L.Words(mm)
        host = _Host(self.path, self._lock_timeout, mm, fd, geo.page_size, geo.slots, self._codec)
        self._pager = FastPager(mm, geo.seed, geo.num_pages, geo.page_size, geo.slots, self._max_used,
                                host, self._lock_timeout)
        self._upkeep = Upkeep(self._pager, host, mm, self._w, geo.seed, geo.num_pages, geo.page_size,
                              geo.slots, self._max_used)
        self.page_size, self.num_pages = geo.page_size, geo.num_pages
        self._seed, self._nslots = geo.seed, geo.slots
        self._d0 = L.data_start(geo.slots)
        self._max_entry = geo.page_size - self._d0
        self._stale = False
        # Last: other threads take a set _mm to mean "open", without the open lock.
        self._mm = mm

    def _forget_parent(self) -> None:
        """In a forked child: let go of the parent's descriptor, mapping and pager, and
        reopen lazily, so the child uses its own descriptor (the inherited one shares
        the parent's open file description, whose OFD locks serialise lock resets)
        and its own in-process state (a callback guard or open lock that another
        thread held at fork time would never be released)."""
        if self._mm is None:
            return
        self._close_file()
        self._stale = True
        self._busy = CallbackThreads()
        self._open_lock = threading.Lock()

    @property
    def inherited(self) -> bool:
        """True in a forked child until the store reopens the file it inherited."""
        return self._stale

    def reopen(self) -> None:
        """Re-open and re-map the same file (call in a worker after fork; idempotent)."""
        self._close_file()
        self._busy = CallbackThreads()
        self._open()

    def close(self) -> None:
        """Unmap and close the file.  Later calls raise StoreClosedError; ``reopen()`` revives."""
        self._close_file()
        self._stale = False

    def _close_file(self) -> None:
        if self._mm is not None:
            closed: Any = _Closed(self.path)
            self._mm = None  # first: other threads take it to mean closed
            self._pager = self._upkeep = self._w = closed

    def _revive(self) -> mmap.mmap:
        """Reopen after a fork, once, however many threads of the child get here first."""
        with self._open_lock:
            if self._mm is None:
                if not self._stale:
                    raise StoreClosedError(f"store {self.path} is closed; call reopen() to use it again")
                self._open()
        assert self._mm is not None
        return self._mm

    def __repr__(self) -> str:
        return f"<MmapStore {self.path!r} pages={self.num_pages}x{self.page_size}>"

    @property
    def cache_size(self) -> int:
        """Bytes of pages in the file (the file's own geometry)."""
        return self.page_size * self.num_pages

    @property
    def max_value_size(self) -> int:
        """The largest value (serialised bytes) that fits, for a key of 64 bytes."""
        return self._max_entry - L.ENTRY_SIZE - 64

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def _locked(self, p1: int, p2: int) -> Iterator[tuple[int, ...]]:
        """Hold a key's page(s), locked in index order (the global order that rules
        out deadlock), through the pager that locked them even if the store is
        closed meanwhile."""
        pager = self._pager
        pages = (p1,) if p1 == p2 else (p1, p2) if p1 < p2 else (p2, p1)
        pager.hold(pages[0])
        try:
            if len(pages) > 1:
                pager.hold(pages[1])
            try:
                yield pages
            finally:
                if len(pages) > 1:
                    pager.unlock(pages[1])
        finally:
            pager.unlock(pages[0])

    # ------------------------------------------------------------------ lookup

    @overload
    def _read_locked(self, key: object) -> bytes | None: ...

    @overload
    def _read_locked(self, key: object, expiry: Literal[True]) -> float | None: ...

    def _read_locked(self, key: object, expiry: bool = False) -> bytes | float | None:
        """Read (the value, or with ``expiry`` its expiry) under the page locks, when
        writers kept the lock-free read from settling.

        With the pages locked the read settles at once unless a page fails its
        checks (damage from outside the store): it is repaired, then read again."""
        pager = self._pager
        read = pager.expiry if expiry else pager.read
        kb = pager.key_of(key)[0]
        _, p1, p2, _ = pager.where(kb)
        with self._locked(p1, p2) as pages:
            found = read(kb)
            if found is BUSY:  # with the pages locked, only damage keeps a read from settling
                for p in pages:
                    if self._upkeep.survey(p, L.page_offset(self.page_size, p)).problems:
                        pager.rebuild(p)
                found = read(kb)
        return None if found is BUSY else found

    # ------------------------------------------------------------------ public API

    def get(self, key: str | bytes, default: Any = None) -> Any:
        if self._busy:
            self._busy.check()
        if self._mm is None:
            self._revive()
        found = self._pager.read(key)
        if found is BUSY:
            found = self._read_locked(key)
        if found is None:
            self._misses += 1
            return default
        self._hits += 1
        if self._loads is None:
            return found
        try:
            return self._loads(found)
        except Exception as e:
            raise self._codec.decode_error(self.path, e) from e

    def __contains__(self, key: object) -> bool:
        if self._busy:
            self._busy.check()
        if self._mm is None:
            self._revive()
        found = self._pager.read(key)  # type: ignore[arg-type]  # the pager's host checks odd keys
        if found is BUSY:
            found = self._read_locked(key)
        return found is not None

    def set(self, key: str | bytes, value: Any, expire: float | None = None) -> None:
        if self._busy:
            self._busy.check()
        if type(key) is not str and type(key) is not bytes:
            key = self._key(key)  # raises for a key that is neither: before serialising
        try:
            vb = self._dumps(value)
        except Exception as e:
            raise self._codec.encode_error(key, e) from e
        if self._mm is None:
            self._revive()
        self._pager.put(key, vb, self._expire if expire is None else lifetime(expire))

    def get_and_set(
        self, key: str | bytes, fn: Callable[[Any], Any], expire: float | None = None, *,
        missing: Any = None, keep_expiry: bool = False,
    ) -> Any:
        """Atomically store and return ``fn(current value)`` (``missing`` when absent).

        ``fn`` runs with the key's page locked: keep it short and do not call the
        store from it (ReentrantCallError).  If ``fn`` raises, nothing is stored.
        With ``keep_expiry`` an existing entry keeps the lifetime it has left.
        """
        if self._busy:
            self._busy.check()
        if type(key) is not str and type(key) is not bytes:
            key = self._key(key)
        life = self._expire if expire is None else lifetime(expire)
        if self._mm is None:
            self._revive()
        return self._pager.update(
            key, fn, life, self._loads, self._raw_dumps, self._busy, missing, keep_expiry
        )

    def add(self, key: str | bytes, value: Any, expire: float | None = None) -> bool:
        if self._busy:
            self._busy.check()
        klen = len(self._key(key))  # raises for a key that is neither str nor bytes: first
        try:
            vb = self._dumps(value)
        except Exception as e:
            raise self._codec.encode_error(key, e) from e
        if L.ENTRY_SIZE + klen + len(vb) > self._max_entry:  # refused whether or not the key exists
            raise _too_large(self.page_size, self._max_entry, klen, len(vb))

        def if_absent(current: bytes | _Absent) -> bytes:
            if current is not _ABSENT:
                raise _Refused
            return vb

        return self._update_unless_refused(key, if_absent, expire)

    def touch(self, key: str | bytes, expire: float | None = None) -> bool:
        def unchanged(current: bytes | _Absent) -> bytes:
            if current is _ABSENT:
                raise _Refused
            return current

        return self._update_unless_refused(key, unchanged, expire)

    def _update_unless_refused(
        self, key: str | bytes, fn: Callable[[bytes | _Absent], bytes], expire: float | None
    ) -> bool:
        """Store ``fn(current raw value, or _ABSENT)`` under the page lock; False if ``fn``
        raised _Refused (nothing written)."""
        if self._busy:
            self._busy.check()
        if type(key) is not str and type(key) is not bytes:
            key = self._key(key)
        life = self._expire if expire is None else lifetime(expire)
        if self._mm is None:
            self._revive()
        try:
            self._pager.update(key, fn, life, None, None, self._busy, _ABSENT)
        except _Refused:
            return False
        return True

    def ttl(self, key: str | bytes) -> float | None:
        if self._busy:
            self._busy.check()
        if self._mm is None:
            self._revive()
        found = self._pager.expiry(key)
        if found is BUSY:
            found = self._read_locked(key, expiry=True)
        if found is None:
            return None
        return math.inf if not found else max(0.0, found - time.time())

    def delete(self, key: str | bytes) -> bool:
        if self._busy:
            self._busy.check()
        if self._mm is None:
            self._revive()
        return self._pager.remove(key)

    def _add_counter(self, at: int, n: int) -> None:
        self._w.u64[at >> 3] += n

    # ------------------------------------------------------------------ whole-store operations

    def _each_page(self) -> Iterator[tuple[int, int]]:
        """Lock each page in turn and yield (page, page offset); unlocks after each step."""
        if self._busy:
            self._busy.check()
        if self._mm is None:
            self._revive()
        pager = self._pager  # unlocks through it even if the store is closed meanwhile
        for page in range(self.num_pages):
            pager.hold(page)
            try:
                yield page, L.page_offset(self.page_size, page)
            finally:
                pager.unlock(page)

    def purge(self) -> int:
        """Remove expired entries from every page; returns how many were removed."""
        removed = 0
        for page, po in self._each_page():
            now = time.time()
            expired = [(so, e) for so, e in self._upkeep.entries(page, po) if e.exp and e.exp <= now]
            if expired:
                self._pager.bump(po)
                for so, e in expired:
                    self._upkeep.kill(po, so, po + e.off)
                self._add_counter(po + L.OFF_EXPIRATIONS, len(expired))
                self._pager.bump(po)
                removed += len(expired)
        return removed

    def clear(self) -> None:
        """Remove every entry (counters are kept)."""
        zeros = bytes(self.page_size - L.PAGE_HDR_SIZE)
        for _, po in self._each_page():
            mm, u32 = self._mm, self._w.u32
            assert mm is not None
            self._pager.bump(po)
            u32[(po + L.OFF_BUMP) >> 2] = self._d0  # first: a kill from here on repairs to empty
            mm[po + L.PAGE_HDR_SIZE:po + self.page_size] = zeros
            for off in (L.OFF_ENTRIES, L.OFF_USED, L.OFF_DEADBYTES):
                u32[(po + off) >> 2] = 0
            self._pager.bump(po)

    def keys(self) -> list[str | bytes]:
        """The live (unexpired) keys, as the str or bytes they were stored with."""
        out: list[str | bytes] = []
        for page, po in self._each_page():
            now = time.time()
            for _, e in self._upkeep.entries(page, po):
                if not (e.exp and e.exp <= now):
                    out.append(e.key.decode() if e.flags & L.FLAG_STR_KEY else e.key)
        return out

    def items(self) -> Iterator[tuple[str | bytes, Any, float]]:
        """(key, value, seconds left or ``math.inf``) of every live entry, page by page.

        Each page is read whole under its lock, and yielded after it is unlocked;
        values are checked against their checksums (a damaged page is repaired
        first, as any locked read does) and decoded by the store's serializer
        (SerializationError if one cannot be).  Entries written meanwhile to pages
        already read are not seen."""
        loads = self._loads
        for found in self._page_items():
            for key, raw, exp in found:
                value = raw if loads is None else self._codec.decode(raw, self.path)
                yield key, value, math.inf if not exp else max(0.0, exp - time.time())

    def _page_items(self) -> Iterator[list[tuple[str | bytes, bytes, float]]]:
        """Each page's live (key, raw value, expire_at) entries, read under its lock."""
        pager = self._pager
        for page in range(self.num_pages):
            pager.hold(page)
            try:
                mm, po, now = self._mm, L.page_offset(self.page_size, page), time.time()
                assert mm is not None
                found = []
                for _, e in self._upkeep.entries(page, po, values=True):
                    if not (e.exp and e.exp <= now):
                        at = po + e.off + L.ENTRY_SIZE + len(e.key)
                        found.append((e.key.decode() if e.flags & L.FLAG_STR_KEY else e.key, mm[at:at + e.vlen], e.exp))
            finally:
                pager.unlock(page)
            yield found

    def __len__(self) -> int:
        return len(self.keys())

    def stats(self) -> MmapStats:
        """Counters for the whole file, plus this process's hits and misses.

        ``evictions`` counts unexpired entries dropped for room: if it grows,
        the file is too small.  ``recovered_pages`` counts pages repaired after a
        writer died mid-write.  Read without locks, so totals are a snapshot.
        """
        mm = self._mm or self._revive()
        entries = used = evictions = expirations = recoveries = 0
        for page in range(self.num_pages):
            _, ne, _, bump, dead, ev, ex, rec = L.PAGE_HDR.unpack_from(mm, L.page_offset(self.page_size, page) + L.OFF_SEQ)
            entries += ne
            used += bump - self._d0 - dead
            evictions += ev
            expirations += ex
            recoveries += rec
        return {
            "entries": entries,
            "hits": self._hits,
            "misses": self._misses,
            "expirations": expirations,
            "evictions": evictions,
            "recovered_pages": recoveries,
            "bytes_used": used,
            "capacity": self.num_pages * self._max_entry,
            "pages": self.num_pages,
            "page_size": self.page_size,
            "max_value_size": self.max_value_size,
            "path": self.path,
        }

    def pages(self) -> list[PageInfo]:
        """Every page's fill, age and counters, each page read under its lock (so a
        dead writer's page is repaired on the way, as any locker repairs it; damage
        is reported in ``problems``, not repaired)."""
        out: list[PageInfo] = []
        capacity = self.page_size - self._d0
        for page, po, survey in self._surveyed():
            now = time.time()
            t = L.tick(now)
            live = survey.live
            ages = [((t - survey.atimes.get(e.off, t)) & L.TICK_MASK) / L.TICKS_PER_SECOND for e in live]
            assert self._mm is not None
            _, _, _, _, _, ev, ex, rec = L.PAGE_HDR.unpack_from(self._mm, po + L.OFF_SEQ)
            out.append(PageInfo(
                page, len(live), sum(1 for e in live if e.exp and e.exp <= now), sum(e.span for e in live),
                capacity, max(ages) if ages else None, min(ages) if ages else None, ev, ex, rec,
                tuple(survey.problems),
            ))
        return out

    def _surveyed(self) -> Iterator[tuple[int, int, Survey]]:
        """(page, page offset, survey) of each page in turn, the page locked meanwhile."""
        for page, po in self._each_page():
            yield page, po, self._upkeep.survey(page, po)

    def check(self) -> list[str]:
        """Verify every page and repair what fails: entry checksums, the slot table,
        the counters, and no key in two pages.  Returns the problems found, each
        saying what the repair lost; an empty list means the file was sound.
        Pages a dead writer left mid-change are repaired on the way without being
        problems (``stats()["recovered_pages"]`` counts them)."""
        return self._audit(repair=True)

    def verify(self) -> list[str]:
        """The problems ``check()`` would find and repair, repairing none of them:
        each names its page and what a repair would lose (the keys, where their
        bytes are intact); an empty list means the file is sound.  Pages a dead
        writer left mid-change are still repaired on the way, as every locker of
        a page repairs them."""
        return self._audit(repair=False)

    def _find(self, page: int, kb: bytes, h: int, s0: int, repair: bool) -> int:
        """The key's entry offset in a locked page (0: absent); a damaged page is
        repaired first with ``repair``, else it counts as not holding the key."""
        if repair:
            return self._pager.find_locked(page, kb, h, s0)[1]
        return max(0, self._pager.find(L.page_offset(self.page_size, page), kb, h, s0)[1])

    def _audit(self, repair: bool) -> list[str]:
        problems: list[str] = []
        seen: dict[bytes, int] = {}
        twice: list[tuple[bytes, int]] = []  # (key, hash) seen in both of its pages
        for page, po, survey in self._surveyed():
            if survey.problems:
                lost, names = self._upkeep.unreadable(page, po, survey)
                shown = ", ".join(repr(k) for k in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                what = f"{lost} of {len(survey.atimes)} entries"
                which = f" ({'keys' if len(names) > 1 else 'key'} {shown})" if names else ""
                if repair:
                    self._pager.rebuild(page)
                    problems.append(f"page {page}: {'; '.join(survey.problems)}; repaired, {what} lost{which}")
                else:
                    problems.append(f"page {page}: {'; '.join(survey.problems)}; a repair would lose {what}{which}")
            for _, e in self._upkeep.entries(page, po) if repair or not survey.problems else ():
                if e.key in seen:
                    twice.append((e.key, e.h))
                seen[e.key] = page
        for kb, h in twice:  # a writer may have moved it meanwhile: look again, both pages locked
            p1, p2 = pages_of(h, self.num_pages)
            s0 = (h // self.num_pages) % self._nslots
            po2 = L.page_offset(self.page_size, p2)
            with self._locked(p1, p2):
                if self._find(p1, kb, h, s0, repair) and self._find(p2, kb, h, s0, repair):
                    # readers see the home page's copy: the other one goes
                    if not repair:
                        problems.append(f"key {kb!r} is in pages {p1} and {p2}; a repair removes it from page {p2}")
                        continue
                    problems.append(f"key {kb!r} is in pages {p1} and {p2}; removed from page {p2}")
                    so, eo, _ = self._pager.find_locked(p2, kb, h, s0)
                    self._pager.bump(po2)
                    self._upkeep.kill(po2, so, eo)
                    self._pager.bump(po2)
        return problems
