"""``stats`` (text, JSON, Prometheus) and ``inspect`` (the picture of the pages)
for the command line (``_cli``)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
from typing import Any

import orjson

from ._cli_util import OK, PROG, open_store, out
from ._store import MmapStore, PageInfo

# ---------------------------------------------------------------------- stats


def gather(store: MmapStore) -> dict[str, Any]:
    """The file's counters and geometry, and its expired entries not yet purged
    (each page read under its lock for those)."""
    st = store.stats()
    expired = sum(p.expired for p in store.pages())
    return {
        "path": os.path.abspath(store.path),
        "entries": st["entries"],
        "expired": expired,
        "bytes_used": st["bytes_used"],
        "capacity": st["capacity"],
        "evictions": st["evictions"],
        "expirations": st["expirations"],
        "recovered_pages": st["recovered_pages"],
        "pages": st["pages"],
        "page_size": st["page_size"],
        "cache_size": store.cache_size,
        "max_value_size": st["max_value_size"],
    }


# (metric name, type, the gather() field, help text): names follow Prometheus's
# conventions (base units, _total for counters).
METRICS = (
    ("entries", "gauge", "entries", "Entries in the store file, expired ones not yet purged included."),
    ("expired_entries", "gauge", "expired", "Entries past their expiry, not yet purged."),
    ("used_bytes", "gauge", "bytes_used", "Bytes the entries fill (headers, keys, values)."),
    ("capacity_bytes", "gauge", "capacity", "Bytes the entries may fill: every page's data area."),
    ("evictions_total", "counter", "evictions",
     "Unexpired entries dropped to make room since the file was created; if it grows, the file is too small."),
    ("expirations_total", "counter", "expirations", "Expired entries removed since the file was created."),
    ("recovered_pages_total", "counter", "recovered_pages",
     "Pages repaired after a writer died mid-change, or after damage, since the file was created."),
    ("pages", "gauge", "pages", "Pages in the file."),
    ("page_size_bytes", "gauge", "page_size", "Bytes per page."),
)
METRIC_PREFIX = "prefork_sessions_"


def _label_value(text: str) -> str:
    """A label value escaped as the text exposition format wants (backslash, quote, newline)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(found: dict[str, Any]) -> str:
    """``found`` (``gather``) in the Prometheus text exposition format, labelled with the path."""
    label = f'{{path="{_label_value(found["path"])}"}}'
    lines = []
    for name, kind, field, text in METRICS:
        lines.append(f"# HELP {METRIC_PREFIX}{name} {text}")
        lines.append(f"# TYPE {METRIC_PREFIX}{name} {kind}")
        lines.append(f"{METRIC_PREFIX}{name}{label} {found[field]}")
    return "\n".join(lines)


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


def stats_text(found: dict[str, Any]) -> str:
    share = found["bytes_used"] / found["capacity"] if found["capacity"] else 0.0
    expired = found["expired"]
    return "\n".join((
        found["path"],
        f"  entries          {found['entries']:,}"
        + (f", {expired:,} of them expired and not yet purged (`{PROG} purge` removes them)" if expired else
           ", none expired"),
        f"  bytes used       {found['bytes_used']:,} of {found['capacity']:,} ({share:.1%})",
        f"  evictions        {found['evictions']:,} unexpired entries dropped for room"
        + (f" (the file is too small: `{PROG} resize`)" if found["evictions"] else ""),
        f"  expirations      {found['expirations']:,} expired entries removed",
        f"  recovered pages  {found['recovered_pages']:,} repaired after a writer died mid-change or damage",
        (f"  geometry         {found['pages']:,} pages of {found['page_size']:,} bytes "
        f"(cache size {_bytes(found['cache_size'])}), largest value {found['max_value_size']:,} bytes"),
    ))


