"""Page maintenance, the reference: reading a locked page by the repair rules, and
the one page rewrite through the spare that serves making room, eviction,
compaction and repair (``_layout`` invariants 4 and 5).

``Upkeep.rebuild`` is what the pure-Python pager runs; the C pager's ``rebuild``
implements the same algorithm.  ``survey`` (with the problems it names and
``unreadable`` what a repair would lose), ``entries`` and ``kill`` serve
``MmapStore.check``, ``verify``, ``pages``, ``items``, ``keys`` and ``purge``
under both pagers.
"""

from __future__ import annotations

import mmap
import time
from array import array
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple, Protocol
from zlib import crc32

from . import _layout as L
from ._layout import whole_entry

_u32_at = L.U32.unpack_from
_entry_at = L.ENTRY.unpack_from
_counts_at = L.COUNTS.unpack_from


def utf8(kb: bytes) -> bool:
    try:
        kb.decode()
    except UnicodeDecodeError:
        return False
    return True


class Entry(NamedTuple):
    """An entry of a locked page that passed its checks (``Upkeep.parse``)."""

    off: int  # within the page
    span: int
    vlen: int
    key: bytes
    h: int
    flags: int
    exp: float  # expire_at, 0.0 = never
    dead: int


class Step(IntEnum):
    """The steps of a page rewrite a tracer is told about (``Pager.trace``): what
    stress/crash.py aims its kills at, in both pagers."""

    MAKE_ROOM = 1  # a rebuild for a new entry (dropping dead and expired ones first)
    EVICT = 2  # ... that drops live entries too
    COMPACT = 3  # the copy through the spare
    REPAIR = 4  # a rebuild without a new entry: a dead writer's page, or damage


Tracer = Callable[[Step, bool], None]
"""Called with (step, True) as a step begins and (step, False) as it ends."""


class Survey(NamedTuple):
    """A locked page as the repair rules read it (``Upkeep.survey``)."""

    live: list[Entry]  # in data order
    atimes: dict[int, int]  # last-access tick by entry offset, from the slot table
    problems: list[str]  # what is wrong with the page; [] when sound


class Host(Protocol):
    """What a pager asks of its store: the errors to raise, and resetting a damaged lock."""

    def timeout(self, page: int) -> Exception: ...
    def meddled(self, page: int) -> Exception: ...
    def too_large(self, klen: int, vlen: int) -> Exception: ...
    def key(self, key: object) -> tuple[bytes, bool]: ...
    def codec_error(self, error: Exception, key: object, decoding: bool) -> Exception: ...
    def recover(self, page: int, wedged: bool) -> None: ...


class Pages(Protocol):
    """What maintenance uses of a pager (both pagers have it)."""

    def hold(self, page: int) -> None: ...
    def unlock(self, page: int) -> None: ...
    def bump(self, po: int) -> None: ...
    def rebuild(self, page: int) -> None: ...
    def walk(self, po: int, page: int) -> tuple[list[L.EntryFields], int]: ...


