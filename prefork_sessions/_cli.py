"""The ``prefork-sessions`` command line (also ``python -m prefork_sessions``): look
inside a store file, repair it, resize it and move its entries, without Python.

Subcommands (``prefork-sessions SUBCOMMAND --help`` for each)::

    stats PATH [--json | --prometheus]   counters, fill, geometry; expired entries not yet purged
    keys PATH [--prefix P] [--hex]       live keys, one a line
    get PATH KEY [--hex] [--raw | --unpickle]
    delete PATH KEY [--hex]
    purge PATH                           remove expired entries
    check PATH [--json]                  exit 0 when sound, else the problems and exit 1; repairs nothing
    repair PATH [--json]                 repair what check finds, and say what was lost
    inspect PATH [--json] [--ascii]      a picture of every page's fill and age
    resize PATH --cache-size N [--wait S]
    export PATH > FILE                   JSON lines: key, value, remaining lifetime
    import [PATH] [--redis-url URL] [--prefix P] [--no-overwrite] < FILE

Decisions
=========
Opening.  Every subcommand but ``import`` opens only a file that exists
(``MmapStore(create=False)``): a mistyped path is an error, never a new file.
Files are opened as the store opens them (no symlinks, owner only, header and
size checked); a file that cannot be used is one line on stderr and exit 2.

Serializer.  The file does not record which serializer wrote it (a session file
holds JSON, a cache file pickles), so every subcommand opens it with
``serializer="raw"`` and carries the stored bytes exactly: ``export``, ``import``
and ``resize`` never decode a value.  ``get`` shows a value decoded where its
bytes are JSON, as text where they are UTF-8, and says what they are otherwise;
a pickle is named and not unpickled (unpickling runs code the bytes choose)
unless ``--unpickle`` says every writer of the file is trusted.

Export format.  One JSON object a line: ``{"key": ..., "value": ..., "ttl": ...}``.
A key stored as bytes is ``"key_b64"`` (base64) instead, so it comes back as
bytes; a value that is not UTF-8 text is ``"value_b64"``.  ``ttl`` is the
remaining lifetime in seconds at the moment of export, ``null`` for never; an
import gives each entry that lifetime from the moment it is written, so keys,
bytes and lifetimes arrive exactly as they left (the time between the two runs
is not subtracted).  Import refuses a whole input with one bad line (nothing
written), skips entries whose ``ttl`` is 0 or less (expired), and overwrites
existing keys unless ``--no-overwrite``.  Into Redis it writes through
``RedisStore(url, serializer="raw", prefix=...)``, raw bytes under the prefix.

Live files.  Every subcommand works while application processes use the file:
reads are lock-free or take one page lock at a time, as the store itself does,
and ``check`` takes each page's lock to read it (a page a dead writer left
mid-change is repaired on the way, as any locker repairs it; damage is only
reported).  ``resize`` is the exception: it refuses while any other process has
the file open.  Every open store holds the file's open lock (a shared ``flock``,
``_file``) and ``resize`` takes it exclusively, so it cannot start while a
worker, or a gunicorn master that loaded the app (``preload_app``), has the file
open, and a process that opens the file while it copies waits for it and then
opens the new file.  So no write can be lost: stop the application (master and
workers), resize, start it again.  The new file is built in the same directory
(mode and group of the old one), synced, and renamed over the old path.

Output.  Results on stdout, one summary or error line on stderr; progress for
``resize``, ``export`` and ``import`` only when stderr is a terminal.  Exit
status: 0 done; 1 the answer is no (``check`` found problems, ``get`` or
``delete`` found no such key, an import left entries out); 2 usage or a file
that cannot be used; 130 interrupted.
"""

from __future__ import annotations

import argparse
import binascii
import os
import pickle
import sys
from collections.abc import Callable, Sequence

import orjson

from . import _cli_move, _cli_show
from ._cli_util import (
    FAILED,
    INTERRUPTED,
    NO,
    OK,
    PROG,
    CommandError,
    key_arg,
    open_store,
    out,
    shown_key,
)
from ._errors import SessionStoreError