def cmd_stats(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        found = gather(store)
    if args.json:
        out(orjson.dumps(found).decode())
    elif args.prometheus:
        out(prometheus(found))
    else:
        out(stats_text(found))
    return OK


# ---------------------------------------------------------------------- inspect

MAX_ROWS = 16
MAX_COLUMNS = 64
FILL_CHARS = "▁▂▃▄▅▆▇█"  # eighths of the data area used
FILL_ASCII = "12345678"
EMPTY, EMPTY_ASCII, DAMAGED = "·", ".", "!"
# (idle seconds below which, character, name): the idle time of a page's least
# recently used entry, the one its next eviction drops first
AGES = ((60.0, "s", "< 1 min"), (3600.0, "m", "< 1 hour"), (86400.0, "h", "< 1 day"),
        (7 * 86400.0, "d", "< 1 week"), (math.inf, "w", ">= 1 week"))


class _Cell:
    """One character of the picture: a run of consecutive pages."""

    def __init__(self, pages: list[PageInfo]) -> None:
        self.first = pages[0].page
        self.entries = sum(p.entries for p in pages)
        capacity = sum(p.capacity for p in pages)
        self.fill = sum(p.bytes_used for p in pages) / capacity if capacity else 0.0
        self.damaged = any(p.problems for p in pages)
        idle = [p.lru_idle for p in pages if p.lru_idle is not None]
        self.idle = max(idle) if idle else None

    def fill_char(self, ascii_only: bool) -> str:
        if self.damaged:
            return DAMAGED
        if not self.entries:
            return EMPTY_ASCII if ascii_only else EMPTY
        ramp = FILL_ASCII if ascii_only else FILL_CHARS
        return ramp[min(len(ramp) - 1, int(self.fill * len(ramp)))]

    def age_char(self, ascii_only: bool) -> str:
        if self.idle is None:
            return EMPTY_ASCII if ascii_only else EMPTY
        return next(char for limit, char, _ in AGES if self.idle < limit)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def picture(path: str, page_size: int, pages: list[PageInfo], ascii_only: bool, columns: int) -> str:
    """The ``inspect`` picture: a summary, then a map of every page's fill and one of
    its age, one character a page (a run of pages when there are too many)."""
    n = len(pages)
    width = max(16, min(MAX_COLUMNS, columns - 10))
    per = max(1, math.ceil(n / (width * MAX_ROWS)))  # pages a character stands for
    cells = [_Cell(pages[i:i + per]) for i in range(0, n, per)]
    entries = sum(p.entries for p in pages)
    expired = sum(p.expired for p in pages)
    used, capacity = sum(p.bytes_used for p in pages), sum(p.capacity for p in pages)
    fills = [p.bytes_used / p.capacity for p in pages]
    full = sum(1 for f in fills if f > 0.9)
    damaged = [p.page for p in pages if p.problems]
    idle = sorted(p.lru_idle for p in pages if p.lru_idle is not None)
    lines = [
        (f"{path}: {_count(n, 'page', 'pages')} of {_bytes(page_size)}, {_count(entries, 'entry', 'entries')} "
        f"({expired:,} expired), {used / capacity:.1%} of capacity used"),
        (f"fill per page: least {min(fills):.0%}, median {statistics.median(fills):.0%}, most {max(fills):.0%}; "
        f"{_count(full, 'page', 'pages')} over 90% full (where evictions begin)"),
    ]
    if idle:
        lines.append(f"least recently used entry of each page, idle: newest {_duration(idle[0])}, "
                     f"median {_duration(statistics.median(idle))}, oldest {_duration(idle[-1])}")
    if damaged:
        shown = ", ".join(map(str, damaged[:20])) + (" ..." if len(damaged) > 20 else "")
        lines.append(f"damaged: {_count(len(damaged), 'page', 'pages')} ({shown}); `{PROG} check {path}` "
                     "says what is wrong")
    each = "one page" if per == 1 else f"{per} consecutive pages (their total fill, their oldest entry)"
    label = len(str(n - 1))

    def grid(char: Any) -> list[str]:
        return [f"  {cells[i].first:>{label}}  " + "".join(char(c, ascii_only) for c in cells[i:i + width])
                for i in range(0, len(cells), width)]

    ramp = FILL_ASCII if ascii_only else FILL_CHARS
    empty = EMPTY_ASCII if ascii_only else EMPTY
    lines += ["", f"fill, each character {each}:", *grid(_Cell.fill_char),
              f"  {empty} empty   {ramp[0]} up to 1/8 full ... {ramp[-1]} over 7/8 full   {DAMAGED} damaged"]
    lines += ["", f"idle time of the least recently used entry, each character {each}:", *grid(_Cell.age_char),
              f"  {empty} empty   " + "   ".join(f"{char} {name}" for _, char, name in AGES)]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        pages = store.pages()
        page_size, path = store.page_size, store.path
    if args.json:
        out(orjson.dumps({"path": os.path.abspath(path), "page_size": page_size,
                          "pages": [p._asdict() for p in pages]}).decode())
        return OK
    encoding = (getattr(sys.stdout, "encoding", None) or "ascii").lower().replace("-", "")
    columns = shutil.get_terminal_size((80, 24)).columns
    out(picture(path, page_size, pages, args.ascii or encoding != "utf8", columns))
    return OK
