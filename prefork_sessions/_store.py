"""MmapStore: a key-value store in one memory-mapped file shared by processes and threads.

The file format and its invariants are described in ``_layout``.  This module
holds the mechanisms: placement (two candidate pages per key), locking (a
per-page ``threading.Lock`` plus an open-file-description lock on one byte of
the page), lock-free reads (seqlock validation), eviction, compaction through
the spare page, repair after a crashed writer, and fork handling.
"""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Iterator
from zlib import crc32

from . import _layout as L
from ._errors import (
    LockTimeoutError,
    ReentrantCallError,
    SerializationError,
    StoreClosedError,
    ValueTooLargeError,
)
from ._file import open_or_create
from ._serializers import resolve

__all__ = ["MmapStore", "NEVER", "DEFAULT_CACHE_SIZE", "DEFAULT_PAGE_SIZE", "DEFAULT_LOCK_TIMEOUT"]

NEVER = 0
"""Pass as ``expire`` for entries that never expire (so does ``math.inf``)."""
DEFAULT_CACHE_SIZE = 64 << 20
DEFAULT_PAGE_SIZE = 64 << 10
DEFAULT_LOCK_TIMEOUT = 10.0

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi")  # struct flock: type, whence, start, len, pid (0 for OFD locks)
_FIB = 0x9E3779B1  # Fibonacci hashing multiplier: spreads the second page choice
_READ_TRIES = 4

_seq_at = L.SEQ.unpack_from
_u32_at = L.U32.unpack_from
_slot_at = L.SLOT.unpack_from
_entry_at = L.ENTRY.unpack_from
_counts_at = L.COUNTS.unpack_from
_ENTRY_ERRORS = (struct.error, IndexError, ValueError, OverflowError)

