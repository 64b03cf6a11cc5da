"""The on-disk format of a store file: the one module that owns it.

Theory of operation
===================

File::

    [ file header: HEADER_SIZE bytes ][ spare page ][ page 0 ][ page 1 ] ... [ page N-1 ]

The file header records the geometry (page size, page count, slots per page), the
format version and a random per-file hash seed, so every process that maps the
file agrees on them; nothing is ever inferred from constructor arguments.  Those
fields are written once and carry a crc32; the spare's state (below) is the only
part of the header that changes.

Page::

    [ page header: PAGE_HDR_SIZE ][ slot table: slots * SLOT.size ][ data area ... ]

* Page header: the page's lock (a process-shared robust mutex, ``_locks``), then
  ``seq``, then the counts and counters.  A page image (compaction, repair) is
  everything after ``seq``: it never carries a lock.  The spare page has a
  header of the same shape, and its lock is the spare's.
* The data area is a bump allocator: entries are appended at ``bump`` and never
  move, except when a page is compacted (see the spare page below).
* Entry: ENTRY header (expiry, hash, lengths, flags, dead flag, crc32) then the
  key bytes and the value bytes, padded to 8 bytes.  The crc covers every header
  byte before the dead flag plus key and value.
* Slot: (entry offset within the page, last-access tick).  Offset 0 = empty,
  1 = tombstone.  Open addressing with linear probing from slot
  ``(hash // num_pages) % slots``.

Invariants
----------
1. Every write happens with the page's lock held (``_locks`` says how locks
   work and in which order they are taken); the writer makes the page's ``seq``
   odd before its first store and even after its last.  A locker that finds
   ``seq`` odd knows the previous writer died mid-change and repairs the page.
2. One store per field.  Every header field, slot half and spare-state word is
   written with one aligned store of its full width (``Words`` below, or an atomic
   store in C), never by ``struct.pack_into``, which zero-fills its target first:
   a kill between two stores leaves each field either old or new, never torn or
   zero.  Groups of fields (the counts) are never stored together.
3. A new entry is fully written before ``bump`` moves past it and before any slot
   points at it; the entry it replaces is marked dead only afterwards.  Bytes past
   the end of the entries are zero, except an entry being written: compaction and
   repair write a whole page image, ``clear`` zeroes the page.
4. Repair trusts no count.  It walks the entries from the start of the data area
   while each is whole (inside the page, checksum valid), keeps for every key only
   its *latest* entry (a later entry replaces an earlier one; a latest entry that
   is dead means the key was deleted: an older one is never resurrected), then
   takes slot-referenced entries past the point where the walk stopped (damage in
   the middle of the page) if each checks out on its own.  What fails is damage to
   that page alone: repair and compaction copy only entries that passed.
5. Live entries are never overwritten in place.  Compaction, making room and
   repair build a new page image in memory, write it (up to its end) to the spare
   page with its checksum, mark the spare valid for that page (one store, after
   the target, length and checksum), copy it over the page, then mark the spare
   empty.  Whoever next takes the spare's lock first copies a valid spare image
   over its page, if that page's seq is still odd (its writer died) and the
   image's checksum holds.  The spare is locked before the page is changed, so a
   busy spare leaves the page untouched.
6. A key lives in at most one of its two candidate pages.  Inserting a key that
   is in neither locks both pages (in index order); updating a key in place locks
   only the page that holds it.  Lock order: pages by index, then the spare.
7. Readers take no lock: they read ``seq``, copy the entry, and accept it only if
   ``seq`` was even and unchanged, the entry lies inside the data area, is not
   dead, and its checksum holds.  The last-access tick in the slot is a hint that
   readers store without the lock; it lives in the slot table (never in the data
   area), so a stray hint write can only ever change another hint.
8. A locked reader or writer that finds a slot pointing outside the entries, at a
   dead entry, or an entry failing its checksum repairs the page (invariant 4)
   and carries on; public calls never raise on damage.
"""

from __future__ import annotations

import mmap
import struct
import sys
from zlib import crc32

