"""The store's hot path: hashing a key to its pages, probing a page, lock-free
reads, page locks, and the write path (insert, update, delete; making room,
eviction, compaction and repair through ``_upkeep``).

``Pager`` is the reference implementation, written to be read beside ``_layout``;
``_speedups.Pager`` (C) implements the same interface and algorithm and is used
when it could be built.  Offsets are absolute offsets in the mapping.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any
from zlib import crc32

from . import _layout as L
from ._args import MAX_KEY_SIZE
from ._layout import pages_of
from ._locks import HOLDER_CHECK_AFTER, Locked, Mutexes
from ._upkeep import Host, Tracer, Upkeep

READ_TRIES = 4


class Busy(enum.Enum):
    """What ``read`` returns when writers kept the pages busy on every try (the
    caller then reads with the pages locked); the C pager returns the same object."""

    BUSY = "BUSY"


BUSY = Busy.BUSY
INSERT_BACKOFF = 50e-6  # seconds an insert waits before trying again when its second page stayed busy
MAX_BACKOFFS = 20  # then it takes both pages in index order
Update = Callable[[bytes | None], bytes]
"""Maps a key's old raw value (None: absent) to its new one, with the page locked."""

_u32_at = L.U32.unpack_from
_entry_at = L.ENTRY.unpack_from
TORN = (struct.error, IndexError, ValueError, OverflowError)  # what a torn read can raise


