"""``export``, ``import`` and ``resize`` for the command line (``_cli``): moving
entries, bytes and lifetimes exactly (the export format is in ``_cli``'s docstring)."""

from __future__ import annotations

import argparse
import base64
import binascii
import math
import os
import re
import stat
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

from ._args import MAX_LIFETIME
from ._cli_util import NO, OK, PROG, CommandError, note, open_store, out
from ._errors import ValueTooLargeError
from ._file import remove_stale_temporaries, temporary_path
from ._store import DEFAULT_CACHE_SIZE, DEFAULT_PAGE_SIZE, MmapStore

__all__ = ["DEFAULT_WAIT", "byte_size", "cmd_export", "cmd_import", "cmd_resize", "decode", "encode"]

DEFAULT_WAIT = 2.0  # seconds resize waits for other processes to close the file (gunicorn stopping)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_USERINFO = re.compile(r"//[^@/]*@")
_FIELDS = {"key", "key_b64", "value", "value_b64", "ttl"}

Record = tuple[str | bytes, bytes, float]
"""(key, stored bytes, seconds left or math.inf)"""


def byte_size(text: str) -> int:
    """A size argument: a whole number of bytes, with an optional K, M, G or T (1024s)."""
    found = _SIZE.fullmatch(text)
    if not found or not int(found[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of bytes, e.g. 67108864 or 64M")
    return int(found[1]) * _UNITS[found[2].upper()]


class Progress:
    """``label done/total`` rewritten in place on stderr, only when it is a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.on = sys.stderr.isatty()
        self.label, self.total = label, total
        self._shown = -math.inf

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.on and now - self._shown >= 0.1:
            self._shown = now
            share = f" ({min(done / self.total, 1.0):.0%})" if self.total else ""
            sys.stderr.write(f"\r{self.label} {done:,}/{self.total:,}{share}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.on and self._shown > -math.inf:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# ---------------------------------------------------------------------- the export format


def encode(key: str | bytes, raw: bytes, ttl: float) -> bytes:
    """One export line (with its newline)."""
    line: dict[str, Any] = {}
    if isinstance(key, str):
        line["key"] = key
    else:
        line["key_b64"] = base64.b64encode(key).decode()
    try:
        line["value"] = raw.decode()
    except UnicodeDecodeError:
        line["value_b64"] = base64.b64encode(raw).decode()
    line["ttl"] = None if ttl == math.inf else ttl
    return orjson.dumps(line) + b"\n"


def _field(line: dict[str, Any], name: str, number: int) -> str | bytes:
    text, b64 = line.get(name), line.get(f"{name}_b64")
    if (text is None) == (b64 is None):
        raise _bad(number, f'give one of "{name}" (text) and "{name}_b64" (base64)')
    if text is not None:
        if not isinstance(text, str):
            raise _bad(number, f'"{name}" must be a string')
        return text
    if not isinstance(b64, str):
        raise _bad(number, f'"{name}_b64" must be a string')
    try:
        return base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise _bad(number, f'"{name}_b64" is not base64') from None


def decode(raw_line: bytes, number: int) -> Record:
    """(key, value bytes, seconds left or math.inf) from one export line; CommandError if bad."""
    try:
        line = orjson.loads(raw_line)
    except orjson.JSONDecodeError as e:
        raise _bad(number, f"not JSON ({e})") from None
    if not isinstance(line, dict):
        raise _bad(number, "not a JSON object")
    unknown = set(line) - _FIELDS
    if unknown:
        raise _bad(number, f"unknown field {min(unknown)!r} (known: {', '.join(sorted(_FIELDS))})")
    key = _field(line, "key", number)
    value = _field(line, "value", number)
    ttl = line.get("ttl")
    if ttl is None:
        ttl = math.inf
    elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl <= MAX_LIFETIME:
        raise _bad(number, f'"ttl" must be a number of seconds up to 100 years, or null for never, not {ttl!r}')
    return key, value.encode() if isinstance(value, str) else value, float(ttl)


def _bad(number: int, what: str) -> CommandError:
    return CommandError(f"line {number} of the input: {what}; nothing was imported")


def _lifetime(ttl: float) -> float:
    """A record's ttl as the stores' ``expire`` (0: never)."""
    return 0 if ttl == math.inf else ttl


# ---------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    write = sys.stdout.buffer.write
    n = 0
    with open_store(args.path) as store:
        progress = Progress("exporting", store.stats()["entries"])
        for key, raw, ttl in store.items():
            if ttl > 0:  # 0: it expired since its page was read
                write(encode(key, raw, ttl))
                n += 1
                progress.update(n)
        progress.done()
    sys.stdout.buffer.flush()
    note(f"exported {n:,} {'entry' if n == 1 else 'entries'} from {args.path}")
    return OK


# ---------------------------------------------------------------------- import


def _read(stream: Iterable[bytes]) -> list[Record]:
    """Every record of the input, all checked before anything is written."""
    return [decode(line, number) for number, line in enumerate(stream, 1) if line.strip()]


def _target(args: argparse.Namespace) -> tuple[Any, str]:
    """The store to import into, and how to name it."""
    if args.redis_url is not None:
        if args.path is not None:
            raise CommandError("give a store file PATH or --redis-url URL, not both")
        if args.cache_size or args.page_size:
            raise CommandError("--cache-size and --page-size are for a store file, not --redis-url")
        from ._redis import DEFAULT_PREFIX, RedisStore

        prefix = DEFAULT_PREFIX if args.prefix is None else args.prefix
        return RedisStore(args.redis_url, serializer="raw", prefix=prefix), _USERINFO.sub("//", args.redis_url)
    if args.path is None:
        raise CommandError("give a store file PATH, or --redis-url URL to import into Redis")
    if args.prefix is not None:
        raise CommandError("--prefix is for --redis-url; a store file has no key prefix")
    if os.path.lexists(args.path):
        if args.cache_size or args.page_size:
            raise CommandError(f"{args.path} exists: --cache-size and --page-size apply only to a file import "
                               f"creates (`{PROG} resize` changes an existing file's size)")
        return open_store(args.path), args.path
    store = MmapStore(args.path, serializer="raw", cache_size=args.cache_size or DEFAULT_CACHE_SIZE,
                      page_size=args.page_size or DEFAULT_PAGE_SIZE)
    note(f"created {args.path}: {store.num_pages:,} pages of {store.page_size:,} bytes")
    return store, args.path


def cmd_import(args: argparse.Namespace) -> int:
    records = _read(sys.stdin.buffer)
    store, where = _target(args)
    written = expired = kept = 0
    too_large: list[str] = []
    with store:
        evictions = store.stats()["evictions"] if isinstance(store, MmapStore) else 0
        progress = Progress("importing", len(records))
        for done, (key, raw, ttl) in enumerate(records, 1):
            if ttl <= 0:
                expired += 1
                continue
            try:
                if args.no_overwrite:
                    if store.add(key, raw, expire=_lifetime(ttl)):
                        written += 1
                    else:
                        kept += 1
                else:
                    store.set(key, raw, expire=_lifetime(ttl))
                    written += 1
            except ValueTooLargeError as e:
                too_large.append(f"line {done}: {e}")
            progress.update(done)
        progress.done()
        evicted = store.stats()["evictions"] - evictions if isinstance(store, MmapStore) else 0
    for line in too_large:
        note(line)
    summary = [f"imported {written:,} {'entry' if written == 1 else 'entries'} into {where}"]
    if expired:
        summary.append(f"{expired:,} skipped (expired)")
    if kept:
        summary.append(f"{kept:,} skipped (the key exists; --no-overwrite)")
    if too_large:
        summary.append(f"{len(too_large):,} too large for a page (listed above)")
    if evicted:
        summary.append(f"{evicted:,} live entries evicted for room: the file is too small (`{PROG} resize`)")
    out("; ".join(summary))
    return NO if too_large or evicted else OK


# ---------------------------------------------------------------------- resize


def cmd_resize(args: argparse.Namespace) -> int:
    if not 0 < args.wait <= 86400:
        raise CommandError(f"--wait {args.wait:g}: give a positive number of seconds up to one day")
    path = args.path
    with open_store(path, exclusive=True, lock_timeout=args.wait) as old:
        page_size = old.page_size
        pages = args.cache_size // page_size
        if pages < 1:
            raise CommandError(f"--cache-size {args.cache_size}: the file's pages are {page_size:,} bytes; "
                               "give at least one page")
        if pages == old.num_pages:
            out(f"{path} already has {pages:,} pages of {page_size:,} bytes; nothing to do")
            return OK
        remove_stale_temporaries(path)
        tmp = temporary_path(path)
        try:
            copied = _copy(old, tmp, pages, page_size)
            _install(path, tmp)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        was = old.num_pages
    out(f"resized {path}: {was:,} -> {pages:,} pages of {page_size:,} bytes "
        f"({was * page_size:,} -> {pages * page_size:,} bytes), {copied:,} "
        f"{'entry' if copied == 1 else 'entries'} copied; counters start again from 0")
    return OK


def _copy(old: MmapStore, tmp: str, pages: int, page_size: int) -> int:
    """Copy every live entry of ``old`` into a new store file at ``tmp``; its count.
    Refuses (CommandError) when they do not all fit."""
    with MmapStore(tmp, serializer="raw", cache_size=pages * page_size, page_size=page_size) as new:
        progress = Progress("copying", old.stats()["entries"])
        copied = 0
        for key, raw, ttl in old.items():
            if ttl > 0:
                new.set(key, raw, expire=_lifetime(ttl))
                copied += 1
                progress.update(copied)
        progress.done()
        st = new.stats()
    if st["evictions"] or st["entries"] != copied:
        lost = max(st["evictions"], copied - st["entries"])
        need = math.ceil(old.stats()["bytes_used"] / 0.7 / page_size) * page_size
        raise CommandError(
            f"the {copied:,} live entries of {old.path} do not fit in {pages:,} pages of {page_size:,} bytes: "
            f"copying them evicted {lost:,}; the file was left as it was. Give a larger --cache-size "
            f"(at least about {need:,} bytes)", NO)
    return copied


def _install(path: str, tmp: str) -> None:
    """Give ``tmp`` the old file's mode and group, make it durable, and rename it over ``path``."""
    st = os.stat(path, follow_symlinks=False)
    os.chmod(tmp, stat.S_IMODE(st.st_mode), follow_symlinks=False)
    if os.stat(tmp, follow_symlinks=False).st_gid != st.st_gid:
        try:
            os.chown(tmp, -1, st.st_gid, follow_symlinks=False)
        except PermissionError:
            note(f"{PROG}: warning: the new {path} keeps group {os.getegid()}: this user may not give it "
                 f"the old file's group {st.st_gid}")
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