MAGIC = b"\x89PFSESS\n"
VERSION = 3  # 3: a robust mutex in every page header (2: fcntl locks; older versions cannot be read)

HEADER_SIZE = 4096
# magic, version, header size, page size, num pages, slots per page, hash seed,
# file id, creation time, lock protocol (``_locks.protocol()``: every process on the
# file must lock the same way, so a file made elsewhere is refused on open)
HEADER = struct.Struct("<8sIIIIIIQd32s")
# crc32 of those fields, right after them: they are written once, when the file is
# created, so a damaged header (a changed seed would make every key hash elsewhere
# and every page repair to empty) is refused on open instead of spreading.
OFF_HEADER_CRC = HEADER.size

# Spare-page state (in the file header) and the byte locked to own the spare.
SPARE_STATE_OFF = 2048
SPARE_STATE = struct.Struct("<IIII")  # state (SPARE_EMPTY or SPARE_VALID), target page, image end, crc32
OFF_SPARE_TARGET = SPARE_STATE_OFF + 4
OFF_SPARE_END = SPARE_STATE_OFF + 8
OFF_SPARE_CRC = SPARE_STATE_OFF + 12
SPARE_EMPTY = 0
SPARE_VALID = 1
SPARE_LOCK = -1  # pseudo page index of the spare's lock

# Page header: the page's lock (``_locks``), seq, then what a page image carries.
OFF_LOCK = 0
LOCK_SIZE = 64  # room for the platform's pthread_mutex_t (40 bytes on x86-64 glibc, 48 on arm64)
OFF_SEQ = OFF_LOCK + LOCK_SIZE
SEQ = struct.Struct("<Q")
OFF_COUNTS = OFF_SEQ + SEQ.size  # a page image: everything from here to the page's end
COUNTS = struct.Struct("<IIII")  # entries, used, bump, dead (read together, stored one by one)
OFF_ENTRIES = OFF_COUNTS
OFF_USED = OFF_COUNTS + 4
OFF_BUMP = OFF_COUNTS + 8
OFF_DEADBYTES = OFF_COUNTS + 12
OFF_EVICTIONS = OFF_COUNTS + COUNTS.size
OFF_EXPIRATIONS = OFF_EVICTIONS + 8
OFF_RECOVERIES = OFF_EXPIRATIONS + 8
# at OFF_SEQ: seq, entries, used slots (live + tombstones), bump, dead bytes,
# evictions (of unexpired entries), expirations, recoveries
PAGE_HDR = struct.Struct("<QIIIIQQQ")
PAGE_HDR_SIZE = 128  # the slot table starts here
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
U32_MASK = 0xFFFFFFFF

SLOT = struct.Struct("<II")  # entry offset within page, last-access tick (see tick())
SLOT_SHIFT = 3  # slot i is at PAGE_HDR_SIZE + (i << SLOT_SHIFT): SLOT.size == 8
SLOT_TICK = 4  # offset of the tick within a slot
SLOT_EMPTY = 0
SLOT_TOMB = 1

# expire_at (0.0 = never), hash, value length, key length, flags, dead, crc32
ENTRY = struct.Struct("<dIIHBBI")
ENTRY_SIZE = ENTRY.size  # 24
ENTRY_CRC_SPAN = 19  # header bytes covered by the crc: everything before `dead`
ENTRY_HEAD = struct.Struct("<dIIHB")  # the crc-covered part, for packing
OFF_E_HASH = 8  # field offsets within an entry, as ENTRY lays them out
OFF_E_VLEN = 12
OFF_E_KLEN = 16
OFF_E_FLAGS = 18
OFF_DEAD = 19
OFF_E_CRC = 20
FLAG_STR_KEY = 1
DAMAGED = -1  # entry offset a locked probe returns for a page that fails its checks

MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 64 << 20
SLOT_BYTES_PER_PAGE_BYTES = 256  # one slot per 256 bytes of page
MIN_SLOTS = 16
MAX_LOAD = 0.75  # used slots (live + tombstones) per slot before a rebuild


