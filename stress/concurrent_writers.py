#!/usr/bin/env python3
"""Concurrent writers: N processes x M threads on one MmapStore, a seeded mix of
set, get, delete and get_and_set over a shared keyspace.

Invariants checked at the end:
  * every value read (by get, or handed to a get_and_set callback) is one some
    writer wrote under that key (self-describing values with a crc32);
  * each counter incremented with get_and_set ends exactly at the sum of the
    increments every thread made to it;
  * no operation raised; every child exited 0 within the timeout;
  * store.check() == [].

    python stress/concurrent_writers.py --processes 4 --threads 4 --ops 25000 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import _common as C

from prefork_sessions import MmapStore

OPS = ("get", "set", "delete", "incr", "update")
WEIGHTS = (35, 25, 10, 20, 10)


def worker(store: MmapStore, proc: int, thread: int, ns: argparse.Namespace) -> dict[str, Any]:
    """One thread's seeded run; returns its counts, increments and problems."""
    rnd = random.Random(f"{ns.seed}:{proc}:{thread}")
    writer = proc * 1000 + thread
    counts: Counter[str] = Counter()
    increments = [0] * ns.counters
    bad: list[str] = []
    errors: list[str] = []
    seq = 0

    def replace(key: str) -> Any:
        def fn(old: Any) -> Any:
            if old is not None and (why := C.value_problem(key, old)):
                bad.append(f"get_and_set callback: {why}")
            return C.make_value(key, writer, seq, rnd.randrange(ns.max_pad))
        return fn

    for op in rnd.choices(OPS, WEIGHTS, k=ns.ops):
        seq += 1
        key = f"k:{rnd.randrange(ns.keys)}"
        try:
            if op == "get":
                value = store.get(key)
                counts["hits" if value is not None else "misses"] += 1
                if value is not None and (why := C.value_problem(key, value)):
                    bad.append(f"get: {why}")
            elif op == "set":
                store.set(key, C.make_value(key, writer, seq, rnd.randrange(ns.max_pad)))
            elif op == "delete":
                store.delete(key)
            elif op == "incr":
                c, step = rnd.randrange(ns.counters), rnd.randint(1, 5)
                store.get_and_set(f"ctr:{c}", lambda v, step=step: (v or 0) + step)
                increments[c] += step
            else:
                store.get_and_set(key, replace(key))
            counts[op] += 1
        except Exception as e:  # noqa: BLE001 - counted and reported: an invariant
            errors.append(f"{op} {key}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    return {"counts": dict(counts), "increments": increments, "bad": bad[:20], "nbad": len(bad),
            "errors": errors[:5], "nerrors": len(errors)}


def process(store: MmapStore, proc: int, ns: argparse.Namespace, out: Path) -> None:
    """A child: M threads; writes its merged result to ``out`` as JSON."""
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda t=t: results.append(worker(store, proc, t, ns)))
               for t in range(ns.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if len(results) != ns.threads:
        raise RuntimeError(f"only {len(results)} of {ns.threads} threads finished")
    out.write_text(json.dumps({"results": results, "elapsed": elapsed}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=4, help="writer processes [4]")
    p.add_argument("--threads", type=int, default=4, help="threads per process [4]")
    p.add_argument("--ops", type=int, default=25000, help="operations per thread [25000]")
    p.add_argument("--keys", type=int, default=300, help="shared data keys [300]")
    p.add_argument("--counters", type=int, default=8, help="get_and_set counters [8]")
    p.add_argument("--max-pad", type=int, default=800, help="largest value padding, bytes [800]")
    p.add_argument("--cache-size", type=int, default=1 << 20, help="store bytes [1 MiB]")
    p.add_argument("--page-size", type=int, default=8 << 10, help="page bytes [8 KiB]")
    C.add_common_args(p, timeout=300)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return C.run_in_tmp(parse_args(argv), "concurrent_writers", run)


def run(ns: argparse.Namespace, tmp: Path) -> int:
    store = MmapStore(tmp / "store", cache_size=ns.cache_size, page_size=ns.page_size)
    report = C.Report(
        f"concurrent_writers: {ns.processes} processes x {ns.threads} threads x {ns.ops} ops, "
        f"{ns.keys} keys + {ns.counters} counters, seed {ns.seed}, "
        f"{store.num_pages} pages of {store.page_size} B",
        ["process", "get hit", "get miss", "set", "delete", "incr", "update", "bad reads",
         "exceptions", "ops/s"],
    )
    start = time.perf_counter()
    # The store was opened before fork: each child inherits it and reopens lazily.
    pids = {C.fork(lambda i=i: process(store, i, ns, tmp / f"result-{i}.json")): i
            for i in range(ns.processes)}
    codes = C.wait(pids, timeout=max(1.0, ns.timeout - 10))
    wall = time.perf_counter() - start
    increments = [0] * ns.counters
    total: Counter[str] = Counter()
    problems: list[str] = []
    for pid, i in sorted(pids.items(), key=lambda kv: kv[1]):
        code = codes.get(pid)
        report.check(f"process {i} exited 0", code == 0,
                     "hung: killed after the timeout" if code is None else f"exit status {code}")
        path = tmp / f"result-{i}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        c: Counter[str] = Counter()
        for r in data["results"]:
            c.update(r["counts"])
            c["bad"] += r["nbad"]
            c["exceptions"] += r["nerrors"]
            problems += r["bad"] + r["errors"]
            increments = [a + b for a, b in zip(increments, r["increments"], strict=True)]
        ops = sum(c[k] for k in ("hits", "misses", "set", "delete", "incr", "update"))
        report.row(i, c["hits"], c["misses"], c["set"], c["delete"], c["incr"], c["update"],
                   c["bad"], c["exceptions"], round(ops / data["elapsed"]))
        total.update(c)
    ops = sum(total[k] for k in ("hits", "misses", "set", "delete", "incr", "update"))
    report.row("all", total["hits"], total["misses"], total["set"], total["delete"], total["incr"],
               total["update"], total["bad"], total["exceptions"], round(ops / wall))

    final_bad = [why for k in range(ns.keys)
                 if (v := store.get(f"k:{k}")) is not None and (why := C.value_problem(f"k:{k}", v))]
    counters = [store.get(f"ctr:{c}") or 0 for c in range(ns.counters)]
    problems_found = store.check()
    stats = store.stats()
    report.note(f"counters: {sum(counters):,} counted / {sum(increments):,} incremented; "
                f"store: entries {stats['entries']}, evictions {stats['evictions']}, "
                f"recovered_pages {stats['recovered_pages']}, bytes_used {stats['bytes_used']:,} "
                f"of {stats['capacity']:,}; wall {wall:.2f} s")
    if problems:
        report.note("first problems:\n  " + "\n  ".join(p.strip() for p in problems[:5]))
    report.check("every value read was written by some writer under its key",
                 total["bad"] == 0 and not final_bad,
                 f"{total['bad']} bad reads during the run, {len(final_bad)} at the end: "
                 f"{(problems[:1] or final_bad[:1])}")
    report.check("counters end at the sum of their increments", counters == increments,
                 "; ".join(f"ctr:{c} = {got} != {want}" for c, (got, want)
                           in enumerate(zip(counters, increments, strict=True)) if got != want))
    report.check("no operation raised", total["exceptions"] == 0,
                 f"{total['exceptions']} exceptions")
    report.check("store.check() == []", problems_found == [], "; ".join(problems_found[:5]))
    store.close()
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
