"""MmapStore: a key-value store in one memory-mapped file shared by processes and threads.

The file format and its invariants are described in ``_layout``.  This module
holds the mechanisms: placement (two candidate pages per key), locking (a
per-page ``threading.Lock`` plus an open-file-description lock on one byte of
the page), lock-free reads (seqlock validation), eviction, compaction through
the spare page, repair after a crashed writer, and fork handling.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Self
from zlib import crc32

from . import _layout as L
from ._errors import LockTimeoutError, StoreClosedError, ValueTooLargeError
from ._file import open_or_create
from ._pager import FastPager
from ._serializers import CallbackThreads, Codec

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_PAGE_SIZE", "NEVER", "MmapStore"]

NEVER = 0
"""Pass as ``expire`` for entries that never expire (so does ``math.inf``)."""
DEFAULT_CACHE_SIZE = 64 << 20
DEFAULT_PAGE_SIZE = 64 << 10
DEFAULT_LOCK_TIMEOUT = 10.0


_seq_at = L.SEQ.unpack_from
_u32_at = L.U32.unpack_from
_slot_at = L.SLOT.unpack_from
_entry_at = L.ENTRY.unpack_from
_counts_at = L.COUNTS.unpack_from

_live_stores: weakref.WeakSet[MmapStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_live_stores):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


def lifetime(expire: float | None) -> float:
    """Seconds an entry lives (0.0: never) from an ``expire`` argument; None means never
    here (callers substitute their default first)."""
    if expire is None or expire == 0 or expire == math.inf:
        return 0.0
    if not expire > 0:
        raise ValueError(f"expire={expire!r}: use a positive number of seconds, or 0/NEVER for no expiry")
    return float(expire)


def default_path(app_name: str | None) -> str:
    """``<tempdir>/<app_name>_session_data``, as Cache::FastMmap's session store names it."""
    return os.path.join(tempfile.gettempdir(), f"{app_name or 'prefork_sessions'}_session_data")


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
        path: str | os.PathLike[str] | None = None,
        *,
        app_name: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        page_size: int = DEFAULT_PAGE_SIZE,
        expire: float = NEVER,
        serializer: Any = "json",
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if not (L.MIN_PAGE_SIZE <= page_size <= L.MAX_PAGE_SIZE) or page_size % 1024:
            raise ValueError(
                f"page_size={page_size}: use a multiple of 1024 between {L.MIN_PAGE_SIZE} and {L.MAX_PAGE_SIZE}"
            )
        if cache_size < page_size:
            raise ValueError(f"cache_size={cache_size} is smaller than one page ({page_size} bytes)")
        if not lock_timeout > 0:
            raise ValueError("lock_timeout must be a positive number of seconds")
        self.path = os.fspath(path) if path is not None else default_path(app_name)
        self._want_geometry = (page_size, cache_size // page_size)
        self._codec = Codec(serializer)
        self.serializer, self._dumps, self._loads = self._codec.name, self._codec.dumps, self._codec.loads
        self._expire = lifetime(expire)
        self._lock_timeout = float(lock_timeout)
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
        self._pager = FastPager(mm, fd, geo.seed, geo.num_pages, geo.page_size, geo.slots, self._max_used)
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

    def _key(self, key: str | bytes) -> tuple[bytes, int]:
        if type(key) is str:
            kb, flags = key.encode(), L.FLAG_STR_KEY
        elif isinstance(key, (bytes, bytearray, memoryview)):
            kb, flags = bytes(key), 0
        else:
            raise TypeError(f"keys are str or bytes, not {type(key).__name__}")
        if len(kb) > 0xFFFF:
            raise ValueTooLargeError(f"key of {len(kb)} bytes is longer than the limit of 65535 bytes")
        return kb, flags

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

    def _lock(self, page: int) -> None:
        """Lock a page (or the spare, page -1) against threads and processes; repair if needed."""
        state = self._pager.lock(page, self._lock_timeout)
        if state:
            if state < 0:
                raise self._timeout(page)
            try:
                self._repair(page, L.page_offset(self.page_size, page))
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

        With the pages locked the read settles at once unless the entry fails its
        checksum (damage from outside the store): that reads as missing."""
        _, p1, p2, _ = self._pager.where(kb)
        pages = self._lock_pages(p1, p2)
        try:
            found = self._pager.read(kb)
        finally:
            self._unlock_pages(pages)
        return None if found is False else found

    # ------------------------------------------------------------------ public API

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when missing or expired."""
        if self._busy:
            self._busy.check()
        kb = key.encode() if type(key) is str else self._key(key)[0]
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
        kb = self._key(key)[0]  # type: ignore[arg-type]
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
        kb, flags = (key.encode(), L.FLAG_STR_KEY) if type(key) is str and len(key) < 16384 else self._key(key)
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
                    so, eo, _ = self._pager.find(po, kb, h, s0)
                    if eo:
                        exp = _entry_at(mm, eo)[0]
                        self._pager.bump(po)
                        self._kill(mm, po, so, eo)
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
        that holds the key (invariant 4).  A new key goes to the roomier page; its
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
                    so, eo, _ = pager.find(po2, kb, h, s0)
                    if eo:
                        self._put(p2, po2, so, eo, kb, flags, h, s0, exp_at, vb, update)
                        return
                finally:
                    pager.unlock(p2)
                continue  # deleted meanwhile: start over
            self._lock(p1)
            try:
                so, eo, free = pager.find(po1, kb, h, s0)
                if eo or p1 == p2:
                    self._put(p1, po1, so if eo else free, eo, kb, flags, h, s0, exp_at, vb, update)
                    return
                # Not in p1; with p1 held nobody can insert it into p2, so what we
                # see of p2 now is final (-1: p2 was too busy to tell).
                in2 = pager.holds(po2, kb, h, s0)
                if in2 > 0:
                    continue
                second = (in2 < 0 or roomier == p2) and self._lock_second(p1, p2)
                backoff = in2 < 0 and not second
                if backoff:
                    continue
                try:
                    if second:
                        so2, eo2, free2 = pager.find(po2, kb, h, s0)
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
        state = self._pager.lock(p2, 0.0)
        if state < 0:
            return False
        if state:
            try:
                self._repair(p2, L.page_offset(self.page_size, p2))
            except BaseException:
                self._pager.unlock(p2)
                raise
        return True

    def _put(
        self, page: int, po: int, so: int, eo: int, kb: bytes, flags: int, h: int, s0: int,
        exp_at: float, vb: bytes, update: Callable[[bytes | None], bytes] | None,
    ) -> None:
        """With the page locked, write the key's new entry there: ``eo`` is its
        current entry (0: none) and ``so`` the slot to use (its own, or a free one)."""
        pager, mm = self._pager, self._mm
        assert mm is not None
        if update is not None:
            old = None
            if eo:
                oexp, _, ovlen, oklen, _, _, _ = _entry_at(mm, eo)
                if not (oexp and oexp <= time.time()):
                    old = mm[eo + 24 + oklen:eo + 24 + oklen + ovlen]
            vb = update(old)  # user code (get_and_set): the page is locked but unchanged
        if pager.append(po, so, eo, kb, flags, h, vb, exp_at, True):
            return
        pager.bump(po)
        try:
            self._make_room(mm, page, po, L.entry_span(len(kb), len(vb)), eo, new_slot=not eo)
            so, eo, free = pager.find(po, kb, h, s0)
            if not pager.append(po, so if eo else free, eo, kb, flags, h, vb, exp_at, False):
                raise AssertionError("no room in a page after making room")
        finally:
            pager.bump(po)

    def _span_at(self, mm: mmap.mmap, eo: int) -> int:
        _, _, vlen, klen, _, _, _ = _entry_at(mm, eo)
        return L.entry_span(klen, vlen)

    def _kill(self, mm: mmap.mmap, po: int, so: int, eo: int) -> None:
        """Remove a live entry (seq must be odd): tombstone its slot, mark it dead."""
        ne, used, bump, dead = _counts_at(mm, po + L.OFF_COUNTS)
        L.U32.pack_into(mm, so, L.SLOT_TOMB)
        mm[eo + L.OFF_DEAD] = 1
        L.COUNTS.pack_into(mm, po + L.OFF_COUNTS, ne - 1, used, bump, dead + self._span_at(mm, eo))

    def _live(self, mm: mmap.mmap, po: int) -> Iterator[tuple[int, int, int, float]]:
        """(slot offset, entry offset, last access, expire_at) of each live entry of a page."""
        base = po + L.PAGE_HDR_SIZE
        for i in range(self._nslots):
            off, atime = _slot_at(mm, base + (i << 3))
            if off > L.SLOT_TOMB:
                yield base + (i << 3), po + off, atime, _entry_at(mm, po + off)[0]

    def _make_room(self, mm: mmap.mmap, page: int, po: int, span: int, keep: int, new_slot: bool) -> None:
        """Free ``span`` contiguous bytes (and a slot if ``new_slot``): expired entries
        first, then least recently used ones, never ``keep`` unless nothing else is left."""
        now = time.time()
        t = L.tick(now)
        entries = sorted(self._live(mm, po), key=lambda e: (t - e[2]) & L.TICK_MASK, reverse=True)
        expired = [e for e in entries if e[3] and e[3] <= now]
        for so, eo, _, _ in expired:
            self._kill(mm, po, so, eo)
            if eo == keep:
                keep = 0
        if expired:
            self._add_counter(mm, po + L.OFF_EXPIRATIONS, len(expired))
        evicted = 0
        for so, eo, _, exp in entries:
            ne, _, bump, dead = _counts_at(mm, po + L.OFF_COUNTS)
            if self.page_size - bump + dead >= span and not (new_slot and ne >= self._max_used):
                break
            if (exp and exp <= now) or eo == keep:
                continue
            self._kill(mm, po, so, eo)
            evicted += 1
        if evicted:
            self._add_counter(mm, po + L.OFF_EVICTIONS, evicted)
        ne, used, bump, dead = _counts_at(mm, po + L.OFF_COUNTS)
        if keep and self.page_size - bump + dead < span:
            self._kill(mm, po, *self._slot_of(mm, po, keep))  # the replaced value itself must go
        if bump + span > self.page_size or (new_slot and used >= self._max_used):
            self._compact(mm, page, po)

    def _slot_of(self, mm: mmap.mmap, po: int, eo: int) -> tuple[int, int]:
        for so, e, _, _ in self._live(mm, po):
            if e == eo:
                return so, eo
        raise AssertionError("a live entry without a slot")

    @staticmethod
    def _add_counter(mm: mmap.mmap, at: int, n: int) -> None:
        L.U64.pack_into(mm, at, L.U64.unpack_from(mm, at)[0] + n)

    # ------------------------------------------------------------------ compaction and repair

    def _image(self, mm: mmap.mmap, po: int, entries: list[tuple[int, int]]) -> bytearray:
        """A compacted page image holding ``entries`` ((entry offset, last access), in write order)."""
        ps, nslots, n = self.page_size, self._nslots, self.num_pages
        img = bytearray(ps)
        img[:L.PAGE_HDR_SIZE] = mm[po:po + L.PAGE_HDR_SIZE]
        pos = self._d0
        base = L.PAGE_HDR_SIZE
        for eo, atime in entries:
            span = self._span_at(mm, eo)
            img[pos:pos + span] = mm[eo:eo + span]
            i = (_entry_at(mm, eo)[1] // n) % nslots
            while _u32_at(img, base + (i << 3))[0]:
                i = (i + 1) % nslots
            L.SLOT.pack_into(img, base + (i << 3), pos, atime)
            pos += span
        L.COUNTS.pack_into(img, L.OFF_COUNTS, len(entries), len(entries), pos, 0)
        return img

    def _compact(self, mm: mmap.mmap, page: int, po: int) -> None:
        """Rewrite a locked page (seq odd) without dead entries and tombstones, via the spare."""
        live = sorted((eo, atime) for _, eo, atime, _ in self._live(mm, po))
        img = self._image(mm, po, live)
        end = _u32_at(img, L.OFF_BUMP)[0]  # nothing past the new bump matters: copy up to it
        spare = L.page_offset(self.page_size, L.SPARE_LOCK)
        self._lock(L.SPARE_LOCK)
        try:
            self._settle_spare(mm)
            mm[spare + L.OFF_COUNTS:spare + end] = img[L.OFF_COUNTS:end]
            L.SPARE_STATE.pack_into(mm, L.SPARE_STATE_OFF, L.SPARE_VALID, page, end)
            mm[po + L.OFF_COUNTS:po + end] = img[L.OFF_COUNTS:end]
            L.SPARE_STATE.pack_into(mm, L.SPARE_STATE_OFF, L.SPARE_EMPTY, 0, 0)
        finally:
            self._pager.unlock(L.SPARE_LOCK)

    def _settle_spare(self, mm: mmap.mmap) -> None:
        """With the spare locked: finish a compaction a dead process left half-copied.

        The target page's seq is still odd, so nobody modifies it; its next locker
        repairs it (and waits for the spare first), so restoring it here is safe.
        """
        state, target, end = L.SPARE_STATE.unpack_from(mm, L.SPARE_STATE_OFF)
        if state == L.SPARE_VALID and 0 <= target < self.num_pages and L.OFF_COUNTS < end <= self.page_size:
            spare = L.page_offset(self.page_size, L.SPARE_LOCK)
            po = L.page_offset(self.page_size, target)
            mm[po + L.OFF_COUNTS:po + end] = mm[spare + L.OFF_COUNTS:spare + end]
        L.SPARE_STATE.pack_into(mm, L.SPARE_STATE_OFF, L.SPARE_EMPTY, 0, 0)

    def _repair(self, page: int, po: int) -> None:
        """A writer died mid-change (seq odd under our lock): rebuild the page from its entries.

        Every entry in [data, bump) was complete before bump passed it, so the
        walk keeps every acknowledged value; for a key written twice, the later
        entry wins.  Loses at most the write that was in flight.
        """
        mm = self._mm
        assert mm is not None
        self._lock(L.SPARE_LOCK)
        try:
            self._settle_spare(mm)
        finally:
            self._pager.unlock(L.SPARE_LOCK)
        atimes = {}
        base = po + L.PAGE_HDR_SIZE
        for i in range(self._nslots):
            off, atime = _slot_at(mm, base + (i << 3))
            atimes[off] = atime
        bump = min(max(_u32_at(mm, po + L.OFF_BUMP)[0], self._d0), self.page_size)
        now = time.time()
        t = L.tick(now)
        latest: dict[bytes, tuple[int, int]] = {}
        expired = 0
        pos = self._d0
        while pos + L.ENTRY_SIZE <= bump:
            exp, _, vlen, klen, _, dead, crc = _entry_at(mm, po + pos)
            span = L.entry_span(klen, vlen)
            eo = po + pos
            if pos + span > bump or crc32(mm[eo + 24:eo + 24 + klen + vlen], crc32(mm[eo:eo + L.ENTRY_CRC_SPAN])) != crc:
                # A writer moves bump only past a complete entry, so no crash leaves a torn
                # one here: this is damage from outside, after which entry boundaries
                # cannot be trusted.  Keep what came before.
                bump = pos
                break
            if not dead:
                key = mm[eo + 24:eo + 24 + klen]
                if key in latest:
                    mm[latest[key][0] + L.OFF_DEAD] = 1
                if exp and exp <= now:
                    mm[eo + L.OFF_DEAD] = 1
                    latest.pop(key, None)
                    expired += 1
                else:
                    latest[key] = (eo, atimes.get(pos, t))
            pos += span
        mm[base:base + (self._nslots << 3)] = bytes(self._nslots << 3)
        L.COUNTS.pack_into(mm, po + L.OFF_COUNTS, 0, 0, bump, 0)
        keep = sorted(latest.values())
        for eo, _ in keep[:-self._max_used]:  # more than the slots allow: only after damage
            mm[eo + L.OFF_DEAD] = 1
        self._rebuild_slots(mm, po, keep[-self._max_used:], bump)
        self._add_counter(mm, po + L.OFF_EXPIRATIONS, expired)
        self._add_counter(mm, po + L.OFF_RECOVERIES, 1)
        self._pager.bump(po)

    def _rebuild_slots(self, mm: mmap.mmap, po: int, entries: list[tuple[int, int]], bump: int) -> None:
        nslots, n = self._nslots, self.num_pages
        base = po + L.PAGE_HDR_SIZE
        live = 0
        for eo, atime in entries:
            i = (_entry_at(mm, eo)[1] // n) % nslots
            while _u32_at(mm, base + (i << 3))[0]:
                i = (i + 1) % nslots
            L.SLOT.pack_into(mm, base + (i << 3), eo - po, atime)
            live += self._span_at(mm, eo)
        L.COUNTS.pack_into(mm, po + L.OFF_COUNTS, len(entries), len(entries), bump, bump - self._d0 - live)

    # ------------------------------------------------------------------ whole-store operations

    def _each_page(self) -> Iterator[tuple[mmap.mmap, int]]:
        """Lock each page in turn and yield (map, page offset); unlocks after each step."""
        if self._busy:
            self._busy.check()
        if self._mm is None:
            self._revive()
        for page in range(self.num_pages):
            self._lock(page)
            try:
                mm = self._mm
                assert mm is not None
                yield mm, L.page_offset(self.page_size, page)
            finally:
                self._pager.unlock(page)

    def purge(self) -> int:
        """Remove expired entries from every page; returns how many were removed."""
        removed = 0
        for mm, po in self._each_page():
            now = time.time()
            expired = [(so, eo) for so, eo, _, exp in self._live(mm, po) if exp and exp <= now]
            if expired:
                self._pager.bump(po)
                for so, eo in expired:
                    self._kill(mm, po, so, eo)
                self._add_counter(mm, po + L.OFF_EXPIRATIONS, len(expired))
                self._pager.bump(po)
                removed += len(expired)
        return removed

    def clear(self) -> None:
        """Remove every entry (counters are kept)."""
        for mm, po in self._each_page():
            self._pager.bump(po)
            L.U32.pack_into(mm, po + L.OFF_BUMP, self._d0)  # first, so a crash here repairs to empty
            mm[po + L.PAGE_HDR_SIZE:po + self._d0] = bytes(self._d0 - L.PAGE_HDR_SIZE)
            L.COUNTS.pack_into(mm, po + L.OFF_COUNTS, 0, 0, self._d0, 0)
            self._pager.bump(po)

    def keys(self) -> list[str | bytes]:
        """The live (unexpired) keys, as the str or bytes they were stored with."""
        out: list[str | bytes] = []
        for mm, po in self._each_page():
            now = time.time()
            for _, eo, _, exp in self._live(mm, po):
                if not (exp and exp <= now):
                    _, _, _, klen, flags, _, _ = _entry_at(mm, eo)
                    kb = mm[eo + 24:eo + 24 + klen]
                    out.append(kb.decode() if flags & L.FLAG_STR_KEY else kb)
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
            _, ne, _, bump, dead, ev, ex, rec = L.PAGE_HDR.unpack_from(mm, L.page_offset(self.page_size, page))
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
        """Verify every page (locking each, which repairs any a dead writer left):
        checksums, slot table, counters, and no key in two pages.  Returns the
        problems found; an empty list means the file is sound."""
        problems: list[str] = []
        seen: dict[bytes, int] = {}
        for mm, po in self._each_page():
            page = (po - L.HEADER_SIZE) // self.page_size - 1
            ne, used, bump, dead = _counts_at(mm, po + L.OFF_COUNTS)
            live = tombs = live_bytes = 0
            for i in range(self._nslots):
                off = _u32_at(mm, po + L.PAGE_HDR_SIZE + (i << 3))[0]
                if off == L.SLOT_TOMB:
                    tombs += 1
                elif off:
                    eo = po + off
                    if not self._d0 <= off < bump:
                        problems.append(f"page {page}: slot {i} points outside the data area")
                        continue
                    _, h, vlen, klen, _, is_dead, crc = _entry_at(mm, eo)
                    kb = mm[eo + 24:eo + 24 + klen]
                    body = mm[eo + 24:eo + 24 + klen + vlen]
                    if is_dead or crc32(body, crc32(mm[eo:eo + L.ENTRY_CRC_SPAN])) != crc:
                        problems.append(f"page {page}: slot {i} holds a dead or damaged entry")
                        continue
                    if h != crc32(kb, self._seed) or page not in self._pager.where(kb)[1:3]:
                        problems.append(f"page {page}: key {kb!r} is in a page it does not hash to")
                    if kb in seen:
                        problems.append(f"key {kb!r} is in pages {seen[kb]} and {page}")
                    seen[kb] = page
                    live += 1
                    live_bytes += L.entry_span(klen, vlen)
            if (live, live + tombs) != (ne, used) or bump - self._d0 - dead != live_bytes:
                problems.append(
                    f"page {page}: counters (entries {ne}, used {used}, live bytes "
                    f"{bump - self._d0 - dead}) disagree with its slots ({live}, {live + tombs}, {live_bytes})"
                )
        return problems