def slots_for(page_size: int) -> int:
    """Slots per page for a page size (a geometry default, recorded in the header)."""
    return max(MIN_SLOTS, page_size // SLOT_BYTES_PER_PAGE_BYTES)


def data_start(slots: int) -> int:
    """Offset within a page where the data area begins."""
    return PAGE_HDR_SIZE + slots * SLOT.size


def entry_span(klen: int, vlen: int) -> int:
    """Bytes an entry occupies in the data area (8-byte aligned)."""
    return (ENTRY_SIZE + klen + vlen + 7) & ~7


def pack_header(
    page_size: int, num_pages: int, slots: int, seed: int, file_id: int, created: float, lock_protocol: bytes
) -> bytes:
    """A new file's header fields and their checksum."""
    raw = HEADER.pack(MAGIC, VERSION, HEADER_SIZE, page_size, num_pages, slots, seed, file_id, created,
                      lock_protocol)
    return raw + U32.pack(crc32(raw))


def pack_entry(exp_at: float, h: int, flags: int, kb: bytes, vb: bytes) -> bytes:
    """An entry's bytes as they go into the data area (live, checksummed, padded)."""
    head = ENTRY_HEAD.pack(exp_at, h, len(vb), len(kb), flags)
    crc = crc32(vb, crc32(kb, crc32(head)))
    raw = b"".join((head, b"\0", U32.pack(crc), kb, vb))
    return raw.ljust(entry_span(len(kb), len(vb)), b"\0")


def file_size(page_size: int, num_pages: int) -> int:
    """Total size of a store file with this geometry."""
    return HEADER_SIZE + page_size * (num_pages + 1)


def page_offset(page_size: int, page: int) -> int:
    """File offset of ``page``; page -1 is the spare page."""
    return HEADER_SIZE + page_size * (page + 1)


def empty_page_header(slots: int, lock: bytes) -> bytes:
    """A freshly initialised page header (an unlocked lock, seq 0, no entries)."""
    return (lock.ljust(LOCK_SIZE, b"\0") + PAGE_HDR.pack(0, 0, 0, data_start(slots), 0, 0, 0, 0)).ljust(
        PAGE_HDR_SIZE, b"\0")


TICKS_PER_SECOND = 16
TICK_MASK = 0xFFFFFFFF


def tick(now: float) -> int:
    """The last-access clock: 1/16 s units, wrapping every 8.5 years; compare ages
    as ``(tick(now) - t) & TICK_MASK``."""
    return int(now * TICKS_PER_SECOND) & TICK_MASK


class Words:
    """Single-store access to the 32- and 64-bit fields of a mapping (invariant 2).

    ``u32[off >> 2]`` / ``u64[off >> 3]`` read and write one aligned field with
    one load or store (memoryview item access copies a fixed-size scalar), where
    ``struct.pack_into`` would first zero the target.  The format is little-endian,
    so this needs a little-endian host.  Views pin the mapping: ``release()``
    before closing it."""

    __slots__ = ("u32", "u64")

    def __init__(self, mm: mmap.mmap) -> None:
        if sys.byteorder != "little":
            raise OSError("prefork_sessions store files are little-endian; this host is big-endian")
        self.u32 = memoryview(mm).cast("I")
        self.u64 = memoryview(mm).cast("Q")

    def release(self) -> None:
        self.u32.release()
        self.u64.release()


FIB = 0x9E3779B1  # Fibonacci hashing multiplier: spreads the second page choice
_entry_at = ENTRY.unpack_from


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
    if off < d0 or off & 7 or off + ENTRY_SIZE > limit:
        return None
    eo = po + off
    exp, h, vlen, klen, flags, dead, want = _entry_at(mm, eo)
    span = entry_span(klen, vlen)
    if off + span > limit:
        return None
    kb = mm[eo + ENTRY_SIZE:eo + ENTRY_SIZE + klen]
    if crc and crc32(mm[eo + ENTRY_SIZE:eo + ENTRY_SIZE + klen + vlen], crc32(mm[eo:eo + ENTRY_CRC_SPAN])) != want:
        return None
    if h != crc32(kb, seed) or page not in pages_of(h, npages):
        return None
    return off, span, vlen, kb, h, flags, exp, dead