class Pager:
    """Hot-path access to a mapped store file of a given geometry."""

    def __init__(
        self, mm: mmap.mmap, seed: int, npages: int, page_size: int, nslots: int, max_used: int,
        host: Host, lock_timeout: float,
    ) -> None:
        self._mm: mmap.mmap | None = mm
        self._w: L.Words | None = L.Words(mm)
        self._locks: Mutexes | None = Mutexes(mm)
        self._seed, self._n, self._ps, self._nslots = seed, npages, page_size, nslots
        self._max_used = max_used
        self._d0 = L.data_start(nslots)
        self._host, self._timeout = host, lock_timeout
        # a weak proxy: no cycle, so the mapping goes as soon as the store lets go of this pager
        self._upkeep = Upkeep(weakref.proxy(self), host, mm, self._w, seed, npages, page_size, nslots, max_used)

    def close(self) -> None:
        """Forget the mapping (releasing the views that pin it)."""
        if self._w is not None:
            self._w.release()
        if self._locks is not None:
            self._locks.close()
        self._mm = self._w = self._locks = None

    def where(self, kb: bytes) -> tuple[int, int, int, int]:
        """(hash, first page, second page, first slot) of a key."""
        h = crc32(kb, self._seed)
        p1, p2 = pages_of(h, self._n)
        return h, p1, p2, (h // self._n) % self._nslots

    def find(self, po: int, kb: bytes, h: int, s0: int) -> tuple[int, int, int]:
        """Probe the page at ``po``: (slot offset, entry offset, first free slot offset).

        Entry offset 0 means absent, ``L.DAMAGED`` that a slot on the probe path
        points outside the page's entries or the key's entry is dead (a torn view
        without the lock; damage with it).  The free slot is the first tombstone
        or the empty slot that ended the probe (0 if the table has neither).
        """
        mm = self._mm
        assert mm is not None
        nslots, d0 = self._nslots, self._d0
        bump = min(_u32_at(mm, po + L.OFF_BUMP)[0], self._ps)
        base = po + L.PAGE_HDR_SIZE
        klen = len(kb)
        free = 0
        i = s0
        for _ in range(nslots):
            so = base + (i << L.SLOT_SHIFT)
            off = _u32_at(mm, so)[0]
            if off == L.SLOT_EMPTY:
                return so, 0, free or so
            if off == L.SLOT_TOMB:
                if not free:
                    free = so
            else:
                if off < d0 or off & 7 or off + L.ENTRY_SIZE > bump:
                    return so, L.DAMAGED, free
                eo = po + off
                _, eh, vlen, ek, _, dead, _ = _entry_at(mm, eo)
                if eh == h and ek == klen and mm[eo + L.ENTRY_SIZE:eo + L.ENTRY_SIZE + klen] == kb:
                    if dead or off + L.ENTRY_SIZE + klen + vlen > bump:
                        return so, L.DAMAGED, free
                    return so, eo, free
            i += 1
            if i == nslots:
                i = 0
        return 0, 0, free

    def holds(self, po: int, kb: bytes, h: int, s0: int) -> int:
        """Is the key in the page at ``po``?  1 yes, 0 no, -1 could not tell
        (writers kept the page busy on every try).  Seqlock-validated."""
        assert self._w is not None
        seq, at = self._w.u64, (po + L.OFF_SEQ) >> 3
        for _ in range(READ_TRIES):
            try:
                s = seq[at]
                if s & 1:
                    continue
                eo = self.find(po, kb, h, s0)[1]
                if eo != L.DAMAGED and seq[at] == s:
                    return int(eo != 0)
            except TORN:
                continue
        return -1

    def _roomier(self, p1: int, p2: int) -> int:
        """Where a new key goes (two-choice placement): the second page only if it
        holds fewer live bytes by a margin of 1/32 page, since an insert holds the
        first page's lock anyway and the second costs another lock.  Simulated at
        85% fill with 64 KiB pages, the margin keeps 99.98% of entries (99.999%
        without) and sends 30% of inserts (not 50%) to the second page."""
        mm = self._mm
        assert mm is not None
        _, _, b1, d1 = L.COUNTS.unpack_from(mm, L.page_offset(self._ps, p1) + L.OFF_COUNTS)
        _, _, b2, d2 = L.COUNTS.unpack_from(mm, L.page_offset(self._ps, p2) + L.OFF_COUNTS)
        return p2 if b2 - d2 + (self._ps >> 5) < b1 - d1 else p1

    def key_of(self, key: object) -> tuple[bytes, int]:
        """(bytes, flags) of a store key: an exact str (UTF-8, FLAG_STR_KEY) or bytes
        up to MAX_KEY_SIZE as they are; anything else goes to ``host.key``, which
        converts it or raises the store's error."""
        if type(key) is str:
            try:
                kb = key.encode()
            except UnicodeEncodeError:
                kb = b"\0" * (MAX_KEY_SIZE + 1)
            if len(kb) <= MAX_KEY_SIZE:
                return kb, L.FLAG_STR_KEY
        elif type(key) is bytes and len(key) <= MAX_KEY_SIZE:
            return key, 0
        kb, was_str = self._host.key(key)
        return kb, L.FLAG_STR_KEY if was_str else 0

    def read(self, key: str | bytes) -> bytes | Busy | None:
        """Lock-free read: the raw value, None (absent or expired), or BUSY."""
        found = self._lookup(key)
        return found if found is None or found is BUSY else found[0]

    def expiry(self, key: str | bytes) -> float | Busy | None:
        """Lock-free read of the key's expiry (epoch seconds, 0.0: never), None
        (absent or expired), or BUSY."""
        found = self._lookup(key)
        return found if found is None or found is BUSY else found[1]

    def _lookup(self, key: str | bytes) -> tuple[bytes, float] | Busy | None:
        kb = self.key_of(key)[0]
        mm, w = self._mm, self._w
        assert mm is not None and w is not None
        seq, u32 = w.u64, w.u32
        h, p1, p2, s0 = self.where(kb)
        po1, po2 = L.page_offset(self._ps, p1), L.page_offset(self._ps, p2)
        at1, at2 = (po1 + L.OFF_SEQ) >> 3, (po2 + L.OFF_SEQ) >> 3
        klen = len(kb)
        for _ in range(READ_TRIES):
            try:
                s1 = seq[at1]
                if s1 & 1:
                    continue
                so, eo, _ = self.find(po1, kb, h, s0)
                at, s = at1, s1
                if eo == L.DAMAGED:
                    continue
                if not eo and p2 != p1:
                    s2 = seq[at2]
                    if s2 & 1:
                        continue
                    so, eo, _ = self.find(po2, kb, h, s0)
                    at, s = at2, s2
                    if eo == L.DAMAGED:
                        continue
                    if not eo and seq[at1] != s1:
                        continue
                if not eo:
                    if seq[at] != s:
                        continue
                    return None
                exp, eh, vlen, ek, flags, _, crc = _entry_at(mm, eo)
                start = eo + L.ENTRY_SIZE + klen
                value = mm[start:start + vlen]
                if len(value) != vlen or seq[at] != s:
                    continue
            except TORN:
                continue
            if crc32(value, crc32(kb, crc32(L.ENTRY_HEAD.pack(exp, eh, vlen, ek, flags)))) != crc:
                continue
            now = time.time()
            if exp and exp <= now:
                return None
            t = L.tick(now)
            if u32[(so + L.SLOT_TICK) >> 2] != t:
                u32[(so + L.SLOT_TICK) >> 2] = t  # LRU hint, deliberately unlocked (see _layout)
            return value, exp
        return BUSY

    def walk(self, po: int, page: int) -> tuple[list[L.EntryFields], int]:
        """The whole entries of a locked page in data order, from the start of its data
        area to the first entry that is not (``whole_entry``; ``_layout`` invariant 4:
        the page's count of entries is not trusted).  Returns their fields and the
        offset where the walk stopped."""
        mm = self._mm
        assert mm is not None
        out, pos = [], self._d0
        while (e := L.whole_entry(mm, po, pos, self._d0, self._ps, self._seed, self._n, page, True)) is not None:
            out.append(e)
            pos += e[1]
        return out, pos

    def lock(self, page: int, timeout: float) -> Locked:
        """Lock a page (-1: the spare) against every thread of every process within
        ``timeout`` (``_locks``): SOUND, DIRTY (seq odd: a writer died, repair
        first) or TIMEOUT.  A damaged lock is reset by the host and taken again."""
        assert self._locks is not None and self._w is not None
        po = L.page_offset(self._ps, page)
        deadline = time.monotonic() + timeout
        state = self._locks.lock(po + L.OFF_LOCK, min(timeout, HOLDER_CHECK_AFTER))
        looked = False
        while state == Locked.WEDGED or state == Locked.TIMEOUT and timeout > HOLDER_CHECK_AFTER:
            if state == Locked.WEDGED or not looked:
                self._host.recover(page, state == Locked.WEDGED)
            looked = True
            left = deadline - time.monotonic()
            if left <= 0:
                return Locked.TIMEOUT
            state = self._locks.lock(po + L.OFF_LOCK, left)
            timeout = 0.0  # from here a TIMEOUT is final
        if state or page < 0:
            return state
        return Locked.DIRTY if self._w.u64[(po + L.OFF_SEQ) >> 3] & 1 else Locked.SOUND

    def hold(self, page: int) -> None:
        """Lock a page for a change: the host's LockTimeoutError if it stays busy, and
        a page its last writer left mid-change is repaired first."""
        state = self.lock(page, self._timeout)
        if state == Locked.TIMEOUT:
            raise self._host.timeout(page)
        if state == Locked.DIRTY:
            try:
                self.rebuild(page)
            except BaseException:
                self.unlock(page)
                raise

    def unlock(self, page: int) -> None:
        """Release a page's lock."""
        assert self._locks is not None
        self._locks.unlock(L.page_offset(self._ps, page) + L.OFF_LOCK)

    def bump(self, po: int) -> None:
        """seq += 1: odd before a page's first change, even after its last."""
        assert self._w is not None
        self._w.u64[(po + L.OFF_SEQ) >> 3] += 1

    def append(
        self, po: int, so: int, old_eo: int, kb: bytes, flags: int, h: int, vb: bytes,
        exp_at: float,
    ) -> bool:
        """Write a new entry at the page's bump pointer and point slot ``so`` at it,
        marking ``old_eo`` dead (0: a new key).  Returns False, changing nothing,
        when the page lacks the room or the slot.  Seq must be odd."""
        mm, w = self._mm, self._w
        assert mm is not None and w is not None
        u32 = w.u32
        ne, used, bump, dead = L.COUNTS.unpack_from(mm, po + L.OFF_COUNTS)
        klen, vlen = len(kb), len(vb)
        span = L.entry_span(klen, vlen)
        if bump < self._d0 or bump & 7 or bump + span > self._ps or not so:
            return False  # no room, or a damaged bump: the caller rebuilds the page
        slot_empty = _u32_at(mm, so)[0] == L.SLOT_EMPTY
        if not old_eo and slot_empty and used >= self._max_used:
            return False
        mm[po + bump:po + bump + span] = L.pack_entry(exp_at, h, flags, kb, vb)
        u32[(po + L.OFF_BUMP) >> 2] = bump + span  # the entry exists (invariant 3) ...
        u32[(so + L.SLOT_TICK) >> 2] = L.tick(time.time())
        u32[so >> 2] = bump  # ... then a slot points at it
        if old_eo:
            mm[old_eo + L.OFF_DEAD] = 1
            _, _, ovlen, oklen, _, _, _ = _entry_at(mm, old_eo)
            u32[(po + L.OFF_DEADBYTES) >> 2] = (dead + L.entry_span(oklen, ovlen)) & L.U32_MASK
        else:
            if slot_empty:
                u32[(po + L.OFF_USED) >> 2] = (used + 1) & L.U32_MASK
            u32[(po + L.OFF_ENTRIES) >> 2] = (ne + 1) & L.U32_MASK
        return True


    def rebuild(self, page: int) -> None:
        """Repair a locked page (``Upkeep.rebuild``)."""
        self._upkeep.rebuild(page)

    def trace(self, tracer: Tracer | None) -> None:
        """Tell ``tracer`` the steps of every page rewrite from now on (None: stop)."""
        self._upkeep.tracer = tracer

    def find_locked(self, page: int, kb: bytes, h: int, s0: int) -> tuple[int, int, int]:
        """``find`` on a locked page, repairing the page first if it fails a check."""
        po = L.page_offset(self._ps, page)
        found = self.find(po, kb, h, s0)
        if found[1] == L.DAMAGED:
            self.rebuild(page)
            found = self.find(po, kb, h, s0)
            if found[1] == L.DAMAGED:
                raise self._host.meddled(page)
        return found

    def put(self, key: str | bytes, vb: bytes, life: float) -> None:
        """Store ``vb`` under ``key`` for ``life`` seconds (0: never)."""
        self._write(key, vb, life, None)

    def update(
        self, key: str | bytes, fn: Callable[[Any], Any], life: float, loads: Callable[[bytes], Any] | None,
        dumps: Callable[[Any], bytes] | None, guard: set[int], missing: Any = None, keep: bool = False,
    ) -> Any:
        """get_and_set: store and return ``fn(old value, or missing)``, run with the key's
        page locked and this thread in ``guard``; ``loads``/``dumps`` (None: raw
        bytes) decode the old value and encode the new, their errors becoming the
        host's ``codec_error``.  ``keep``: an existing entry keeps its expiry
        (``life`` applies to a new one)."""
        result: list[Any] = []

        def update(old: bytes | None) -> bytes:
            try:
                value = missing if old is None else old if loads is None else loads(old)
            except Exception as e:
                raise self._host.codec_error(e, key, True) from e
            me = threading.get_ident()
            guard.add(me)
            try:
                new = fn(value)
            finally:
                guard.discard(me)
            try:
                if dumps is not None:
                    vb = dumps(new)
                elif isinstance(new, (bytes, bytearray, memoryview)):
                    vb = bytes(new)
                else:
                    raise TypeError(f"serializer='raw' stores bytes, not {type(new).__name__}")
            except Exception as e:
                raise self._host.codec_error(e, key, False) from e
            result.append(new)
            return vb

        self._write(key, b"", life, update, keep)
        return result[-1]

    def _write(
        self, key: str | bytes, vb: bytes, life: float, update: Update | None, keep: bool = False
    ) -> None:
        """Store ``vb`` (or ``update(old raw value or None)``, run with the page
        locked) under ``key`` for ``life`` seconds (0: never).

        A key's first page is its home: every insert of the key locks it first,
        so two inserts of one key cannot race, and an update locks only the page
        that holds it (``_layout`` invariant 6).  A new key goes to the roomier
        page; its second page is locked too only then, waiting only in index order
        and otherwise just trying (a busy second page: stay home); after
        MAX_BACKOFFS tries it takes both in index order, waiting as any locker does,
        so a stuck or damaged lock times out or is reset instead of being tried for
        ever."""
        kb, flags = self.key_of(key)
        if update is None and L.ENTRY_SIZE + len(kb) + len(vb) > self._ps - self._d0:
            raise self._host.too_large(len(kb), len(vb))
        exp_at = time.time() + life if life > 0 else 0.0
        backoffs = 0
        while True:
            if backoffs:  # p2 stayed busy and p1 is released: let its holder finish
                time.sleep(INSERT_BACKOFF)
            h, p1, p2, s0 = self.where(kb)
            po1, po2 = L.page_offset(self._ps, p1), L.page_offset(self._ps, p2)
            in1 = self.holds(po1, kb, h, s0)
            in2 = 0 if in1 == 1 or p2 == p1 else self.holds(po2, kb, h, s0)
            roomier = self._roomier(p1, p2)
            if in2 == 1:  # lives in its second page: update it there
                self.hold(p2)
                try:
                    so, eo, _ = self.find_locked(p2, kb, h, s0)
                    if eo:
                        self._put_here(p2, so, eo, kb, flags, h, s0, exp_at, vb, update, keep)
                        return
                finally:
                    self.unlock(p2)
                continue  # deleted meanwhile: start over
            second = backoffs >= MAX_BACKOFFS and p2 < p1
            if second:
                self.hold(p2)
            try:
                self.hold(p1)
            except BaseException:
                if second:
                    self.unlock(p2)
                raise
            try:
                so, eo, free = self.find_locked(p1, kb, h, s0)
                if eo or p1 == p2:
                    self._put_here(p1, so if eo else free, eo, kb, flags, h, s0, exp_at, vb, update, keep)
                    return
                # Not in p1; with p1 held nobody can insert it into p2, so what we
                # see of p2 now is final (-1: p2 was too busy, or failed a check).
                in2 = -1 if second else self.holds(po2, kb, h, s0)
                if in2 > 0:
                    continue
                if not second and (in2 < 0 or roomier == p2):
                    if p2 > p1:  # in index order: wait
                        self.hold(p2)
                        second = True
                    else:  # against the order: only try
                        state = self.lock(p2, 0.0)
                        second = state != Locked.TIMEOUT
                        if state == Locked.DIRTY:
                            self.rebuild(p2)
                if in2 < 0 and not second:
                    backoffs += 1
                    continue
                if second:
                    so2, eo2, free2 = self.find_locked(p2, kb, h, s0)
                    if eo2 or roomier == p2:
                        self._put_here(p2, so2 if eo2 else free2, eo2, kb, flags, h, s0, exp_at, vb, update, keep)
                        return
                self._put_here(p1, free, 0, kb, flags, h, s0, exp_at, vb, update, keep)
                return
            finally:
                if second:
                    self.unlock(p2)
                self.unlock(p1)

    def _old_value(
        self, page: int, so: int, eo: int, kb: bytes, h: int, s0: int
    ) -> tuple[bytes | None, int, int, float]:
        """(current value or None when expired, slot, entry, its expiry) of the key at ``eo`` in a
        locked page; an entry failing its checksum gets the page repaired and the key
        looked up again (a damaged value is never handed to the callback)."""
        mm = self._mm
        assert mm is not None
        po = L.page_offset(self._ps, page)
        for attempt in range(2):
            if not eo:
                break
            e = self._upkeep.parse(page, po, eo - po, self._ps, True)
            if e is not None:
                if e.exp and e.exp <= time.time():
                    return None, so, eo, 0.0
                start = eo + L.ENTRY_SIZE + len(kb)
                return mm[start:start + e.vlen], so, eo, e.exp
            if attempt:
                break
            self.rebuild(page)
            so, eo, free = self.find_locked(page, kb, h, s0)
            so = so if eo else free
        return None, so, eo, 0.0

    def _put_here(
        self, page: int, so: int, eo: int, kb: bytes, flags: int, h: int, s0: int,
        exp_at: float, vb: bytes, update: Update | None, keep: bool,
    ) -> None:
        """With the page locked, write the key's new entry there: ``eo`` is its
        current entry (0: none) and ``so`` the slot to use (its own, or a free one);
        ``keep``: an existing entry's expiry stays."""
        if update is not None:
            old, so, eo, old_exp = self._old_value(page, so, eo, kb, h, s0)
            if keep and old is not None:
                exp_at = old_exp
            vb = update(old)  # user code: the page is locked but unchanged
            if L.ENTRY_SIZE + len(kb) + len(vb) > self._ps - self._d0:
                raise self._host.too_large(len(kb), len(vb))  # the old value stays
        po = L.page_offset(self._ps, page)
        self.bump(po)
        done = self.append(po, so, eo, kb, flags, h, vb, exp_at)
        self.bump(po)
        if not done:  # no room or no slot: rebuild the page with the new entry in it
            self._upkeep.rebuild(page, (kb, L.pack_entry(exp_at, h, flags, kb, vb), h))

    def remove(self, key: str | bytes) -> bool:
        """Delete ``key``; True if a live (unexpired) entry went."""
        kb = self.key_of(key)[0]
        while True:
            h, p1, p2, s0 = self.where(kb)
            in1 = self.holds(L.page_offset(self._ps, p1), kb, h, s0)
            in2 = 0 if in1 == 1 or p2 == p1 else self.holds(L.page_offset(self._ps, p2), kb, h, s0)
            unsure = in1 < 0 or in2 < 0  # too busy to tell: look in both, locked in index order
            if in1 == 1 or in2 == 1:
                pages: tuple[int, ...] = (p1 if in1 == 1 else p2,)
            elif unsure:
                pages = (p1,) if p1 == p2 else (min(p1, p2), max(p1, p2))
            else:
                return False
            held: list[int] = []
            try:
                for p in pages:
                    self.hold(p)
                    held.append(p)
                for p in pages:
                    so, eo, _ = self.find_locked(p, kb, h, s0)
                    if eo:
                        mm = self._mm
                        assert mm is not None
                        exp = _entry_at(mm, eo)[0]
                        po = L.page_offset(self._ps, p)
                        self.bump(po)
                        self._upkeep.kill(po, so, eo)
                        self.bump(po)
                        return not (exp and exp <= time.time())
            finally:
                for p in reversed(held):
                    self.unlock(p)
            if unsure:
                return False  # in neither page, with both locked
            # deleted by someone else between the look and the lock: look again

PURE_ENV = "PREFORK_SESSIONS_PURE"  # "1": use the reference implementation (inherited by subprocesses)

FastPager: type[Pager | _speedups.Pager]
ACCELERATED = False
"""Whether stores use the C hot path (False: the pure-Python reference)."""
if os.environ.get(PURE_ENV, "") not in ("", "0"):
    FastPager = Pager
else:
    try:
        from . import _speedups

        FastPager = _speedups.Pager
        ACCELERATED = True
    except ImportError as e:  # no compiler at install time: the reference implementation serves
        FastPager = Pager
        warnings.warn(
            f"prefork_sessions: the C hot path could not be loaded ({e}); using the pure-Python "
            "implementation, about 2x slower. Reinstall with a C compiler and zlib headers "
            "(apt-get install gcc libc6-dev zlib1g-dev), or set PREFORK_SESSIONS_PURE=1 to "
            "choose it and silence this warning.",
            RuntimeWarning, stacklevel=2,
        )

__all__ = ["ACCELERATED", "BUSY", "PURE_ENV", "Busy", "FastPager", "Pager"]
