"""What every stress program shares: seeded self-describing values, forked children
that are always reaped (or killed), a hard timeout, the invariant report and the table.

A program builds a :class:`Report`, adds rows and checks, and returns
``report.finish()`` as its exit status: 0 when every invariant held, 1 when one
broke (each broken one is printed as ``FAIL <name>: <why>``).  A hang is caught
by :func:`hard_timeout`, which kills every child it knows of and exits 3.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(REPO / "tests")):  # the package from this checkout; tests/_live.py
    if _p not in sys.path:
        sys.path.insert(1, _p)

TIMEOUT_EXIT = 3
_NUMBER = re.compile(r"[-+]?[\d,]+(\.\d+)?[x%]?")
_children: set[int] = set()


# --------------------------------------------------------------------------- values


def make_value(key: str, writer: int, seq: int, pad: int) -> dict[str, Any]:
    """A value that says which key, writer and write it is, with a crc32 over all of it."""
    body = {"k": key, "w": writer, "n": seq, "pad": "x" * pad}
    body["crc"] = zlib.crc32(json.dumps(body, sort_keys=True).encode())
    return body


def value_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not one some writer wrote under ``key`` (None: it is)."""
    if not isinstance(value, dict) or set(value) != {"k", "w", "n", "pad", "crc"}:
        return f"{key}: not a stress value: {str(value)[:120]}"
    body = {k: v for k, v in value.items() if k != "crc"}
    if zlib.crc32(json.dumps(body, sort_keys=True).encode()) != value["crc"]:
        return f"{key}: checksum mismatch (w={value.get('w')} n={value.get('n')})"
    if value["k"] != key:
        return f"{key}: holds the value written for {value['k']!r}"
    return None


# --------------------------------------------------------------------------- processes


def fork(fn: Callable[[], Any]) -> int:
    """Run ``fn`` in a forked child (exit 0; 1 and a traceback on stderr if it raises)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        _children.clear()
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - the child reports and exits
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _children.add(pid)
    return pid


def wait(pids: Iterable[int], timeout: float) -> dict[int, int | None]:
    """Reap ``pids`` within ``timeout`` seconds: pid -> exit code, or None for a child
    that hung (it is SIGKILLed and reaped).  A negative code is the killing signal."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    codes: dict[int, int | None] = {}
    while left:
        for pid in list(left):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                left.discard(pid)
                _children.discard(pid)
        if not left:
            break
        if time.monotonic() > deadline:
            for pid in left:
                kill(pid)
                codes[pid] = None
            break
        time.sleep(0.01)
    return codes


def kill(pid: int) -> None:
    """SIGKILL and reap one child of ours."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    _children.discard(pid)


def hard_timeout(seconds: float, what: str, cleanup: Callable[[], None] | None = None) -> None:
    """After ``seconds``, print why, kill every child, run ``cleanup`` and exit 3."""

    def expired(_signum: int, _frame: Any) -> None:
        print(f"TIMEOUT: {what} still running after {seconds:g} s (a hang is a failure)",
              file=sys.stderr, flush=True)
        for pid in list(_children):
            kill(pid)
        if cleanup is not None:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - exiting anyway
                traceback.print_exc()
        os._exit(TIMEOUT_EXIT)

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def run_in_tmp(ns: Any, name: str, run: Callable[[Any, Path], int]) -> int:
    """Arm the hard timeout, then ``run(ns, directory)`` in a fresh temporary directory
    (under ``--dir`` if given) that is removed afterwards."""
    hard_timeout(ns.timeout, name)
    with tempfile.TemporaryDirectory(prefix=f"stress-{name}-", dir=ns.dir) as tmp:
        return run(ns, Path(tmp))


def add_common_args(parser: Any, *, seed: int = 1, timeout: float = 300) -> None:
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed [{seed}]")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"hard limit in seconds; a run still going is killed and fails [{timeout:g}]")
    parser.add_argument("--dir", default=None,
                        help="work directory for the store files [a new temporary directory]")


# --------------------------------------------------------------------------- report


class Report:
    """The table a program prints and the invariants it checks."""

    def __init__(self, title: str, headers: Sequence[str]) -> None:
        self.title = title
        self.headers = list(headers)
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.checks: list[tuple[str, bool, str]] = []

    def row(self, *cells: Any) -> None:
        self.rows.append([_cell(c) for c in cells])

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, name: str, ok: bool, why: str = "") -> bool:
        """Record an invariant; checked again under the same name, it holds only if it always held."""
        for i, (n, was_ok, was_why) in enumerate(self.checks):
            if n == name:
                if was_ok and not ok:
                    self.checks[i] = (name, False, why)
                return bool(ok)
        self.checks.append((name, bool(ok), why))
        return bool(ok)

    def render(self) -> str:
        widths = [len(h) for h in self.headers]
        for r in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(
                c.rjust(w) if i and _NUMBER.fullmatch(c) else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        out = [self.title, "", line(self.headers), rule]
        out += [line(r) for r in self.rows]
        if self.notes:
            out += [""] + self.notes
        out.append("")
        for name, ok, why in self.checks:
            out.append(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {why}" if why and not ok else ""))
        return "\n".join(out)

    def finish(self) -> int:
        print(self.render(), flush=True)
        failed = [name for name, ok, _ in self.checks if not ok]
        if failed:
            print(f"\nINVARIANT BROKEN: {', '.join(failed)}", file=sys.stderr, flush=True)
            return 1
        print(f"\nall {len(self.checks)} invariants held", flush=True)
        return 0


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:,.2f}"
    if isinstance(c, int) and not isinstance(c, bool):
        return f"{c:,}"
    return str(c)