__all__ = ["main"]


# ---------------------------------------------------------------------- subcommands


def cmd_keys(args: argparse.Namespace) -> int:
    prefix = key_arg(args.prefix, args.hex) if args.prefix is not None else b""
    with open_store(args.path) as store:
        for key in store:
            kb = key.encode() if isinstance(key, str) else key
            if kb.startswith(prefix):
                out(kb.hex() if args.hex else shown_key(key))
    return OK


def _pickle_protocol(raw: bytes) -> int | None:
    """The pickle protocol ``raw`` announces (2 to 5, ending with STOP), or None."""
    if len(raw) >= 3 and raw[0] == 0x80 and 2 <= raw[1] <= pickle.HIGHEST_PROTOCOL and raw.endswith(b"."):
        return raw[1]
    return None


def describe(raw: bytes, unpickle: bool) -> str:
    """How ``get`` shows a stored value (module docstring, Serializer)."""
    try:
        return orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        pass
    protocol = _pickle_protocol(raw)
    if protocol is not None:
        if unpickle:
            try:
                return repr(pickle.loads(raw))  # asked for with --unpickle
            except Exception as e:  # noqa: BLE001 - any failure of the pickled code is reported
                raise CommandError(f"the value is a pickle that does not unpickle here: {type(e).__name__}: {e}",
                                   NO) from None
        return (f"<a pickle of {len(raw)} bytes, protocol {protocol}; not unpickled, since unpickling runs "
                "code the bytes choose: pass --unpickle if you trust every process that writes this file, "
                "or --raw for the bytes>")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        head = binascii.hexlify(raw[:64], " ").decode()
        return f"<{len(raw)} bytes, not text; --raw writes them as they are; the first {min(len(raw), 64)}: {head}>"


def cmd_get(args: argparse.Namespace) -> int:
    kb = key_arg(args.key, args.hex)
    with open_store(args.path) as store:
        raw = store.get(kb)
    if raw is None:
        raise CommandError(f"no live entry for key {shown_key(kb)} in {args.path}", NO)
    if args.raw:
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
    else:
        out(describe(raw, args.unpickle))
    return OK


def cmd_delete(args: argparse.Namespace) -> int:
    kb = key_arg(args.key, args.hex)
    with open_store(args.path) as store:
        if not store.delete(kb):
            raise CommandError(f"no live entry for key {shown_key(kb)} in {args.path}; nothing deleted",
                               NO)
    out(f"deleted {shown_key(kb)}")
    return OK


