"""MmapStore: a key-value store in one memory-mapped file shared by processes and threads.

The file format and its invariants are described in ``_layout``.  This module
holds the mechanisms: placement (two candidate pages per key), locking (the
robust mutex in each page's header, ``_locks``), lock-free reads (seqlock
validation), fork handling, and one page
rewrite through the spare (``_rebuild``) that serves eviction, compaction and
repair after a crashed writer or damage.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Self
from zlib import crc32

from . import _layout as L
from ._args import MAX_KEY_SIZE, key_bytes, lifetime, size, timeout
from ._errors import (
    FileFormatError,
    InvalidArgumentError,
    LockTimeoutError,
    StoreClosedError,
    ValueTooLargeError,
)
from ._file import open_or_create
from ._locks import HOLDER_CHECK_AFTER, Locked, holder_alive, reset
from ._pager import FastPager, pages_of, whole_entry
from ._serializers import CallbackThreads, Codec

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_PAGE_SIZE", "NEVER", "MmapStore"]

NEVER = 0
"""Pass as ``expire`` for entries that never expire (so does ``math.inf``)."""
DEFAULT_CACHE_SIZE = 64 << 20
DEFAULT_PAGE_SIZE = 64 << 10
DEFAULT_LOCK_TIMEOUT = 10.0


_seq_at = L.SEQ.unpack_from
_u32_at = L.U32.unpack_from
_entry_at = L.ENTRY.unpack_from
_counts_at = L.COUNTS.unpack_from

_live_stores: weakref.WeakSet[MmapStore] = weakref.WeakSet()
# A str key shorter than this is under MAX_KEY_SIZE in UTF-8 (at most 4 bytes a
# character), so get() and set() encode it inline instead of calling key_bytes().
_SHORT_KEY = (MAX_KEY_SIZE + 1) // 4


def _utf8(kb: bytes) -> bool:
    try:
        kb.decode()
    except UnicodeDecodeError:
        return False
    return True


class _Entry(NamedTuple):
    """An entry of a locked page that passed its checks (``MmapStore._parse``)."""

    off: int  # within the page
    span: int
    vlen: int
    key: bytes
    h: int
    flags: int
    exp: float  # expire_at, 0.0 = never
    dead: int


def _after_fork_in_child() -> None:
    for store in list(_live_stores):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


class MmapStore:
    """A session/cache store in one mmap'ed file, shared by forked workers and threads.

    ``cache_size`` and ``page_size`` (bytes) only matter when the file is created;
    an existing file's own geometry is adopted.  ``expire`` is the default
    lifetime in seconds (``0``/``NEVER`` = never).  ``serializer`` is ``"json"``,
    ``"raw"`` (bytes in, bytes out), ``"pickle"`` or an object with
    ``dumps``/``loads``.  ``lock_timeout`` (seconds) bounds every lock wait.
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
        self._codec = Codec(serializer)
        self.serializer, self._dumps, self._loads = self._codec.name, self._codec.dumps, self._codec.loads
        self._expire = lifetime(expire)
        self._busy = CallbackThreads()
        self._hits = self._misses = 0
        self._mm: mmap.mmap | None = None
        self._fd = -1
        self._stale = False
        self._open_lock = threading.Lock()
        self._open()
        _live_stores.add(self)

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        fd, geo = open_or_create(self.path, *self._want_geometry)
        try:
            mm = mmap.mmap(fd, L.file_size(geo.page_size, geo.num_pages), mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._max_used = int(geo.slots * L.MAX_LOAD)
        self._w = L.Words(mm)
        self._pager = FastPager(mm, geo.seed, geo.num_pages, geo.page_size, geo.slots, self._max_used)
        self.page_size, self.num_pages = geo.page_size, geo.num_pages
        self._seed, self._nslots = geo.seed, geo.slots
        self._d0 = L.data_start(geo.slots)
        self._max_entry = geo.page_size - self._d0
        self._fd, self._stale = fd, False
        # Last: other threads take a set _mm to mean "open", without the open lock.
        self._mm = mm

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's descriptor, mapping and pager; reopen lazily.

        The inherited descriptor (and the mapping's own duplicate of it) share the
        parent's open file description, and with it the parent's OFD locks, so the
        child must not lock through them, nor keep them open (a lock the parent
        holds would outlive the parent).  The pager's thread locks go with it: one
        that another thread held at fork time would never be released.
        """
        if self._mm is None:
            return
        try:
            self._pager.close()
            self._w.release()
            self._mm.close()
            os.close(self._fd)
        except (OSError, BufferError):
            pass
        self._mm, self._fd, self._stale = None, -1, True
        self._busy = CallbackThreads()
        self._open_lock = threading.Lock()

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
            self._pager.close()
            self._w.release()
            self._mm.close()
            os.close(self._fd)
        self._mm, self._fd = None, -1

    def _revive(self) -> mmap.mmap:
        """Reopen after a fork, once, however many threads of the child get here first."""
        with self._open_lock:
            if self._mm is None:
                if not self._stale:
                    raise StoreClosedError(f"store {self.path} is closed; call reopen() to use it again")
                self._open()
        assert self._mm is not None
        return self._mm

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # ------------------------------------------------------------------ helpers

    def _expire_at(self, expire: float | None) -> float:
        life = self._expire if expire is None else lifetime(expire)
        return time.time() + life if life else 0.0

    def _key(self, key: object) -> tuple[bytes, int]:
        kb, was_str = key_bytes(key)
        return kb, L.FLAG_STR_KEY if was_str else 0

    def _too_large(self, kb: bytes, vb: bytes) -> ValueTooLargeError:
        return ValueTooLargeError(
            f"value of {len(vb)} bytes (key {len(kb)} bytes) cannot fit in a page of "
            f"{self.page_size} bytes: the largest entry is {self._max_entry - L.ENTRY_SIZE} bytes "
            f"of key plus value. Store less, or create the store file with a larger page_size."
        )

    # ------------------------------------------------------------------ locking

    def _timeout(self, page: int) -> LockTimeoutError:
        return LockTimeoutError(
            f"page {page} of {self.path} stayed locked for {self._lock_timeout:g}s; a live process "
            "holds it (dead holders release automatically). Look for a slow get_and_set() callback "
            "or raise lock_timeout."
        )

    def _take(self, page: int, timeout: float) -> Locked:
        """The pager's lock within ``timeout``; a damaged lock (refused, or held by no
        live user of the file once the wait passes HOLDER_CHECK_AFTER) is reset
        and taken again (``_locks``)."""
        deadline = time.monotonic() + timeout
        state = self._pager.lock(page, min(timeout, HOLDER_CHECK_AFTER))
        looked = False
        while state == Locked.WEDGED or state == Locked.TIMEOUT and timeout > HOLDER_CHECK_AFTER:
            mm, at = self._mm, L.page_offset(self.page_size, page) + L.OFF_LOCK
            assert mm is not None
            word = _u32_at(mm, at)[0]  # 0: released meanwhile
            if state == Locked.WEDGED or not looked and word and not holder_alive(word, os.fstat(self._fd)):
                reset(mm, self._fd, at)
            looked = True
            left = deadline - time.monotonic()
            if left <= 0:
                return Locked.TIMEOUT
            state = self._pager.lock(page, left)
            timeout = 0.0  # from here a TIMEOUT is final
        return state

    def _lock(self, page: int) -> None:
        """Lock a page (or the spare, page -1) against threads and processes; repair if needed."""
        state = self._take(page, self._lock_timeout)
        if state:
            if state == Locked.TIMEOUT:
                raise self._timeout(page)
            try:
                self._rebuild(page, L.page_offset(self.page_size, page))
            except BaseException:
                self._pager.unlock(page)
                raise

    def _lock_pages(self, p1: int, p2: int) -> tuple[int, ...]:
        """Lock a key's page(s) in index order (the global order that rules out deadlock)."""
        pages = (p1,) if p1 == p2 else (p1, p2) if p1 < p2 else (p2, p1)
        self._lock(pages[0])
        if len(pages) > 1:
            try:
                self._lock(pages[1])
            except BaseException:
                self._pager.unlock(pages[0])
                raise
        return pages

    def _unlock_pages(self, pages: tuple[int, ...]) -> None:
        for p in reversed(pages):
            self._pager.unlock(p)

    # ------------------------------------------------------------------ lookup

    def _read_locked(self, kb: bytes) -> bytes | None:
        """Read under the page locks, when writers kept the lock-free read from settling.

        With the pages locked the read settles at once unless a page fails its
        checks (damage from outside the store): it is repaired, then read again."""
        _, p1, p2, _ = self._pager.where(kb)
        pages = self._lock_pages(p1, p2)
        try:
            found = self._pager.read(kb)
            if found is False:  # with the pages locked, only damage keeps a read from settling
                for p in pages:
                    po = L.page_offset(self.page_size, p)
                    if self._survey(p, po)[2]:
                        self._rebuild(p, po)
                found = self._pager.read(kb)
        finally:
            self._unlock_pages(pages)
        return None if found is False else found

    # ------------------------------------------------------------------ public API

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when missing or expired."""
        if self._busy:
            self._busy.check()
        try:  # the common key: a short str
            kb = key.encode() if type(key) is str and len(key) < _SHORT_KEY else self._key(key)[0]
        except UnicodeEncodeError:
            kb = self._key(key)[0]  # raises InvalidArgumentError
        if self._mm is None:
            self._revive()
        found = self._pager.read(kb)
        if found is False:
            found = self._read_locked(kb)
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
        kb = self._key(key)[0]
        if self._mm is None:
            self._revive()
        found = self._pager.read(kb)
        if found is False:
            found = self._read_locked(kb)
        return found is not None

    def set(self, key: str | bytes, value: Any, expire: float | None = None) -> None:
        """Store ``value`` under ``key``; ``expire`` in seconds (None: store default; 0: never).

        Raises ValueTooLargeError (the old value stays) or SerializationError.
        """
        if self._busy:
            self._busy.check()
        try:
            kb, flags = (key.encode(), L.FLAG_STR_KEY) if type(key) is str and len(key) < _SHORT_KEY else self._key(key)
        except UnicodeEncodeError:
            kb, flags = self._key(key)  # raises InvalidArgumentError
        try:
            vb = self._dumps(value)
        except Exception as e:
            raise self._codec.encode_error(key, e) from e
        if L.ENTRY_SIZE + len(kb) + len(vb) > self._max_entry:
            raise self._too_large(kb, vb)
        life = self._expire if expire is None else lifetime(expire)
        self._write(kb, flags, time.time() + life if life else 0.0, vb, None)

    def get_and_set(self, key: str | bytes, fn: Callable[[Any], Any], expire: float | None = None) -> Any:
        """Atomically store and return ``fn(current value or None)``.

        ``fn`` runs with the key's page locked: keep it short and do not call the
        store from it (ReentrantCallError).  If ``fn`` raises, nothing is stored.
        """
        if self._busy:
            self._busy.check()
        kb, flags = self._key(key)
        exp_at = self._expire_at(expire)
        result: list[Any] = []

        def update(old: bytes | None) -> bytes:
            new = self._busy.run(fn, None if old is None else self._codec.decode(old, self.path))
            vb = self._codec.encode(key, new)
            if L.ENTRY_SIZE + len(kb) + len(vb) > self._max_entry:
                raise self._too_large(kb, vb)
            result.append(new)
            return vb

        self._write(kb, flags, exp_at, b"", update)
        return result[0]

    def delete(self, key: str | bytes) -> bool:
        """Remove ``key``; True if a live (unexpired) entry was removed."""
        if self._busy:
            self._busy.check()
        kb = self._key(key)[0]
        if self._mm is None:
            self._revive()
        while True:
            h, p1, p2, s0, page, _ = self._pager.locate(kb)
            if page == -1:
                return False
            # -2: a page was too busy to tell; look in both, locked in index order
            pages = self._lock_pages(p1, p2) if page == -2 else (page,)
            if page >= 0:
                self._lock(page)
            try:
                mm = self._mm
                assert mm is not None
                for p in pages:
                    po = L.page_offset(self.page_size, p)
                    so, eo, _ = self._find(p, po, kb, h, s0)
                    if eo:
                        exp = _entry_at(mm, eo)[0]
                        self._pager.bump(po)
                        self._kill(po, so, eo, self._span_at(eo))
                        self._pager.bump(po)
                        return not (exp and exp <= time.time())
            finally:
                self._unlock_pages(pages)
            if page == -2:
                return False  # in neither page, with both locked
            # deleted by someone else between the look and the lock: look again

    # ------------------------------------------------------------------ writing

    def _write(
        self, kb: bytes, flags: int, exp_at: float, vb: bytes, update: Callable[[bytes | None], bytes] | None
    ) -> None:
        """Store ``vb`` (or ``update(old raw value or None)``) under the page lock(s).

        A key's first page is its home: every insert of the key locks it first,
        so two inserts of one key cannot race, and an update locks only the page
        that holds it (invariant 6).  A new key goes to the roomier page; its
        second page is locked too only then, waiting only in index order and
        otherwise just trying (a busy second page: stay home).
        """
        if self._mm is None:
            self._revive()
        pager, ps = self._pager, self.page_size
        backoff = False
        while True:
            if backoff:  # p2 stayed busy and p1 is released: let its holder finish
                time.sleep(50e-6)
            h, p1, p2, s0, page, roomier = pager.locate(kb)
            po1, po2 = L.HEADER_SIZE + ps * (p1 + 1), L.HEADER_SIZE + ps * (p2 + 1)
            if page == p2 != p1:  # lives in its second page: update it there
                self._lock(p2)
                try:
                    so, eo, _ = self._find(p2, po2, kb, h, s0)
                    if eo:
                        self._put(p2, po2, so, eo, kb, flags, h, s0, exp_at, vb, update)
                        return
                finally:
                    pager.unlock(p2)
                continue  # deleted meanwhile: start over
            self._lock(p1)
            try:
                so, eo, free = self._find(p1, po1, kb, h, s0)
                if eo or p1 == p2:
                    self._put(p1, po1, so if eo else free, eo, kb, flags, h, s0, exp_at, vb, update)
                    return
                # Not in p1; with p1 held nobody can insert it into p2, so what we
                # see of p2 now is final (-1: p2 was too busy, or failed a check).
                in2 = pager.holds(po2, kb, h, s0)
                if in2 > 0:
                    continue
                second = (in2 < 0 or roomier == p2) and self._lock_second(p1, p2)
                backoff = in2 < 0 and not second
                if backoff:
                    continue
                try:
                    if second:
                        so2, eo2, free2 = self._find(p2, po2, kb, h, s0)
                        if eo2 or roomier == p2:
                            self._put(p2, po2, so2 if eo2 else free2, eo2, kb, flags, h, s0, exp_at, vb, update)
                            return
                    self._put(p1, po1, free, 0, kb, flags, h, s0, exp_at, vb, update)
                    return
                finally:
                    if second:
                        pager.unlock(p2)
            finally:
                pager.unlock(p1)

    def _lock_second(self, p1: int, p2: int) -> bool:
        """With p1 locked, lock p2: waiting only in index order, else just trying."""
        if p2 > p1:
            self._lock(p2)
            return True
        state = self._take(p2, 0.0)
        if state == Locked.TIMEOUT:
            return False
        if state:
            try:
                self._rebuild(p2, L.page_offset(self.page_size, p2))
            except BaseException:
                self._pager.unlock(p2)
                raise
        return True

    def _find(self, page: int, po: int, kb: bytes, h: int, s0: int) -> tuple[int, int, int]:
        """The pager's ``find`` on a locked page, repairing the page first if it fails a check."""
        found = self._pager.find(po, kb, h, s0)
        if found[1] == L.DAMAGED:
            self._rebuild(page, po)
            found = self._pager.find(po, kb, h, s0)
            if found[1] == L.DAMAGED:
                raise self._meddled(page)
        return found

    def _meddled(self, page: int) -> FileFormatError:
        return FileFormatError(
            f"page {page} of {self.path} failed its checks again right after being repaired: "
            "something other than prefork_sessions is writing to the file. Stop it, or move the "
            "store to a path only this application uses."
        )

    def _put(
        self, page: int, po: int, so: int, eo: int, kb: bytes, flags: int, h: int, s0: int,
        exp_at: float, vb: bytes, update: Callable[[bytes | None], bytes] | None,
    ) -> None:
        """With the page locked, write the key's new entry there: ``eo`` is its
        current entry (0: none) and ``so`` the slot to use (its own, or a free one)."""
        mm = self._mm
        assert mm is not None
        if update is not None:
            # The key's page is locked, so the checked lock-free read settles at once
            # (None: expired), unless the entry fails its checksum or the key's other
            # page stays busy (False): then check the entry here; a damaged value is
            # never handed to the callback.
            old = self._pager.read(kb) if eo else None
            if old is False:
                e = self._parse(page, po, eo - po, self.page_size, True)
                if e is None:
                    self._rebuild(page, po)
                    so, eo, free = self._find(page, po, kb, h, s0)
                    so = so if eo else free
                    e = self._parse(page, po, eo - po, self.page_size, True) if eo else None
                old = None
                if e is not None and not (e.exp and e.exp <= time.time()):
                    start = eo + L.ENTRY_SIZE + len(kb)
                    old = mm[start:start + e.vlen]
            vb = update(old)  # user code (get_and_set): the page is locked but unchanged
        if not self._pager.append(po, so, eo, kb, flags, h, vb, exp_at, True):
            self._rebuild(page, po, (kb, L.pack_entry(exp_at, h, flags, kb, vb), h))

    def _span_at(self, eo: int) -> int:
        _, _, vlen, klen, _, _, _ = _entry_at(self._mm, eo)  # type: ignore[arg-type]
        return L.entry_span(klen, vlen)

    def _kill(self, po: int, so: int, eo: int, span: int) -> None:
        """Remove a live entry (seq must be odd): tombstone its slot, mark it dead.
        One store per field (invariant 2), so a kill between them leaves a page
        that repair reads right."""
        mm, u32 = self._mm, self._w.u32
        assert mm is not None
        ne, _, _, dead = _counts_at(mm, po + L.OFF_COUNTS)
        u32[so >> 2] = L.SLOT_TOMB
        mm[eo + L.OFF_DEAD] = 1
        u32[(po + L.OFF_ENTRIES) >> 2] = (ne - 1) & L.U32_MASK  # counts wrap as in C: repair fixes
        u32[(po + L.OFF_DEADBYTES) >> 2] = (dead + span) & L.U32_MASK  # what damage did to them

    def _add_counter(self, at: int, n: int) -> None:
        self._w.u64[at >> 3] += n

    # ------------------------------------------------------------------ surveys, images, repair

    def _parse(self, page: int, po: int, off: int, limit: int, crc: bool) -> _Entry | None:
        """The entry at ``off`` in a locked page if it is whole (``whole_entry``) and,
        if it was a str key, decodable.  None otherwise."""
        mm = self._mm
        assert mm is not None
        fields = whole_entry(mm, po, off, self._d0, limit, self._seed, self.num_pages, page, crc)
        if fields is None:
            return None
        e = _Entry._make(fields)
        return e if not e.flags & L.FLAG_STR_KEY or _utf8(e.key) else None

    def _survey(self, page: int, po: int) -> tuple[list[_Entry], dict[int, int], list[str]]:
        """Read a locked page by the repair rules (invariant 4), trusting no count.

        Returns its live entries in data order, their last-access ticks (by
        offset), and what is wrong with the page ([] when sound)."""
        mm = self._mm
        assert mm is not None
        ps, base = self.page_size, po + L.PAGE_HDR_SIZE
        problems: list[str] = []
        table = array("I", mm[base:base + (self._nslots << L.SLOT_SHIFT)])  # (offset, tick) pairs; little-endian host (L.Words)
        offs = table[0::2]
        tombs = offs.count(L.SLOT_TOMB)
        atimes = {off: atime for off, atime in zip(offs, table[1::2]) if off > L.SLOT_TOMB}
        if len(atimes) != len(offs) - tombs - offs.count(L.SLOT_EMPTY):
            problems.append("two slots point at one entry")
        latest: dict[bytes, _Entry] = {}
        walked, pos = self._pager.walk(po, page)
        for fields in walked:
            e = _Entry._make(fields)
            if e.flags & L.FLAG_STR_KEY and not _utf8(e.key):  # whole, yet not ours: stop here
                pos = e.off
                break
            latest[e.key] = e  # write order: a later entry of a key replaces an earlier one
        ne, used, bump, dead = _counts_at(mm, po + L.OFF_COUNTS)
        if pos != bump:
            problems.append(f"its entries end at offset {pos}, its header says {bump}")
        for off in sorted(atimes):  # past where the walk stopped: only after damage
            if off >= pos:
                found = self._parse(page, po, off, ps, True)
                if found is None or found.dead:
                    problems.append(f"a slot points at offset {off}, where no whole live entry is")
                else:
                    latest[found.key] = found
        live = sorted((e for e in latest.values() if not e.dead), key=lambda e: e.off)
        if set(atimes) != {e.off for e in live}:
            problems.append("its slot table disagrees with its entries")
        live_bytes = sum(e.span for e in live)
        if (ne, used, bump - self._d0 - dead) != (len(live), len(live) + tombs, live_bytes):
            problems.append(
                f"its counters (entries {ne}, used slots {used}, live bytes {bump - self._d0 - dead}) "
                f"disagree with its entries ({len(live)}, {len(live) + tombs}, {live_bytes})"
            )
        return live, atimes, problems

    def _image(
        self, po: int, keep: list[_Entry], atimes: dict[int, int], new: tuple[bytes, int] | None,
        evicted: int, expired: int, recovered: int,
    ) -> tuple[bytearray, int]:
        """A page image holding ``keep`` (entries of the page at ``po``, in data order)
        and then ``new`` (packed entry, hash), with the page's counters advanced.
        Returns the image and where its entries end; the rest of it is zeros."""
        mm = self._mm
        assert mm is not None
        ps, nslots, n, base = self.page_size, self._nslots, self.num_pages, L.PAGE_HDR_SIZE
        img = bytearray(ps)
        pos = self._d0
        now = L.tick(time.time())

        def place(h: int, atime: int) -> None:
            i = (h // n) % nslots
            while _u32_at(img, base + (i << L.SLOT_SHIFT))[0]:
                i = (i + 1) % nslots
            L.SLOT.pack_into(img, base + (i << L.SLOT_SHIFT), pos, atime)

        for e in keep:
            img[pos:pos + e.span] = mm[po + e.off:po + e.off + e.span]
            place(e.h, atimes.get(e.off, now))
            pos += e.span
        count = len(keep)
        if new is not None:
            raw, h = new
            img[pos:pos + len(raw)] = raw
            place(h, now)
            pos += len(raw)
            count += 1
        _, _, _, _, _, ev, ex, rec = L.PAGE_HDR.unpack_from(mm, po + L.OFF_SEQ)
        L.PAGE_HDR.pack_into(img, L.OFF_SEQ, 0, count, count, pos, 0, ev + evicted, ex + expired, rec + recovered)
        return img, pos

    def _install(self, page: int, po: int, img: bytearray, end: int) -> None:
        """Replace a page by ``img`` through the spare (invariant 5).  The page and
        the spare are locked, the page's seq is odd; a kill at any instant leaves
        either the old page or, via the spare, the new one."""
        mm, u32 = self._mm, self._w.u32
        assert mm is not None
        spare = L.page_offset(self.page_size, L.SPARE_LOCK)
        body = memoryview(img)[L.OFF_COUNTS:]
        mm[spare + L.OFF_COUNTS:spare + end] = body[:end - L.OFF_COUNTS]
        u32[L.OFF_SPARE_TARGET >> 2] = page
        u32[L.OFF_SPARE_END >> 2] = end
        u32[L.OFF_SPARE_CRC >> 2] = crc32(body[:end - L.OFF_COUNTS])
        u32[L.SPARE_STATE_OFF >> 2] = L.SPARE_VALID
        mm[po + L.OFF_COUNTS:po + self.page_size] = body
        u32[L.SPARE_STATE_OFF >> 2] = L.SPARE_EMPTY

    def _settle_spare(self) -> None:
        """With the spare locked: finish a page replacement a dead process left half-copied.

        Only onto a page whose seq is still odd (its writer died mid-change, and its
        next locker repairs it only after taking the spare, so nobody else touches
        it meanwhile) and only an image whose checksum holds: a damaged spare state
        can never overwrite a sound page."""
        mm, u32 = self._mm, self._w.u32
        assert mm is not None
        if u32[L.SPARE_STATE_OFF >> 2] == L.SPARE_EMPTY:
            return
        state, target, end, want = L.SPARE_STATE.unpack_from(mm, L.SPARE_STATE_OFF)
        ps = self.page_size
        if state == L.SPARE_VALID and target < self.num_pages and L.OFF_COUNTS < end <= ps and not end & 7:
            spare, po = L.page_offset(ps, L.SPARE_LOCK), L.page_offset(ps, target)
            image = mm[spare + L.OFF_COUNTS:spare + end]
            if self._w.u64[(po + L.OFF_SEQ) >> 3] & 1 and crc32(image) == want:
                mm[po + L.OFF_COUNTS:po + end] = image
                mm[po + end:po + ps] = bytes(ps - end)
        u32[L.SPARE_STATE_OFF >> 2] = L.SPARE_EMPTY

    def _rebuild(self, page: int, po: int, new: tuple[bytes, bytes, int] | None = None) -> list[str]:
        """Rewrite a locked page through the spare (invariant 5) from its entries that
        pass their checks (invariant 4), without dead and expired ones: compaction,
        and repair after a writer died mid-change (seq odd) or a check failed.  With
        ``new`` (key, packed entry, hash) the key's entry is replaced by that one,
        and the least recently used entries go as far as it needs the room.

        The spare is locked before anything changes, so a kill or a LockTimeoutError
        leaves the page as it was; once the image is in the spare, the next locker
        finishes the copy.  Loses at most the write in flight, or damaged entries.
        Returns the problems the page had."""
        self._lock(L.SPARE_LOCK)
        try:
            self._settle_spare()  # first: a dead writer may have been replacing this page
            live, atimes, problems = self._survey(page, po)
            now = time.time()
            others = [e for e in live if new is None or e.key != new[0]]
            keep = [e for e in others if not (e.exp and e.exp <= now)]
            expired = len(others) - len(keep)
            room = self.page_size - self._d0 - (len(new[1]) if new else 0)
            slots = self._max_used - (new is not None)  # a repair keeps more only after damage
            used = sum(e.span for e in keep)
            gone: set[int] = set()
            if used > room or len(keep) > slots:
                t = L.tick(now)
                for e in sorted(keep, key=lambda e: (t - atimes.get(e.off, t)) & L.TICK_MASK, reverse=True):
                    if used <= room and len(keep) - len(gone) <= slots:
                        break
                    gone.add(e.off)
                    used -= e.span
                keep = [e for e in keep if e.off not in gone]
            odd = self._w.u64[(po + L.OFF_SEQ) >> 3] & 1
            recovered = int(new is None or bool(problems))
            img, end = self._image(po, keep, atimes, new[1:] if new else None, len(gone), expired, recovered)
            if not odd:
                self._pager.bump(po)
            self._install(page, po, img, end)
            self._pager.bump(po)
        finally:
            self._pager.unlock(L.SPARE_LOCK)
        return problems

    def _entries(self, page: int, po: int) -> list[tuple[int, _Entry]]:
        """(slot offset, entry) of each live entry of a locked page, by its slot
        table, each checked (no checksum: values are not read); a page that fails
        is repaired first."""
        mm = self._mm
        assert mm is not None
        base = po + L.PAGE_HDR_SIZE
        for _ in range(2):
            bump = min(_u32_at(mm, po + L.OFF_BUMP)[0], self.page_size)
            out: list[tuple[int, _Entry]] = []
            keys: set[bytes] = set()
            for i in range(self._nslots):
                so = base + (i << L.SLOT_SHIFT)
                off = _u32_at(mm, so)[0]
                if off > L.SLOT_TOMB:
                    e = self._parse(page, po, off, bump, False)
                    if e is None or e.dead or e.key in keys:
                        break
                    keys.add(e.key)
                    out.append((so, e))
            else:
                return out
            self._rebuild(page, po)
        raise self._meddled(page)

    # ------------------------------------------------------------------ whole-store operations

    def _each_page(self) -> Iterator[tuple[int, int]]:
        """Lock each page in turn and yield (page, page offset); unlocks after each step."""
        if self._busy:
            self._busy.check()
        if self._mm is None:
            self._revive()
        for page in range(self.num_pages):
            self._lock(page)
            try:
                yield page, L.page_offset(self.page_size, page)
            finally:
                self._pager.unlock(page)

    def purge(self) -> int:
        """Remove expired entries from every page; returns how many were removed."""
        removed = 0
        for page, po in self._each_page():
            now = time.time()
            expired = [(so, e) for so, e in self._entries(page, po) if e.exp and e.exp <= now]
            if expired:
                self._pager.bump(po)
                for so, e in expired:
                    self._kill(po, so, po + e.off, e.span)
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
            for _, e in self._entries(page, po):
                if not (e.exp and e.exp <= now):
                    out.append(e.key.decode() if e.flags & L.FLAG_STR_KEY else e.key)
        return out

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str | bytes]:
        return iter(self.keys())

    def stats(self) -> dict[str, Any]:
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

    def check(self) -> list[str]:
        """Verify every page and repair what fails: entry checksums, the slot table,
        the counters, and no key in two pages.  Returns the problems found, each
        saying what the repair lost; an empty list means the file was sound.
        Pages a dead writer left mid-change are repaired on the way without being
        problems (``stats()["recovered_pages"]`` counts them)."""
        problems: list[str] = []
        seen: dict[bytes, int] = {}
        twice: list[tuple[bytes, int]] = []  # (key, hash) seen in both of its pages
        for page, po in self._each_page():
            _, atimes, found = self._survey(page, po)
            if found:
                self._rebuild(page, po)
            entries = self._entries(page, po)
            if found:
                lost = max(0, len(atimes) - len(entries))
                problems.append(f"page {page}: {'; '.join(found)}; repaired, {lost} of {len(atimes)} entries lost")
            for _, e in entries:
                if e.key in seen:
                    twice.append((e.key, e.h))
                seen[e.key] = page
        for kb, h in twice:  # a writer may have moved it meanwhile: look again, both pages locked
            p1, p2 = pages_of(h, self.num_pages)
            s0 = (h // self.num_pages) % self._nslots
            pages = self._lock_pages(p1, p2)
            try:
                po1, po2 = L.page_offset(self.page_size, p1), L.page_offset(self.page_size, p2)
                if self._find(p1, po1, kb, h, s0)[1]:
                    so, eo, _ = self._find(p2, po2, kb, h, s0)
                    if eo:  # readers see the home page's copy: the other one goes
                        problems.append(f"key {kb!r} is in pages {p1} and {p2}; removed from page {p2}")
                        self._pager.bump(po2)
                        self._kill(po2, so, eo, self._span_at(eo))
                        self._pager.bump(po2)
            finally:
                self._unlock_pages(pages)
        return problems
