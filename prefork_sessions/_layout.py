"""The on-disk format of a store file: the one module that owns it.

Theory of operation
===================

File::

    [ file header: HEADER_SIZE bytes ][ spare page ][ page 0 ][ page 1 ] ... [ page N-1 ]

The file header records the geometry (page size, page count, slots per page), the
format version and a random per-file hash seed, so every process that maps the
file agrees on them; nothing is ever inferred from constructor arguments.

Page::

    [ page header: PAGE_HDR_SIZE ][ slot table: slots * SLOT.size ][ data area ... ]

* The data area is a bump allocator: entries are appended at ``bump`` and never
  move, except when a page is compacted (see the spare page below).
* Entry: ENTRY header (expiry, hash, lengths, flags, dead flag, crc32) then the
  key bytes and the value bytes, padded to 8 bytes.  The crc covers every header
  byte before the dead flag plus key and value.
* Slot: (entry offset within the page, last-access tick).  Offset 0 = empty,
  1 = tombstone.  Open addressing with linear probing from ``slot_start(hash)``.

Invariants
----------
1. Every write happens with the page locked; the writer makes the page's ``seq``
   odd before its first store and even after its last.  A locker that finds
   ``seq`` odd knows the previous writer died mid-change and repairs the page.
2. A new entry is fully written before ``bump`` moves past it and before any
   slot points at it; the entry it replaces is marked dead only afterwards.  So
   the entries in ``[data, bump)`` always contain every acknowledged value, and
   repair rebuilds the slot table from them (a later duplicate of a key wins,
   because the data area is in write order).
3. Live entries are never overwritten in place.  Compaction builds the new page
   image in memory, writes it (up to its bump) to the spare page, marks the spare
   valid for that page, copies it over the page, then marks the spare empty.
   Whoever next takes the spare's lock (any compaction, or the repair of that
   page) first copies a valid spare image over its page: the page's seq is still
   odd, so nobody else touches it meanwhile.
4. A key lives in at most one of its two candidate pages.  Inserting a key that
   is in neither locks both pages (in index order); updating a key in place locks
   only the page that holds it.
5. Readers take no lock: they read ``seq``, copy the entry, and accept it only if
   ``seq`` was even and unchanged.  The last-access tick in the slot is a hint
   that readers store without the lock; it lives in the slot table (never in the
   data area), so a stray hint write can only ever change another hint.
"""

from __future__ import annotations

import struct

MAGIC = b"\x89PFSESS\n"
VERSION = 1

HEADER_SIZE = 4096
# magic, version, header size, page size, num pages, slots per page, hash seed,
# file id, creation time
HEADER = struct.Struct("<8sIIIIIIQd")

# Spare-page state (in the file header) and the byte locked to own the spare.
SPARE_STATE_OFF = 2048
SPARE_STATE = struct.Struct("<III")  # state (SPARE_EMPTY or SPARE_VALID), target page, image length
SPARE_EMPTY = 0
SPARE_VALID = 1
SPARE_LOCK = -1  # pseudo page index of the spare's lock

# seq, entries, used slots (live + tombstones), bump, dead bytes,
# evictions (of unexpired entries), expirations, recoveries
PAGE_HDR = struct.Struct("<QIIIIQQQ")
PAGE_HDR_SIZE = 64
SEQ = struct.Struct("<Q")
OFF_COUNTS = SEQ.size  # everything a page copy carries over starts after seq
COUNTS = struct.Struct("<IIII")  # entries, used, bump, dead
OFF_BUMP = OFF_COUNTS + 8
OFF_EVICTIONS = 24
OFF_EXPIRATIONS = 32
OFF_RECOVERIES = 40
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")

SLOT = struct.Struct("<II")  # entry offset within page, last-access tick (see tick())
SLOT_EMPTY = 0
SLOT_TOMB = 1

# expire_at (0.0 = never), hash, value length, key length, flags, dead, crc32
ENTRY = struct.Struct("<dIIHBBI")
ENTRY_SIZE = ENTRY.size  # 24
ENTRY_CRC_SPAN = 19  # header bytes covered by the crc: everything before `dead`
ENTRY_HEAD = struct.Struct("<dIIHB")  # the crc-covered part, for packing
OFF_DEAD = 19
FLAG_STR_KEY = 1

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


def file_size(page_size: int, num_pages: int) -> int:
    """Total size of a store file with this geometry."""
    return HEADER_SIZE + page_size * (num_pages + 1)


def page_offset(page_size: int, page: int) -> int:
    """File offset of ``page``; page -1 is the spare page."""
    return HEADER_SIZE + page_size * (page + 1)


def empty_page_header(slots: int) -> bytes:
    """A freshly initialised page header (seq 0, no entries)."""
    return PAGE_HDR.pack(0, 0, 0, data_start(slots), 0, 0, 0, 0).ljust(PAGE_HDR_SIZE, b"\0")


TICKS_PER_SECOND = 16
TICK_MASK = 0xFFFFFFFF


def tick(now: float) -> int:
    """The last-access clock: 1/16 s units, wrapping every 8.5 years; compare ages
    as ``(tick(now) - t) & TICK_MASK``."""
    return int(now * TICKS_PER_SECOND) & TICK_MASK