def cmd_purge(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        removed = store.purge()
    out(f"removed {removed} expired {'entry' if removed == 1 else 'entries'} from {args.path}")
    return OK


def cmd_check(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        problems = store.verify()
        pages = store.num_pages
    if args.json:
        out(orjson.dumps({"path": args.path, "sound": not problems, "problems": problems}).decode())
    elif problems:
        for problem in problems:
            out(problem)
        out(f"{len(problems)} {'problem' if len(problems) == 1 else 'problems'} in {args.path}; "
            f"`{PROG} repair {args.path}` repairs {'it' if len(problems) == 1 else 'them'}")
    else:
        out(f"{args.path}: sound ({pages} pages checked)")
    return NO if problems else OK


def cmd_repair(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        repaired = store.check()
    if args.json:
        out(orjson.dumps({"path": args.path, "repaired": repaired}).decode())
    elif repaired:
        for problem in repaired:
            out(problem)
        out(f"repaired {len(repaired)} {'problem' if len(repaired) == 1 else 'problems'} in {args.path}")
    else:
        out(f"{args.path}: sound, nothing to repair")
    return OK


# ---------------------------------------------------------------------- parsing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Look inside a prefork_sessions store file, repair it, resize it, move it.",
        epilog="Exit status: 0 done, 1 the answer is no (problems found, no such key, entries left out), "
               "2 usage or a file that cannot be used.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(run=run)
        if name != "import":
            p.add_argument("path", metavar="PATH", help="the store file")
        return p

    p = command("stats", _cli_show.cmd_stats, "entries, bytes used and capacity, evictions, expirations, "
                "recovered pages, geometry; expired entries not yet purged")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON object")
    form.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")

    p = command("keys", cmd_keys, "the live keys, one a line (keys that are not printable text as their repr)")
    p.add_argument("--prefix", metavar="P", help="only keys starting with P")
    p.add_argument("--hex", action="store_true", help="keys (and P) in hexadecimal")

    for name, run, text in (("get", cmd_get, "show the value of KEY"), ("delete", cmd_delete, "delete KEY")):
        p = command(name, run, text)
        p.add_argument("key", metavar="KEY")
        p.add_argument("--hex", action="store_true", help="KEY is the key's bytes in hexadecimal")
    p = sub.choices["get"]
    show = p.add_mutually_exclusive_group()
    show.add_argument("--raw", action="store_true", help="write the stored bytes as they are")
    show.add_argument("--unpickle", action="store_true",
                      help="unpickle a pickled value (only for a file whose every writer you trust)")

    command("purge", cmd_purge, "remove expired entries")
    p = command("check", cmd_check, "verify every page; exit 0 when sound, else list the problems and exit 1 "
                "(repairs nothing)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = command("repair", cmd_repair, "repair what check finds, and say what was lost")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = command("inspect", _cli_show.cmd_inspect, "a picture of every page's fill and age")
    p.add_argument("--json", action="store_true", help="every page as JSON instead")
    p.add_argument("--ascii", action="store_true", help="ASCII characters only")

    p = command("resize", _cli_move.cmd_resize, "copy every live entry into a new file of another size and "
                "replace the old one atomically; refuses while any other process has the file open")
    p.add_argument("--cache-size", required=True, metavar="N", type=_cli_move.byte_size,
                   help="bytes of pages in the new file (a suffix K, M or G multiplies by 1024s)")
    p.add_argument("--wait", type=float, default=_cli_move.DEFAULT_WAIT, metavar="S",
                   help=f"seconds to wait for other processes to close the file (default {_cli_move.DEFAULT_WAIT:g})")

    command("export", _cli_move.cmd_export, "every live entry as JSON lines on stdout: key, value, ttl")

    p = command("import", _cli_move.cmd_import, "entries from JSON lines on stdin (as export writes them) into "
                "a store file, created if missing, or into Redis")
    p.add_argument("path", metavar="PATH", nargs="?", help="the store file (not with --redis-url)")
    p.add_argument("--redis-url", metavar="URL", help="import into Redis at URL instead")
    p.add_argument("--prefix", metavar="P", help="Redis key prefix (default: RedisStore's)")
    p.add_argument("--no-overwrite", action="store_true", help="keep keys that exist already")
    p.add_argument("--cache-size", metavar="N", type=_cli_move.byte_size,
                   help="size of a file that import creates (default 64M)")
    p.add_argument("--page-size", metavar="N", type=_cli_move.byte_size,
                   help="page size of a file that import creates (default 64K)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (module docstring)."""
    for stream in (sys.stdout, sys.stderr):  # paths and keys that are not UTF-8 print escaped, never raise
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
        sys.stdout.flush()
        return status
    except CommandError as e:
        _fail(str(e))
        return e.status
    except (SessionStoreError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `... | head`: the reader has what it wanted
            _quiet_stdout()
            return NO
        _fail(_one_line(e))
        return FAILED
    except KeyboardInterrupt:
        _fail("interrupted")
        return INTERRUPTED


def _one_line(e: BaseException) -> str:
    """An error as one line: our errors' messages, or an OS error with what it concerns."""
    if isinstance(e, SessionStoreError) or not isinstance(e, OSError) or e.strerror is None:
        text = str(e)
    else:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(text.split())


def _fail(message: str) -> None:
    try:
        print(f"{PROG}: {message}", file=sys.stderr)
    except OSError:
        pass


def _quiet_stdout() -> None:
    """After a broken pipe: send what Python still flushes at exit nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