_live_stores: "weakref.WeakSet[MmapStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_live_stores):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self.serializer, self._dumps, self._loads = resolve(serializer)
        self._expire = self._lifetime(expire)
        self._lock_timeout = float(lock_timeout)
        self._busy: set[int] = set()
        self._hits = self._misses = 0
        self._mm: mmap.mmap | None = None
        self._fd = -1
        self._stale = False
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
        self._fd, self._mm, self._stale = fd, mm, False
        self.page_size, self.num_pages = geo.page_size, geo.num_pages
        self._seed, self._nslots = geo.seed, geo.slots
        self._d0 = L.data_start(geo.slots)
        self._max_used = int(geo.slots * L.MAX_LOAD)
        self._max_entry = geo.page_size - self._d0
        self._tlocks = [threading.Lock() for _ in range(geo.num_pages + 1)]  # [-1] is the spare's

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's descriptor and locks; reopen lazily.

        The inherited descriptor shares the parent's open file description, and
        with it the parent's OFD locks, so the child must not lock through it.
        In-process locks another thread held at fork time would never be released.
        """
        if self._mm is None:
            return
        try:
            self._mm.close()
            os.close(self._fd)
        except (OSError, BufferError):
            pass
        self._mm, self._fd, self._stale = None, -1, True
        self._busy = set()

    def reopen(self) -> None:
        """Re-open and re-map the same file (call in a worker after fork; idempotent)."""
        self._close_file()
        self._busy = set()
        self._open()

    def close(self) -> None:
        """Unmap and close the file.  Later calls raise StoreClosedError; ``reopen()`` revives."""
        self._close_file()
        self._stale = False

    def _close_file(self) -> None:
        if self._mm is not None:
            self._mm.close()
            os.close(self._fd)
        self._mm, self._fd = None, -1

    def _revive(self) -> mmap.mmap:
        if not self._stale:
            raise StoreClosedError(f"store {self.path} is closed; call reopen() to use it again")
        self._open()
        assert self._mm is not None
        return self._mm

    def __enter__(self) -> MmapStore:
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

    @staticmethod
    def _lifetime(expire: float | None) -> float:
        if expire is None or expire == 0 or expire == math.inf:
            return 0.0
        if not expire > 0:
            raise ValueError(f"expire={expire!r}: use a positive number of seconds, or 0/NEVER for no expiry")
        return float(expire)

    def _expire_at(self, expire: float | None) -> float:
        lifetime = self._expire if expire is None else self._lifetime(expire)
        return time.time() + lifetime if lifetime else 0.0

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

    def _where(self, kb: bytes) -> tuple[int, int, int, int]:
        """(hash, first page, second page, first slot) of a key."""
        n = self.num_pages
        h = crc32(kb, self._seed)
        p1 = h % n
        p2 = ((h * _FIB) & 0xFFFFFFFF) * n >> 32
        if p2 == p1 and n > 1:
            p2 = (p1 + 1) % n
        return h, p1, p2, (h // n) % self._nslots

    def _serialize(self, key: object, value: Any) -> bytes:
        try:
            return self._dumps(value)
        except Exception as e:
            raise SerializationError(
                f"cannot store the value for {key!r} with serializer {self.serializer!r}: {e}. "
                "Store JSON-compatible values (dict, list, str, int, float, bool, None), "
                "or choose serializer='pickle' or a custom serializer."
            ) from e

    def _deserialize(self, raw: bytes) -> Any:
        if self._loads is None:
            return raw
        try:
            return self._loads(raw)
        except Exception as e:
            raise SerializationError(
                f"a value in {self.path} cannot be read with serializer {self.serializer!r}: {e}. "
                "Was the file written with another serializer?"
            ) from e

    def _check_fits(self, kb: bytes, vb: bytes) -> None:
        if L.ENTRY_SIZE + len(kb) + len(vb) > self._max_entry:
            raise ValueTooLargeError(
                f"value of {len(vb)} bytes (key {len(kb)} bytes) cannot fit in a page of "
                f"{self.page_size} bytes: the largest entry is {self._max_entry - L.ENTRY_SIZE} bytes "
                f"of key plus value. Store less, or create the store file with a larger page_size."
            )

    def _reentry(self) -> None:
        if threading.get_ident() in self._busy:
            raise ReentrantCallError(
                "the store was called from inside a get_and_set() callback, which runs with the "
                "page locked; compute from the value passed to the callback and return the result"
            )

    # ------------------------------------------------------------------ locking

    def _flock(self, page: int, kind: int) -> None:
        arg = _FLOCK.pack(kind, 0, L.page_offset(self.page_size, page), 1, 0)
        try:
            fcntl.fcntl(self._fd, _F_OFD_SETLK, arg)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        deadline = time.monotonic() + self._lock_timeout
        delay = 20e-6
        while True:
            time.sleep(delay)
            try:
                fcntl.fcntl(self._fd, _F_OFD_SETLK, arg)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise self._timeout(page)
            delay = min(delay * 2, 0.002)

    def _timeout(self, page: int) -> LockTimeoutError:
        return LockTimeoutError(
            f"page {page} of {self.path} stayed locked for {self._lock_timeout:g}s; a live process "
            "holds it (dead holders release automatically). Look for a slow get_and_set() callback "
            "or raise lock_timeout."
        )

    def _lock(self, page: int) -> None:
        """Lock a page (or the spare, page -1) against threads and processes; repair if needed."""
        tl = self._tlocks[page]
        if not tl.acquire(True, self._lock_timeout):
            raise self._timeout(page)
        try:
            self._flock(page, fcntl.F_WRLCK)
        except BaseException:
            tl.release()
            raise
        if page >= 0:
            po = L.page_offset(self.page_size, page)
            if _seq_at(self._mm, po)[0] & 1:  # type: ignore[arg-type]
                try:
                    self._repair(page, po)
                except BaseException:
                    self._unlock(page)
                    raise

    def _unlock(self, page: int) -> None:
        try:
            self._flock(page, fcntl.F_UNLCK)
        finally:
            self._tlocks[page].release()

    def _lock_pages(self, p1: int, p2: int) -> tuple[int, ...]:
        pages = (p1,) if p1 == p2 else (p1, p2) if p1 < p2 else (p2, p1)
        done: list[int] = []
        try:
            for p in pages:
                self._lock(p)
                done.append(p)
        except BaseException:
            for p in reversed(done):
                self._unlock(p)
            raise
        return pages

    def _unlock_pages(self, pages: tuple[int, ...]) -> None:
        for p in reversed(pages):
            self._unlock(p)

    def _bump_seq(self, mm: mmap.mmap, po: int) -> None:
        L.SEQ.pack_into(mm, po, _seq_at(mm, po)[0] + 1)

    # ------------------------------------------------------------------ lookup

    def _find(self, mm: mmap.mmap, po: int, kb: bytes, h: int, s0: int) -> tuple[int, int, int]:
        """Probe a page for a key: (slot offset, entry offset, first free slot offset).

        Entry offset 0 means absent; the free slot is the first tombstone or the
        empty slot that ended the probe (0 if the table has none).
        """
        nslots = self._nslots
        base = po + L.PAGE_HDR_SIZE
        klen = len(kb)
        free = 0
        i = s0
        for _ in range(nslots):
            so = base + (i << 3)
            off = _u32_at(mm, so)[0]
            if off == L.SLOT_EMPTY:
                return so, 0, free or so
            if off == L.SLOT_TOMB:
                if not free:
                    free = so
            else:
                eo = po + off
                _, eh, _, ek, _, _, _ = _entry_at(mm, eo)
                if eh == h and ek == klen and mm[eo + 24:eo + 24 + klen] == kb:
                    return so, eo, free
            i += 1
            if i == nslots:
                i = 0
        return 0, 0, free

    def _read(self, kb: bytes) -> tuple[bytes, float] | None:
        """Lock-free read of a key's raw value and expiry time (None when absent)."""
        mm = self._mm or self._revive()
        h, p1, p2, s0 = self._where(kb)
        ps = self.page_size
        po1 = L.HEADER_SIZE + ps * (p1 + 1)
        po2 = L.HEADER_SIZE + ps * (p2 + 1)
        klen = len(kb)
        for _ in range(_READ_TRIES):
            try:
                s1 = _seq_at(mm, po1)[0]
                if s1 & 1:
                    continue
                so, eo, _ = self._find(mm, po1, kb, h, s0)
                po, s = po1, s1
                if not eo and p2 != p1:
                    s2 = _seq_at(mm, po2)[0]
                    if s2 & 1:
                        continue
                    so, eo, _ = self._find(mm, po2, kb, h, s0)
                    po, s = po2, s2
                    if not eo and _seq_at(mm, po1)[0] != s1:
                        continue
                if not eo:
                    if _seq_at(mm, po)[0] != s:
                        continue
                    return None
                exp, _, vlen, _, _, _, crc = _entry_at(mm, eo)
                start = eo + 24 + klen
                value = mm[start:start + vlen]
                if _seq_at(mm, po)[0] != s:
                    continue
            except _ENTRY_ERRORS:
                continue  # torn by a concurrent writer: seq will say so on the next try
            if crc32(value, crc32(kb, crc32(mm[eo:eo + L.ENTRY_CRC_SPAN]))) != crc:
                continue
            now = time.time()
            if exp and exp <= now:
                return None
            t = int(now)
            if _u32_at(mm, so + 4)[0] != t:
                L.U32.pack_into(mm, so + 4, t)  # LRU hint, deliberately unlocked (see _layout)
            return value, exp
        return self._read_locked(kb, h, p1, p2, s0)

    def _read_locked(self, kb: bytes, h: int, p1: int, p2: int, s0: int) -> tuple[bytes, float] | None:
        pages = self._lock_pages(p1, p2)
        try:
            mm = self._mm
            assert mm is not None
            for p in pages:
                po = L.page_offset(self.page_size, p)
                _, eo, _ = self._find(mm, po, kb, h, s0)
                if eo:
                    exp, _, vlen, klen, _, _, _ = _entry_at(mm, eo)
                    if exp and exp <= time.time():
                        return None
                    return mm[eo + 24 + klen:eo + 24 + klen + vlen], exp
            return None
        finally:
            self._unlock_pages(pages)

    def _locate(self, kb: bytes, h: int, p1: int, p2: int, s0: int) -> int:
        """Lock-free guess of the page holding a key (-1: neither); verified under the lock."""
        mm = self._mm
        assert mm is not None
        try:
            if self._find(mm, L.page_offset(self.page_size, p1), kb, h, s0)[1]:
                return p1
            if p2 != p1 and self._find(mm, L.page_offset(self.page_size, p2), kb, h, s0)[1]:
                return p2
        except _ENTRY_ERRORS:
            pass
        return -1

    # ------------------------------------------------------------------ public API

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when missing or expired."""
        if self._busy:
            self._reentry()
        if type(key) is str:
            kb = key.encode()
        else:
            kb = self._key(key)[0]
        found = self._read(kb)
        if found is None:
            self._misses += 1
            return default
        self._hits += 1
        return self._deserialize(found[0]) if self._loads is not None else found[0]

    def __contains__(self, key: object) -> bool:
        if self._busy:
            self._reentry()
        return self._read(self._key(key)[0]) is not None  # type: ignore[arg-type]

    def set(self, key: str | bytes, value: Any, expire: float | None = None) -> None:
        """Store ``value`` under ``key``; ``expire`` in seconds (None: store default; 0: never).

        Raises ValueTooLargeError (the old value stays) or SerializationError.
        """
        if self._busy:
            self._reentry()
        kb, flags = self._key(key)
        vb = self._serialize(key, value)
        self._check_fits(kb, vb)
        self._write(kb, flags, self._expire_at(expire), lambda _old: vb)

    def get_and_set(self, key: str | bytes, fn: Callable[[Any], Any], expire: float | None = None) -> Any:
        """Atomically store and return ``fn(current value or None)``.

        ``fn`` runs with the key's page locked: keep it short and do not call the
        store from it (ReentrantCallError).  If ``fn`` raises, nothing is stored.
        """
        if self._busy:
            self._reentry()
        kb, flags = self._key(key)
        exp_at = self._expire_at(expire)
        result: list[Any] = []
        me = threading.get_ident()

        def update(old: bytes | None) -> bytes:
            current = None if old is None else self._deserialize(old)
            self._busy.add(me)
            try:
                new = fn(current)
            finally:
                self._busy.discard(me)
            vb = self._serialize(key, new)
            self._check_fits(kb, vb)
            result.append(new)
            return vb

        self._write(kb, flags, exp_at, update)
        return result[0]

    def delete(self, key: str | bytes) -> bool:
        """Remove ``key``; True if a live (unexpired) entry was removed."""
        if self._busy:
            self._reentry()
        kb = self._key(key)[0]
        if self._mm is None:
            self._revive()
        h, p1, p2, s0 = self._where(kb)
        while True:
            page = self._locate(kb, h, p1, p2, s0)
            if page < 0:
                return False
            self._lock(page)
            try:
                mm = self._mm
                assert mm is not None
                po = L.page_offset(self.page_size, page)
                so, eo, _ = self._find(mm, po, kb, h, s0)
                if not eo:
                    continue  # moved on between the guess and the lock: look again
                exp = _entry_at(mm, eo)[0]
                self._bump_seq(mm, po)
                self._kill(mm, po, so, eo)
                self._bump_seq(mm, po)
                return not (exp and exp <= time.time())
            finally:
                self._unlock(page)

    # ------------------------------------------------------------------ writing

    def _write(self, kb: bytes, flags: int, exp_at: float, make: Callable[[bytes | None], bytes]) -> None:
        """Replace a key's entry with ``make(old raw value or None)`` under the page lock(s)."""
        if self._mm is None:
            self._revive()
        h, p1, p2, s0 = self._where(kb)
        page = self._locate(kb, h, p1, p2, s0)
        if page >= 0:  # update in place: only its page need be locked (invariant 4)
            self._lock(page)
            try:
                if self._write_locked(page, kb, flags, h, s0, exp_at, make, need_found=True):
                    return
            finally:
                self._unlock(page)
        pages = self._lock_pages(p1, p2)
        try:
            mm = self._mm
            assert mm is not None
            for p in pages:
                if self._find(mm, L.page_offset(self.page_size, p), kb, h, s0)[1]:
                    self._write_locked(p, kb, flags, h, s0, exp_at, make, need_found=True)
                    return
            self._write_locked(self._roomier(mm, p1, p2), kb, flags, h, s0, exp_at, make, need_found=False)
        finally:
            self._unlock_pages(pages)

    def _roomier(self, mm: mmap.mmap, p1: int, p2: int) -> int:
        """Of a key's two pages, the one with more reclaimable room (two-choice placement)."""
        if p1 == p2:
            return p1
        _, _, b1, d1 = _counts_at(mm, L.page_offset(self.page_size, p1) + 8)
        _, _, b2, d2 = _counts_at(mm, L.page_offset(self.page_size, p2) + 8)
        return p1 if b1 - d1 <= b2 - d2 else p2

    def _write_locked(
        self, page: int, kb: bytes, flags: int, h: int, s0: int, exp_at: float,
        make: Callable[[bytes | None], bytes], need_found: bool,
    ) -> bool:
        mm = self._mm
        assert mm is not None
        po = L.page_offset(self.page_size, page)
        so, eo, free = self._find(mm, po, kb, h, s0)
        if need_found and not eo:
            return False
        old = None
        if eo:
            oexp, _, ovlen, oklen, _, _, _ = _entry_at(mm, eo)
            if not (oexp and oexp <= time.time()):
                old = mm[eo + 24 + oklen:eo + 24 + oklen + ovlen]
        vb = make(old)  # may run user code (get_and_set): the page is locked but unmodified
        span = L.entry_span(len(kb), len(vb))
        self._bump_seq(mm, po)
        try:
            _, used, bump, _ = _counts_at(mm, po + 8)
            if bump + span > self.page_size or (not eo and (used >= self._max_used or not free)):
                self._make_room(mm, page, po, span, eo, new_slot=not eo)
                so, eo, free = self._find(mm, po, kb, h, s0)
            self._append(mm, po, so if eo else free, eo, kb, flags, h, vb, exp_at, span)
        finally:
            self._bump_seq(mm, po)
        return True

    def _append(
        self, mm: mmap.mmap, po: int, so: int, old_eo: int, kb: bytes, flags: int, h: int,
        vb: bytes, exp_at: float, span: int,
    ) -> None:
        ne, used, bump, dead = _counts_at(mm, po + 8)
        eo = po + bump
        klen, vlen = len(kb), len(vb)
        crc = crc32(vb, crc32(kb, crc32(L.ENTRY_HEAD.pack(exp_at, h, vlen, klen, flags))))
        L.ENTRY.pack_into(mm, eo, exp_at, h, vlen, klen, flags, 0, crc)
        mm[eo + 24:eo + 24 + klen] = kb
        mm[eo + 24 + klen:eo + 24 + klen + vlen] = vb
        bump += span
        L.U32.pack_into(mm, po + L.OFF_BUMP, bump)  # the entry now exists (invariant 2) ...
        if old_eo:
            L.SLOT.pack_into(mm, so, bump - span, int(time.time()))  # ... then the slot moves to it
            mm[old_eo + L.OFF_DEAD] = 1
            dead += self._span_at(mm, old_eo)
        else:
            if _u32_at(mm, so)[0] == L.SLOT_EMPTY:
                used += 1
            L.SLOT.pack_into(mm, so, bump - span, int(time.time()))
            ne += 1
        L.COUNTS.pack_into(mm, po + 8, ne, used, bump, dead)

    def _span_at(self, mm: mmap.mmap, eo: int) -> int:
        _, _, vlen, klen, _, _, _ = _entry_at(mm, eo)
        return L.entry_span(klen, vlen)

    def _kill(self, mm: mmap.mmap, po: int, so: int, eo: int) -> None:
        """Remove a live entry (seq must be odd): tombstone its slot, mark it dead."""
        ne, used, bump, dead = _counts_at(mm, po + 8)
        L.U32.pack_into(mm, so, L.SLOT_TOMB)
        mm[eo + L.OFF_DEAD] = 1
        L.COUNTS.pack_into(mm, po + 8, ne - 1, used, bump, dead + self._span_at(mm, eo))

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
        entries = sorted(self._live(mm, po), key=lambda e: e[2])
        expired = [e for e in entries if e[3] and e[3] <= now]
        for so, eo, _, _ in expired:
            self._kill(mm, po, so, eo)
        if expired:
            self._add_counter(mm, po + L.OFF_EXPIRATIONS, len(expired))
        evicted = 0
        for so, eo, _, exp in entries:
            ne, _, bump, dead = _counts_at(mm, po + 8)
            if self.page_size - bump + dead >= span and not (new_slot and ne >= self._max_used):
                break
            if (exp and exp <= now) or eo == keep:
                continue
            self._kill(mm, po, so, eo)
            evicted += 1
        if evicted:
            self._add_counter(mm, po + L.OFF_EVICTIONS, evicted)
        ne, used, bump, dead = _counts_at(mm, po + 8)
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
        L.COUNTS.pack_into(img, 8, len(entries), len(entries), pos, 0)
        return img

    def _compact(self, mm: mmap.mmap, page: int, po: int) -> None:
        """Rewrite a locked page (seq odd) without dead entries and tombstones, via the spare."""
        live = sorted((eo, atime) for _, eo, atime, _ in self._live(mm, po))
        img = self._image(mm, po, live)
        spare = L.page_offset(self.page_size, L.SPARE_LOCK)
        self._lock(L.SPARE_LOCK)
        try:
            self._settle_spare(mm)
            mm[spare + 8:spare + self.page_size] = img[8:]
            L.SPARE_STATE.pack_into(mm, L.SPARE_STATE_OFF, L.SPARE_VALID, page)
            mm[po + 8:po + self.page_size] = img[8:]
            L.SPARE_STATE.pack_into(mm, L.SPARE_STATE_OFF, L.SPARE_EMPTY, 0)
        finally:
            self._unlock(L.SPARE_LOCK)

    def _settle_spare(self, mm: mmap.mmap) -> None:
        """With the spare locked: finish a compaction a dead process left half-copied.

        The target page's seq is still odd, so nobody modifies it; its next locker
        repairs it (and waits for the spare first), so restoring it here is safe.
        """
        state, target = L.SPARE_STATE.unpack_from(mm, L.SPARE_STATE_OFF)
        if state == L.SPARE_VALID and 0 <= target < self.num_pages:
            spare = L.page_offset(self.page_size, L.SPARE_LOCK)
            po = L.page_offset(self.page_size, target)
            mm[po + 8:po + self.page_size] = mm[spare + 8:spare + self.page_size]
        L.SPARE_STATE.pack_into(mm, L.SPARE_STATE_OFF, L.SPARE_EMPTY, 0)

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
            self._unlock(L.SPARE_LOCK)
        atimes = {}
        base = po + L.PAGE_HDR_SIZE
        for i in range(self._nslots):
            off, atime = _slot_at(mm, base + (i << 3))
            atimes[off] = atime
        bump = min(max(_u32_at(mm, po + L.OFF_BUMP)[0], self._d0), self.page_size)
        now, t = time.time(), int(time.time())
        latest: dict[bytes, tuple[int, int]] = {}
        expired = 0
        pos = self._d0
        while pos + L.ENTRY_SIZE <= bump:
            exp, _, vlen, klen, _, dead, crc = _entry_at(mm, po + pos)
            span = L.entry_span(klen, vlen)
            eo = po + pos
            if pos + span > bump or crc32(mm[eo + 24:eo + 24 + klen + vlen], crc32(mm[eo:eo + L.ENTRY_CRC_SPAN])) != crc:
                bump = pos  # damaged beyond here: nothing acknowledged can be past a torn entry
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
        L.COUNTS.pack_into(mm, po + 8, 0, 0, bump, 0)
        keep = sorted(latest.values())
        for eo, _ in keep[:-self._max_used]:  # more than the slots allow: only after damage
            mm[eo + L.OFF_DEAD] = 1
        self._rebuild_slots(mm, po, keep[-self._max_used:], bump)
        self._add_counter(mm, po + L.OFF_EXPIRATIONS, expired)
        self._add_counter(mm, po + L.OFF_RECOVERIES, 1)
        self._bump_seq(mm, po)

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
        L.COUNTS.pack_into(mm, po + 8, len(entries), len(entries), bump, bump - self._d0 - live)

    # ------------------------------------------------------------------ whole-store operations

    def _each_page(self) -> Iterator[tuple[mmap.mmap, int]]:
        """Lock each page in turn and yield (map, page offset); unlocks after each step."""
        if self._busy:
            self._reentry()
        if self._mm is None:
            self._revive()
        for page in range(self.num_pages):
            self._lock(page)
            try:
                mm = self._mm
                assert mm is not None
                yield mm, L.page_offset(self.page_size, page)
            finally:
                self._unlock(page)

    def purge(self) -> int:
        """Remove expired entries from every page; returns how many were removed."""
        removed = 0
        for mm, po in self._each_page():
            now = time.time()
            expired = [(so, eo) for so, eo, _, exp in self._live(mm, po) if exp and exp <= now]
            if expired:
                self._bump_seq(mm, po)
                for so, eo in expired:
                    self._kill(mm, po, so, eo)
                self._add_counter(mm, po + L.OFF_EXPIRATIONS, len(expired))
                self._bump_seq(mm, po)
                removed += len(expired)
        return removed

    def clear(self) -> None:
        """Remove every entry (counters are kept)."""
        for mm, po in self._each_page():
            self._bump_seq(mm, po)
            L.U32.pack_into(mm, po + L.OFF_BUMP, self._d0)  # first, so a crash here repairs to empty
            mm[po + L.PAGE_HDR_SIZE:po + self._d0] = bytes(self._d0 - L.PAGE_HDR_SIZE)
            L.COUNTS.pack_into(mm, po + 8, 0, 0, self._d0, 0)
            self._bump_seq(mm, po)

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
            ne, used, bump, dead = _counts_at(mm, po + 8)
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
                    exp, h, vlen, klen, _, is_dead, crc = _entry_at(mm, eo)
                    kb = mm[eo + 24:eo + 24 + klen]
                    body = mm[eo + 24:eo + 24 + klen + vlen]
                    if is_dead or crc32(body, crc32(mm[eo:eo + L.ENTRY_CRC_SPAN])) != crc:
                        problems.append(f"page {page}: slot {i} holds a dead or damaged entry")
                        continue
                    if h != crc32(kb, self._seed) or page not in self._where(kb)[1:3]:
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
