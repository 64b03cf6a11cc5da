"""A writer SIGKILLed before each line the store runs, in every operation, on both pagers.

Each scenario builds a store, snapshots its file, and learns the state the
operation leaves when it completes.  Then, for n = 1, 2, ... it restores the
snapshot and runs the operation in a forked child that kills itself just before
the n-th line executed in the store's own modules, until the operation runs to
the end.  After every kill, each key must read as it was before the operation or
as the operation leaves it (for an operation on one page: the whole page one way
or the other), and ``check()`` must find nothing wrong.  A kill inside a single
line (one store to the mapping) cannot be placed this way; the file format makes
each such store a whole field (see ``_layout``), and stress/crash.py kills at
random instants on top of this.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import prefork_sessions
from prefork_sessions import MmapStore
from prefork_sessions import _layout as L

PACKAGE = Path(prefork_sessions.__file__).parent
TRACED = {str(PACKAGE / name) for name in ("_store.py", "_pager.py", "_layout.py")}
PAGE = 4096  # 16 slots (12 usable), 3,904 bytes of entries: a page fills with a dozen values
VALUE = 300
PER_LINE = 3
Make = Callable[..., MmapStore]


def run_killed_at(n: int, op: Callable[[], object], record: Path | None = None) -> bool:
    """Run ``op`` in a child that SIGKILLs itself before the n-th line it executes in
    the store's modules.  True if the kill landed, False if ``op`` finished first.
    ``record``: write the child's traced lines there, one "file:line" each."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            count = 0
            seen: list[str] = []

            def line(frame: FrameType, event: str, arg: Any) -> Any:
                nonlocal count
                if event == "line":
                    count += 1
                    if count == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if record is not None:
                        seen.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                return line

            def call(frame: FrameType, event: str, arg: Any) -> Any:
                return line if frame.f_code.co_filename in TRACED else None

            sys.settrace(call)
            op()
            sys.settrace(None)
            if record is not None:
                record.write_text("\n".join(seen))
            code = 0
        finally:
            os._exit(code)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.waitstatus_to_exitcode(status) == 0, "the operation failed without being killed"
    return False


def kill_points(lines: list[str]) -> list[int]:
    """The line numbers (1-based positions in the run) to kill before: every line the
    first PER_LINE times it runs.  Later turns of a loop repeat what earlier turns
    showed, and the run is deterministic from the snapshot."""
    seen: dict[str, int] = {}
    points = []
    for i, where in enumerate(lines):
        seen[where] = seen.get(where, 0) + 1
        if seen[where] <= PER_LINE:
            points.append(i + 1)
    return points


@dataclass
class Scenario:
    pages: int
    setup: Callable[[MmapStore], None]
    op: Callable[[MmapStore], object]
    atomic: bool  # the operation changes one page: all of its effect or none of it


def _fill(store: MmapStore, n: int, prefix: str = "k") -> None:
    for i in range(n):
        store.set(f"{prefix}{i}", bytes([65 + i % 26]) * VALUE)


def _churn(store: MmapStore) -> None:
    """Dead bytes: overwrite some keys so the page must compact for the next big write."""
    _fill(store, 6)
    for i in range(3):
        store.set(f"k{i}", bytes([97 + i]) * VALUE)


def _expiring(store: MmapStore) -> None:
    for i in range(12):
        store.set(f"k{i}", b"v" * 100, expire=0.01 if i % 2 else 0)
    time.sleep(0.05)


def _append_dead_writer(store: MmapStore) -> None:
    """Leave page 0 as a writer killed mid-change leaves it: seq odd."""
    _fill(store, 8)
    with open(store.path, "r+b") as f:
        po = L.page_offset(PAGE, 0)
        f.seek(po + L.OFF_SEQ)
        seq = L.SEQ.unpack(f.read(8))[0]
        f.seek(po + L.OFF_SEQ)
        f.write(L.SEQ.pack(seq | 1))


SCENARIOS = {
    "insert": Scenario(1, lambda s: _fill(s, 4), lambda s: s.set("new", b"N" * VALUE), True),
    "overwrite": Scenario(1, lambda s: _fill(s, 4), lambda s: s.set("k1", b"N" * VALUE), True),
    "overwrite-compacts": Scenario(1, _churn, lambda s: s.set("k4", b"N" * 2000), True),
    "insert-evicts": Scenario(1, lambda s: _fill(s, 11), lambda s: s.set("new", b"N" * 1500), True),
    "grow-own-value-evicts": Scenario(1, lambda s: _fill(s, 11), lambda s: s.set("k3", b"N" * 2500), True),
    "get_and_set-evicts": Scenario(
        1, lambda s: _fill(s, 11), lambda s: s.get_and_set("k5", lambda v: (v or b"") * 5), True
    ),
    "delete": Scenario(1, lambda s: _fill(s, 6), lambda s: s.delete("k2"), True),
    "purge": Scenario(2, _expiring, lambda s: s.purge(), False),
    "clear": Scenario(3, lambda s: _fill(s, 20), lambda s: s.clear(), False),
    "repair": Scenario(1, _append_dead_writer, lambda s: s.set("k0", b"N" * VALUE), True),
    "check": Scenario(1, _append_dead_writer, lambda s: s.check(), True),
}


def _state(store: MmapStore) -> dict[str, Any]:
    names = [f"k{i}" for i in range(20)] + ["new"]
    return {k: store.get(k) for k in names}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kill_before_every_line_leaves_the_old_or_the_new_state(
    make_store: Make, pager_impl: str, name: str, tmp_path: Path
) -> None:
    sc = SCENARIOS[name]
    store = make_store(page_size=PAGE, cache_size=PAGE * sc.pages, serializer="raw")
    sc.setup(store)
    snapshot = Path(store.path).read_bytes()

    def restore() -> None:
        with open(store.path, "r+b") as f:
            f.write(snapshot)

    record = tmp_path / "lines"
    restore()
    assert not run_killed_at(0, lambda: sc.op(store), record)
    points = kill_points(record.read_text().split("\n"))
    after = _state(store)
    restore()
    before = _state(store)
    if name not in ("purge", "repair", "check"):  # these change no value a reader sees
        assert after != before, "the scenario changes nothing: it tests nothing"
    assert len(points) > 10, "the operation ran only a few traced lines: the test kills nowhere"
    for n in points:
        restore()
        assert run_killed_at(n, lambda: sc.op(store)), f"line {n} never ran: the run is not repeatable"
        now = _state(store)
        if sc.atomic:
            assert now in (before, after), f"killed before line {n}: {_diff(now, before, after)}"
        else:
            for k, v in now.items():
                assert v in (before[k], after[k]), f"killed before line {n}: {k} = {v!r:.40}"
        assert store.check() == [], f"killed before line {n}"
    restore()
    assert not run_killed_at(0, lambda: sc.op(store))
    assert _state(store) == after


def _diff(now: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> str:
    bad = {k: v for k, v in now.items() if v != before[k] and v != after[k]}
    mixed = {k: ("before" if v == before[k] else "after") for k, v in now.items() if before[k] != after[k]}
    return f"neither state: {bad!r:.200}; a mix of both: {mixed}"