class Upkeep:
    """Maintenance of the pages of one mapping; every method wants the page locked."""

    def __init__(
        self, pages: Pages, host: Host, mm: mmap.mmap, words: L.Words, seed: int, npages: int,
        page_size: int, nslots: int, max_used: int,
    ) -> None:
        self._pages, self._host, self._mm, self._w = pages, host, mm, words
        self._seed, self._n, self._ps, self._nslots, self._max_used = seed, npages, page_size, nslots, max_used
        self._d0 = L.data_start(nslots)
        self.tracer: Tracer | None = None

    def parse(self, page: int, po: int, off: int, limit: int, crc: bool) -> Entry | None:
        """The entry at ``off`` in a locked page if it is whole (``whole_entry``) and,
        if it was a str key, decodable.  None otherwise."""
        fields = whole_entry(self._mm, po, off, self._d0, limit, self._seed, self._n, page, crc)
        if fields is None:
            return None
        e = Entry._make(fields)
        return e if not e.flags & L.FLAG_STR_KEY or utf8(e.key) else None

    def survey(self, page: int, po: int) -> Survey:
        """Read a locked page by the repair rules (invariant 4), trusting no count."""
        mm = self._mm
        base = po + L.PAGE_HDR_SIZE
        problems: list[str] = []
        table = array("I", mm[base:base + (self._nslots << L.SLOT_SHIFT)])  # (offset, tick) pairs (L.Words)
        offs = table[0::2]
        tombs = offs.count(L.SLOT_TOMB)
        atimes = {off: atime for off, atime in zip(offs, table[1::2]) if off > L.SLOT_TOMB}
        if len(atimes) != len(offs) - tombs - offs.count(L.SLOT_EMPTY):
            problems.append("two slots point at one entry")
        latest: dict[bytes, Entry] = {}
        walked, pos = self._pages.walk(po, page)
        for fields in walked:
            e = Entry._make(fields)
            if e.flags & L.FLAG_STR_KEY and not utf8(e.key):  # whole, yet not ours: stop here
                pos = e.off
                break
            latest[e.key] = e  # write order: a later entry of a key replaces an earlier one
        ne, used, bump, dead = _counts_at(mm, po + L.OFF_COUNTS)
        if pos != bump:
            problems.append(f"its entries end at offset {pos}, its header says {bump}")
        for off in sorted(atimes):  # past where the walk stopped: only after damage
            if off >= pos:
                found = self.parse(page, po, off, self._ps, True)
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
        return Survey(live, atimes, problems)

    def image(
        self, po: int, keep: list[Entry], atimes: dict[int, int], new: tuple[bytes, int] | None,
        evicted: int, expired: int, recovered: int,
    ) -> tuple[bytearray, int]:
        """A page image holding ``keep`` (entries of the page at ``po``, in data order)
        and then ``new`` (packed entry, hash), with the page's counters advanced.
        Returns the image and where its entries end; the rest of it is zeros."""
        mm = self._mm
        ps, nslots, n, base = self._ps, self._nslots, self._n, L.PAGE_HDR_SIZE
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

    def install(self, page: int, po: int, img: bytearray, end: int) -> None:
        """Replace a page by ``img`` through the spare (invariant 5).  The page and
        the spare are locked, the page's seq is odd; a kill at any instant leaves
        either the old page or, via the spare, the new one."""
        mm, u32 = self._mm, self._w.u32
        spare = L.page_offset(self._ps, L.SPARE_LOCK)
        body = memoryview(img)[L.OFF_COUNTS:]
        mm[spare + L.OFF_COUNTS:spare + end] = body[:end - L.OFF_COUNTS]
        u32[L.OFF_SPARE_TARGET >> 2] = page
        u32[L.OFF_SPARE_END >> 2] = end
        u32[L.OFF_SPARE_CRC >> 2] = crc32(body[:end - L.OFF_COUNTS])
        u32[L.SPARE_STATE_OFF >> 2] = L.SPARE_VALID
        mm[po + L.OFF_COUNTS:po + self._ps] = body
        u32[L.SPARE_STATE_OFF >> 2] = L.SPARE_EMPTY

    def settle_spare(self) -> None:
        """With the spare locked: finish a page replacement a dead process left half-copied.

        Only onto a page whose seq is still odd (its writer died mid-change, and its
        next locker repairs it only after taking the spare, so nobody else touches
        it meanwhile) and only an image whose checksum holds: a damaged spare state
        can never overwrite a sound page."""
        mm, u32 = self._mm, self._w.u32
        if u32[L.SPARE_STATE_OFF >> 2] == L.SPARE_EMPTY:
            return
        state, target, end, want = L.SPARE_STATE.unpack_from(mm, L.SPARE_STATE_OFF)
        ps = self._ps
        if state == L.SPARE_VALID and target < self._n and L.OFF_COUNTS < end <= ps and not end & 7:
            spare, po = L.page_offset(ps, L.SPARE_LOCK), L.page_offset(ps, target)
            image = mm[spare + L.OFF_COUNTS:spare + end]
            if self._w.u64[(po + L.OFF_SEQ) >> 3] & 1 and crc32(image) == want:
                mm[po + L.OFF_COUNTS:po + end] = image
                mm[po + end:po + ps] = bytes(ps - end)
        u32[L.SPARE_STATE_OFF >> 2] = L.SPARE_EMPTY

    def rebuild(self, page: int, new: tuple[bytes, bytes, int] | None = None) -> list[str]:
        """Rewrite a locked page through the spare (invariant 5) from its entries that
        pass their checks (invariant 4), without dead and expired ones: compaction,
        and repair after a writer died mid-change (seq odd) or a check failed.  With
        ``new`` (key, packed entry, hash) the key's entry is replaced by that one,
        and the least recently used entries go as far as it needs the room.

        The spare is locked before anything changes, so a kill or a LockTimeoutError
        leaves the page as it was; once the image is in the spare, the next locker
        finishes the copy.  Loses at most the write in flight, or damaged entries.
        Returns the problems the page had."""
        po = L.page_offset(self._ps, page)
        step, tracer = Step.MAKE_ROOM if new else Step.REPAIR, self.tracer
        gone: set[int] = set()
        self._pages.hold(L.SPARE_LOCK)
        if tracer:
            tracer(step, True)
        try:
            self.settle_spare()  # first: a dead writer may have been replacing this page
            live, atimes, problems = self.survey(page, po)
            now = time.time()
            others = [e for e in live if new is None or e.key != new[0]]
            keep = [e for e in others if not (e.exp and e.exp <= now)]
            expired = len(others) - len(keep)
            room = self._ps - self._d0 - (len(new[1]) if new else 0)
            slots = self._max_used - (new is not None)  # a repair keeps more only after damage
            used = sum(e.span for e in keep)
            if used > room or len(keep) > slots:
                t = L.tick(now)
                for e in sorted(keep, key=lambda e: (t - atimes.get(e.off, t)) & L.TICK_MASK, reverse=True):
                    if used <= room and len(keep) - len(gone) <= slots:
                        break
                    gone.add(e.off)
                    used -= e.span
                keep = [e for e in keep if e.off not in gone]
                if tracer:
                    tracer(Step.EVICT, True)
            odd = self._w.u64[(po + L.OFF_SEQ) >> 3] & 1
            recovered = int(new is None or bool(problems))
            img, end = self.image(po, keep, atimes, new[1:] if new else None, len(gone), expired, recovered)
            if not odd:
                self._pages.bump(po)
            if tracer:
                tracer(Step.COMPACT, True)
            self.install(page, po, img, end)
            if tracer:
                tracer(Step.COMPACT, False)
            self._pages.bump(po)
        finally:
            if tracer:
                if gone:
                    tracer(Step.EVICT, False)
                tracer(step, False)
            self._pages.unlock(L.SPARE_LOCK)
        return problems

    def unreadable(self, page: int, po: int, survey: Survey) -> tuple[int, list[str | bytes]]:
        """What repairing a surveyed page would lose: how many entries its slots
        point at that fail their checks, and the keys of those whose key bytes
        still hash to this page (their header and key intact, the value damaged),
        as str or bytes as they were stored."""
        kept = {e.off for e in survey.live}
        lost = [off for off in survey.atimes if off not in kept]
        names: list[str | bytes] = []
        for off in sorted(lost):
            fields = whole_entry(self._mm, po, off, self._d0, self._ps, self._seed, self._n, page, False)
            if fields is not None:
                kb, flags = fields[3], fields[5]
                names.append(kb.decode() if flags & L.FLAG_STR_KEY and utf8(kb) else kb)
        return len(lost), names

    def entries(self, page: int, po: int, values: bool = False) -> list[tuple[int, Entry]]:
        """(slot offset, entry) of each live entry of a locked page, by its slot
        table, each checked (the checksum too with ``values``, for a caller that
        reads them); a page that fails is repaired first (``Pages.rebuild``)."""
        mm = self._mm
        base = po + L.PAGE_HDR_SIZE
        for _ in range(2):
            bump = min(_u32_at(mm, po + L.OFF_BUMP)[0], self._ps)
            out: list[tuple[int, Entry]] = []
            keys: set[bytes] = set()
            for i in range(self._nslots):
                so = base + (i << L.SLOT_SHIFT)
                off = _u32_at(mm, so)[0]
                if off > L.SLOT_TOMB:
                    e = self.parse(page, po, off, bump, values)
                    if e is None or e.dead or e.key in keys:
                        break
                    keys.add(e.key)
                    out.append((so, e))
            else:
                return out
            self._pages.rebuild(page)
        raise self._host.meddled(page)

    def span_at(self, eo: int) -> int:
        _, _, vlen, klen, _, _, _ = _entry_at(self._mm, eo)
        return L.entry_span(klen, vlen)

    def kill(self, po: int, so: int, eo: int) -> None:
        """Remove a live entry (seq must be odd): tombstone its slot, mark it dead.
        One store per field (invariant 2), so a kill between them leaves a page
        that repair reads right."""
        mm, u32 = self._mm, self._w.u32
        ne, _, _, dead = _counts_at(mm, po + L.OFF_COUNTS)
        span = self.span_at(eo)
        u32[so >> 2] = L.SLOT_TOMB
        mm[eo + L.OFF_DEAD] = 1
        u32[(po + L.OFF_ENTRIES) >> 2] = (ne - 1) & L.U32_MASK  # counts wrap as in C: repair fixes
        u32[(po + L.OFF_DEADBYTES) >> 2] = (dead + span) & L.U32_MASK  # what damage did to them
