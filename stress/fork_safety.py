#!/usr/bin/env python3
"""Fork safety: one MmapStore used across fork() in every way a prefork server can.

Scenarios (each its own keys, all on one file):
  inherited  the store opened before fork; children use it as inherited (the
             store notices the new pid and reopens lazily);
  reopened   children call reopen() first, or open their own MmapStore(path);
  held-lock  fork while another thread of the parent is inside get_and_set's
             callback (holding that page's locks), then fork again while threads
             hammer get_and_set; children increment the very counter being held;
  nested     children fork children that fork again (--depth levels, --fanout each).

In every scenario parent threads and child processes x threads increment
counters with get_and_set and write/read checksummed values.  Invariants: each
counter ends at exactly the number of increments made to it; every value read
is one a writer wrote under that key; every child exits 0 within
--child-timeout (a hang is killed and fails); store.check() == [].

    python stress/fork_safety.py --processes 4 --threads 3 --ops 4000 --seed 1
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import _common as C

from prefork_sessions import MmapStore

SCENARIOS = ("inherited", "reopened", "held-lock", "nested")


class Scenario:
    """Bookkeeping for one scenario: expected increments, reads checked, children."""

    def __init__(self, name: str, ns: argparse.Namespace) -> None:
        self.name, self.ns = name, ns
        self.expected: Counter[str] = Counter()
        self.bad: list[str] = []
        self.children: dict[int, str] = {}
        self.codes: dict[int, int | None] = {}

    def counter(self, wid: int, j: int) -> str:
        return f"{self.name}:ctr:{(wid + j) % self.ns.counters}"

    def expect(self, wid: int) -> None:
        """Record (in the parent) what worker ``wid`` will increment."""
        for j in range(self.ns.ops):
            self.expected[self.counter(wid, j)] += 1

    def expect_each(self, wids: list[int]) -> None:
        for wid in wids:
            self.expect(wid)

    def work(self, store: MmapStore, wid: int) -> None:
        """``ops`` increments, with a checksummed set and a verified get every few."""
        rnd = random.Random(f"{self.ns.seed}:{self.name}:{wid}")
        for j in range(self.ns.ops):
            store.get_and_set(self.counter(wid, j), lambda v: (v or 0) + 1)
            if j % 3 == 0:
                key = f"{self.name}:k:{rnd.randrange(self.ns.keys)}"
                store.set(key, C.make_value(key, wid, j, rnd.randrange(400)))
                key = f"{self.name}:k:{rnd.randrange(self.ns.keys)}"
                value = store.get(key)
                if value is not None and (why := C.value_problem(key, value)):
                    self.bad.append(why)
        if self.bad:
            raise AssertionError(f"worker {wid}: {len(self.bad)} bad reads, first: {self.bad[0]}")

    def threads(self, store: MmapStore, wids: list[int]) -> None:
        """Run ``work`` for each wid in its own thread; raise if any failed."""
        errors: list[BaseException] = []

        def run(wid: int) -> None:
            try:
                self.work(store, wid)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        ts = [threading.Thread(target=run, args=(w,)) for w in wids]
        for t in ts:
            t.start()
        for t in ts:
            t.join(self.ns.child_timeout)
        if any(t.is_alive() for t in ts):
            raise TimeoutError(f"{self.name}: a thread is still running after {self.ns.child_timeout} s")
        if errors:
            raise errors[0]

    def spawn(self, fn: Callable[[], None], label: str) -> int:
        pid = C.fork(fn)
        self.children[pid] = label
        return pid

    def reap(self) -> None:
        self.codes.update(C.wait(list(self.children), self.ns.child_timeout))


def child_wids(p: int, ns: argparse.Namespace) -> list[int]:
    return [1000 * (p + 1) + t for t in range(ns.threads)]


def parent_wids(ns: argparse.Namespace) -> list[int]:
    return list(range(ns.threads))


def inherited(store: MmapStore, path: Path, sc: Scenario) -> None:
    ns = sc.ns
    store.set(f"{sc.name}:seed", C.make_value(f"{sc.name}:seed", 0, 0, 10))  # touch before fork
    for p in range(ns.processes):
        sc.expect_each(child_wids(p, ns))
        sc.spawn(lambda p=p: sc.threads(store, child_wids(p, ns)), f"child {p}")
    sc.expect_each(parent_wids(ns))
    sc.threads(store, parent_wids(ns))
    sc.reap()


def reopened(store: MmapStore, path: Path, sc: Scenario) -> None:
    ns = sc.ns

    def child(p: int) -> None:
        if p % 2:
            own = MmapStore(path)  # a fresh open of the same file
            sc.threads(own, child_wids(p, ns))
            own.close()
        else:
            store.reopen()
            sc.threads(store, child_wids(p, ns))

    for p in range(ns.processes):
        sc.expect_each(child_wids(p, ns))
        sc.spawn(lambda p=p: child(p), f"child {p}")
    sc.expect_each(parent_wids(ns))
    sc.threads(store, parent_wids(ns))
    sc.reap()


def held_lock(store: MmapStore, path: Path, sc: Scenario) -> None:
    ns = sc.ns
    held_key = sc.counter(0, 0)
    # 1. A parent thread sits inside get_and_set's callback: it holds the page's
    #    thread lock and OFD lock at the moment of every fork below.
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        def slow(v: int | None) -> int:
            holding.set()
            release.wait(ns.child_timeout)
            return (v or 0) + 1
        store.get_and_set(held_key, slow)

    holder = threading.Thread(target=hold)
    holder.start()
    if not holding.wait(10):
        raise TimeoutError("the holder thread never entered get_and_set")
    sc.expected[held_key] += 1
    for p in range(ns.processes):
        sc.expect_each(child_wids(p, ns))  # each increments held_key too
        sc.spawn(lambda p=p: sc.threads(store, child_wids(p, ns)), f"child {p} (lock held)")
    time.sleep(0.2)  # the children are now blocked on the held page
    release.set()
    holder.join(ns.child_timeout)
    # 2. Fork repeatedly while parent threads hammer get_and_set (locks held at random).
    busy = parent_wids(ns)
    sc.expect_each(busy)
    hammer = threading.Thread(target=sc.threads, args=(store, busy))
    hammer.start()
    for p in range(ns.processes, 2 * ns.processes):
        sc.expect_each(child_wids(p, ns))
        sc.spawn(lambda p=p: sc.threads(store, child_wids(p, ns)), f"child {p} (busy parent)")
        time.sleep(0.01)
    hammer.join(ns.child_timeout)
    if hammer.is_alive():
        raise TimeoutError("parent threads still running")
    sc.reap()


def nested(store: MmapStore, path: Path, sc: Scenario) -> None:
    ns = sc.ns

    def node(wid: int, depth: int) -> None:
        pids = []
        if depth < ns.depth:
            pids = [C.fork(lambda k=k: node(wid * 10 + k, depth + 1)) for k in range(1, ns.fanout + 1)]
        sc.threads(store, [wid * 100 + t for t in range(ns.threads)])
        codes = C.wait(pids, ns.child_timeout)
        failed = {p: c for p, c in codes.items() if c != 0}
        if failed:
            raise RuntimeError(f"depth {depth + 1} children failed or hung: {failed}")

    def expect(wid: int, depth: int) -> int:
        sc.expect_each([wid * 100 + t for t in range(ns.threads)])
        if depth < ns.depth:
            return 1 + sum(expect(wid * 10 + k, depth + 1) for k in range(1, ns.fanout + 1))
        return 1

    nodes = 0
    for k in range(1, ns.fanout + 1):
        nodes += expect(k, 1)
        sc.spawn(lambda k=k: node(k, 1), f"tree {k}")
    sc.nodes = nodes  # type: ignore[attr-defined]
    sc.reap()


RUNNERS = {"inherited": inherited, "reopened": reopened, "held-lock": held_lock, "nested": nested}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=4, help="children forked per scenario [4]")
    p.add_argument("--threads", type=int, default=3, help="threads per process [3]")
    p.add_argument("--ops", type=int, default=4000, help="increments per thread [4000]")
    p.add_argument("--keys", type=int, default=50, help="checksummed data keys per scenario [50]")
    p.add_argument("--counters", type=int, default=4, help="counters per scenario [4]")
    p.add_argument("--depth", type=int, default=3, help="nested: levels of forking [3]")
    p.add_argument("--fanout", type=int, default=2, help="nested: children per process [2]")
    p.add_argument("--child-timeout", type=float, default=60,
                   help="seconds any child may take before it counts as hung [60]")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    C.add_common_args(p, timeout=300)
    ns = p.parse_args(argv)
    ns.scenarios = [s for s in ns.scenarios.split(",") if s]
    unknown = set(ns.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return ns


def main(argv: list[str] | None = None) -> int:
    return C.run_in_tmp(parse_args(argv), "fork_safety", run)


def run(ns: argparse.Namespace, tmp: Path) -> int:
    path = tmp / "store"
    store = MmapStore(path, cache_size=2 << 20, page_size=16 << 10, lock_timeout=ns.child_timeout)
    report = C.Report(
        f"fork_safety: {ns.processes} processes x {ns.threads} threads x {ns.ops} increments, "
        f"nested {ns.fanout}^{ns.depth}, seed {ns.seed}",
        ["scenario", "processes", "increments", "counted", "children ok", "hung", "seconds"],
    )
    for name in ns.scenarios:
        sc = Scenario(name, ns)
        start = time.perf_counter()
        error = ""
        try:
            RUNNERS[name](store, path, sc)
        except Exception as e:  # noqa: BLE001 - reported as a broken invariant
            error = f"{type(e).__name__}: {e}"
            sc.reap()
        seconds = time.perf_counter() - start
        counted = {k: store.get(k) or 0 for k in sc.expected}
        ok = sum(1 for c in sc.codes.values() if c == 0)
        hung = [sc.children[p] for p, c in sc.codes.items() if c is None]
        failed = {sc.children[p]: c for p, c in sc.codes.items() if c not in (0, None)}
        procs = getattr(sc, "nodes", len(sc.children))
        report.row(name, procs, sum(sc.expected.values()), sum(counted.values()),
                   f"{ok}/{len(sc.codes)}", len(hung), round(seconds, 2))
        report.check(f"{name}: parent side raised nothing", not error, error)
        report.check(f"{name}: no child hung", not hung, f"killed after {ns.child_timeout} s: {hung}")
        report.check(f"{name}: every child exited 0 (values it read verified)", not failed,
                     f"{failed} (tracebacks above on stderr)")
        report.check(f"{name}: counters exact", counted == dict(sc.expected),
                     "; ".join(f"{k} = {counted[k]} != {v}" for k, v in sc.expected.items()
                               if counted[k] != v))
        report.check(f"{name}: parent read only valid values", not sc.bad, "; ".join(sc.bad[:3]))
    problems = store.check()
    stats = store.stats()
    report.note(f"store: entries {stats['entries']}, recovered_pages {stats['recovered_pages']}, "
                f"evictions {stats['evictions']}")
    report.check("store.check() == []", problems == [], "; ".join(problems[:5]))
    store.close()
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
