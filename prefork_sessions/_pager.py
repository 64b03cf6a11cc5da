"""The store's hot path: hashing a key to its pages, probing a page, lock-free reads.

``Pager`` is the reference implementation; ``_speedups.Pager`` (C) implements the
same interface and is used when it could be built.  Offsets are absolute offsets
in the mapping.  See ``_layout`` for the format and the seqlock rules.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import warnings
from typing import Literal
from zlib import crc32

from . import _layout as L
from ._locks import Locked, Mutexes

FIB = 0x9E3779B1  # Fibonacci hashing multiplier: spreads the second page choice
READ_TRIES = 4

_u32_at = L.U32.unpack_from
_entry_at = L.ENTRY.unpack_from
TORN = (struct.error, IndexError, ValueError, OverflowError)  # what a torn read can raise


def pages_of(h: int, n: int) -> tuple[int, int]:
    """A key's two candidate pages from its hash (the same page twice only if n == 1)."""
    p1 = h % n
    p2 = ((h * FIB) & 0xFFFFFFFF) * n >> 32
    if p2 == p1 and n > 1:
        p2 = (p1 + 1) % n
    return p1, p2


EntryFields = tuple[int, int, int, bytes, int, int, float, int]
"""(offset in page, span, value length, key, hash, flags, expire_at, dead)"""


def whole_entry(
    mm: mmap.mmap, po: int, off: int, d0: int, limit: int, seed: int, npages: int, page: int, crc: bool
) -> EntryFields | None:
    """The fields of the entry at ``off`` in the page at ``po`` if it is whole: aligned,
    inside ``[d0, limit)``, its checksum valid (when ``crc``), its key hashing to
    ``page``.  None otherwise."""
    if off < d0 or off & 7 or off + L.ENTRY_SIZE > limit:
        return None
    eo = po + off
    exp, h, vlen, klen, flags, dead, want = _entry_at(mm, eo)
    span = L.entry_span(klen, vlen)
    if off + span > limit:
        return None
    kb = mm[eo + L.ENTRY_SIZE:eo + L.ENTRY_SIZE + klen]
    if crc and crc32(mm[eo + L.ENTRY_SIZE:eo + L.ENTRY_SIZE + klen + vlen], crc32(mm[eo:eo + L.ENTRY_CRC_SPAN])) != want:
        return None
    if h != crc32(kb, seed) or page not in pages_of(h, npages):
        return None
    return off, span, vlen, kb, h, flags, exp, dead


class Pager:
    """Hot-path access to a mapped store file of a given geometry."""

    def __init__(self, mm: mmap.mmap, seed: int, npages: int, page_size: int, nslots: int, max_used: int) -> None:
        self._mm: mmap.mmap | None = mm
        self._w: L.Words | None = L.Words(mm)
        self._locks: Mutexes | None = Mutexes(mm)
        self._seed, self._n, self._ps, self._nslots = seed, npages, page_size, nslots
        self._max_used = max_used
        self._d0 = L.data_start(nslots)

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

    def locate(self, kb: bytes) -> tuple[int, int, int, int, int, int]:
        """(hash, p1, p2, first slot, page holding the key (-1: neither, -2: could
        not tell), roomier page).  Lock-free and seqlock-validated.

        The roomier page is where a new key goes (two-choice placement): the
        second page only if it holds fewer live bytes by a margin of 1/32 page,
        since an insert holds the first page's lock anyway and the second costs
        another lock.  Simulated at 85% fill with 64 KiB pages, the margin keeps
        99.98% of entries (99.999% without) and sends 30% of inserts (not 50%) to
        the second page."""
        mm = self._mm
        assert mm is not None
        h, p1, p2, s0 = self.where(kb)
        po1, po2 = L.page_offset(self._ps, p1), L.page_offset(self._ps, p2)
        in1 = self.holds(po1, kb, h, s0)
        in2 = 0 if in1 == 1 or p2 == p1 else self.holds(po2, kb, h, s0)
        page = p1 if in1 == 1 else p2 if in2 == 1 else -2 if min(in1, in2) < 0 else -1
        _, _, b1, d1 = L.COUNTS.unpack_from(mm, po1 + L.OFF_COUNTS)
        _, _, b2, d2 = L.COUNTS.unpack_from(mm, po2 + L.OFF_COUNTS)
        return h, p1, p2, s0, page, p2 if b2 - d2 + (self._ps >> 5) < b1 - d1 else p1

    def read(self, kb: bytes) -> bytes | None | Literal[False]:
        """Lock-free read: the raw value, None (absent or expired), or False
        when writers kept the pages busy (the caller then reads under the lock)."""
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
            if u32[(so >> 2) + 1] != t:
                u32[(so >> 2) + 1] = t  # LRU hint, deliberately unlocked (see _layout)
            return value
        return False

    def walk(self, po: int, page: int) -> tuple[list[EntryFields], int]:
        """The whole entries of a locked page in data order, from the start of its data
        area to the first entry that is not (``whole_entry``; ``_layout`` invariant 4:
        the page's count of entries is not trusted).  Returns their fields and the
        offset where the walk stopped."""
        mm = self._mm
        assert mm is not None
        out, pos = [], self._d0
        while (e := whole_entry(mm, po, pos, self._d0, self._ps, self._seed, self._n, page, True)) is not None:
            out.append(e)
            pos += e[1]
        return out, pos

    def lock(self, page: int, timeout: float) -> Locked:
        """Lock a page (-1: the spare) against every thread of every process
        (``_locks``); DIRTY when its seq is odd (a writer died: repair first)."""
        assert self._locks is not None and self._w is not None
        po = L.page_offset(self._ps, page)
        state = self._locks.lock(po + L.OFF_LOCK, timeout)
        if state or page < 0:
            return state
        return Locked.DIRTY if self._w.u64[(po + L.OFF_SEQ) >> 3] & 1 else Locked.SOUND

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
        exp_at: float, bracket: bool,
    ) -> bool:
        """Write a new entry at the page's bump pointer and point slot ``so`` at it,
        marking ``old_eo`` dead (0: a new key).  Returns False, changing nothing,
        when the page lacks the room or the slot.  ``bracket``: make seq odd/even
        around the change."""
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
        if bracket:
            self.bump(po)
        mm[po + bump:po + bump + span] = L.pack_entry(exp_at, h, flags, kb, vb)
        u32[(po + L.OFF_BUMP) >> 2] = bump + span  # the entry exists (invariant 3) ...
        u32[(so >> 2) + 1] = L.tick(time.time())
        u32[so >> 2] = bump  # ... then a slot points at it
        if old_eo:
            mm[old_eo + L.OFF_DEAD] = 1
            _, _, ovlen, oklen, _, _, _ = _entry_at(mm, old_eo)
            u32[(po + L.OFF_DEADBYTES) >> 2] = (dead + L.entry_span(oklen, ovlen)) & L.U32_MASK
        else:
            if slot_empty:
                u32[(po + L.OFF_USED) >> 2] = (used + 1) & L.U32_MASK
            u32[(po + L.OFF_ENTRIES) >> 2] = (ne + 1) & L.U32_MASK
        if bracket:
            self.bump(po)
        return True


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

__all__ = ["ACCELERATED", "PURE_ENV", "EntryFields", "FastPager", "Pager", "pages_of", "whole_entry"]
