#!/usr/bin/env python3
"""Benchmark the shared caches against the caches Django and cachelib users run today, in one run.

Two groups, each with its own table and ratios:

* Django: ``prefork_sessions.django.MmapCache`` against LocMemCache (per process:
  the ceiling, it shares nothing), FileBasedCache, ``diskcache.DjangoCache`` and
  Django's RedisCache;
* cachelib: ``prefork_sessions.cachelib.MmapCache`` against SimpleCache (per
  process), FileSystemCache and RedisCache.

Method (what makes the figures comparable):

* One value for every backend, pickled by each backend as it does itself: a ~1 KiB
  rendered HTML fragment (a str: what cached views and template fragments hold), or
  with ``--value dict`` a ~1 KiB dict of small objects, whose unpickling (~8 us
  here) then dominates every fast backend's get and narrows the ratios; ``--keys`` keys ("key:<n>"), default timeout
  300 s everywhere, and culling thresholds (MAX_ENTRIES, threshold) far above the
  key count, so no backend drops or re-creates entries while it is timed.
* Every file-backed cache lives in the same directory (``--dir``, default a new
  temporary directory) on one file system; Redis is a private redis-server on a
  free loopback port, no persistence, always stopped at the end.
* Each backend is measured in a freshly forked process per round, which builds its
  cache object from nothing (as a gunicorn worker would).  Rounds are interleaved
  (round 1 of every backend, then round 2 ...; the order rotates) and each figure
  is the median over the rounds.  The collector is off while timing.
* Figures, each run for ``--seconds``: get (every key, shuffled, all hits; a
  miss fails the run), set (overwrite of existing keys), incr (``--counters``
  counters in turn, one process), and incr by 4 processes: ``--procs`` forked
  processes incrementing ONE key, started together; aggregate ops/s = all
  increments / (last end - first start), and the final count is compared with
  the increments made.  Lost increments on a backend that claims atomic incr
  (ours, diskcache, Redis) fail the run; FileBasedCache and FileSystemCache
  read-modify-write and lose counts, which is reported.  LocMemCache and
  SimpleCache have nothing to share across processes: not measured there.

Targets (marked PASS/FAIL; ``--enforce-targets`` makes a miss exit 1): get at
least 0.7x LocMemCache and SimpleCache, and at least 5x FileBasedCache,
FileSystemCache and both Redis backends.

    python stress/bench_cache.py                       # one run, under a minute
    python stress/bench_cache.py --quick               # smoke run, a few seconds
    python stress/bench_cache.py --rounds 9 --seconds 0.5 --enforce-targets
    python stress/bench_cache.py --only mmap,locmem,simple --json

Exit status: 0, or 1 when a backend failed, a get missed or an atomic counter lost
counts (or a target was missed under --enforce-targets), 3 on --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import _common  # noqa: F401  # puts this checkout's package first on sys.path
from _common import fork, kill, wait
from bench_store import machine, machine_line, no_gc, pager_line, redis_server, store_build

MIB = 1 << 20
TIMEOUT = 300  # every backend's default timeout, seconds
TIMEOUT_EXIT = 3
CONTENDED = "contended"  # the one key --procs processes increment
REDIS_DB = {"django": 0, "cachelib": 1}  # one server, a database per group: each wipes only its own
_running: set[int] = set()  # measuring processes, killed on --timeout


class Overtime(Exception):
    """--timeout passed: unwinds the run, so redis-server is stopped and the files removed."""


@dataclass(frozen=True)
class Backend:
    name: str  # for --only and the JSON
    group: str  # "django" or "cachelib"
    label: str  # for the table
    shared: bool  # processes on one machine see the same entries
    atomic_incr: bool  # lost increments are a failure
    ours: bool = False


BACKENDS = [
    Backend("mmap", "django", "prefork_sessions.django.MmapCache", True, True, ours=True),
    Backend("locmem", "django", "LocMemCache (per process)", False, False),
    Backend("filebased", "django", "FileBasedCache", True, False),
    Backend("diskcache", "django", "diskcache.DjangoCache", True, True),
    Backend("redis", "django", "RedisCache (redis-server)", True, True),
    Backend("mmap", "cachelib", "prefork_sessions.cachelib.MmapCache", True, True, ours=True),
    Backend("simple", "cachelib", "SimpleCache (per process)", False, False),
    Backend("filesystem", "cachelib", "FileSystemCache", True, False),
    Backend("redis", "cachelib", "RedisCache (redis-server)", True, True),
]
GROUP_TITLES = {"django": "Django caches", "cachelib": "cachelib caches"}
# (group, figure, other backend, minimum ratio ours / other)
TARGETS = [
    ("django", "get", "locmem", 0.7), ("django", "get", "filebased", 5.0), ("django", "get", "redis", 5.0),
    ("cachelib", "get", "simple", 0.7), ("cachelib", "get", "filesystem", 5.0), ("cachelib", "get", "redis", 5.0),
]
FIGURES = ("get", "set", "incr", "incr_procs")
FIGURE_TITLES = {"get": "get/s", "set": "set/s", "incr": "incr/s", "incr_procs": "incr/s, {procs} procs, 1 key"}


@dataclass(frozen=True)
class Config:
    keys: int
    counters: int
    seconds: float
    rounds: int
    procs: int
    seed: int
    value: str


def make_value(kind: str) -> Any:
    """The cached value, ~1 KiB pickled: a rendered page fragment (``html``, what cached
    views and template fragments store), or a dict of small objects (``dict``, whose
    unpickling costs ~8 us here and so dominates every fast backend's get)."""
    if kind == "html":
        rows = "".join(f'<tr><td>{1000 + i}</td><td>SKU-{i:05d}</td><td>{9.99 + i:.2f}</td></tr>\n'
                       for i in range(18))
        return f'<table class="orders">\n{rows}</table>\n'
    return {
        "title": "Recent orders",
        "generated": 1_700_000_000.25,
        "rows": [{"id": 1000 + i, "sku": f"SKU-{i:05d}", "qty": i % 7, "price": 9.99 + i,
                  "tags": ["new", "sale"] if i % 3 else []} for i in range(12)],
        "footer": "x" * 370,
    }


VALUES = ("html", "dict")
VALUE_TITLES = {"html": "a ~1 KiB rendered HTML fragment (str)", "dict": "a ~1 KiB dict of small objects"}


# --------------------------------------------------------------------------- building caches


class Ops:
    """One backend's operations under one interface: get, set, incr and a counter's reset."""

    def __init__(self, get: Callable[[str], Any], set_: Callable[[str, Any], Any],
                 incr: Callable[[str], Any], read_counter: Callable[[str], Any]) -> None:
        self.get, self.set, self.incr, self.read_counter = get, set_, incr, read_counter


def django_cache(b: Backend, d: str, redis_port: int | None) -> Any:
    from django.utils.module_loading import import_string

    big = {"MAX_ENTRIES": 10**7}
    specs: dict[str, tuple[str, str, dict[str, Any]]] = {
        "mmap": ("prefork_sessions.django.MmapCache", os.path.join(d, "django.mmap"),
                 {"OPTIONS": {"cache_size": 64 * MIB}}),
        "locmem": ("django.core.cache.backends.locmem.LocMemCache", "bench", {"OPTIONS": big}),
        "filebased": ("django.core.cache.backends.filebased.FileBasedCache",
                      os.path.join(d, "django-files"), {"OPTIONS": big}),
        "diskcache": ("diskcache.DjangoCache", os.path.join(d, "django-diskcache"), {"OPTIONS": {}}),
        "redis": ("django.core.cache.backends.redis.RedisCache",
                  f"redis://127.0.0.1:{redis_port}/{REDIS_DB['django']}", {"OPTIONS": {}}),
    }
    backend, location, params = specs[b.name]
    return import_string(backend)(location, {"TIMEOUT": TIMEOUT, **params})


def cachelib_cache(b: Backend, d: str, redis_port: int | None) -> Any:
    import cachelib

    if b.name == "mmap":
        from prefork_sessions.cachelib import MmapCache

        return MmapCache(os.path.join(d, "cachelib.mmap"), TIMEOUT, cache_size=64 * MIB)
    if b.name == "simple":
        return cachelib.SimpleCache(threshold=10**7, default_timeout=TIMEOUT)
    if b.name == "filesystem":
        return cachelib.FileSystemCache(os.path.join(d, "cachelib-files"), threshold=10**7,
                                        default_timeout=TIMEOUT)
    return cachelib.RedisCache(host="127.0.0.1", port=redis_port, db=REDIS_DB["cachelib"],
                               default_timeout=TIMEOUT)


def ops_of(b: Backend, d: str, redis_port: int | None) -> Ops:
    if b.group == "django":
        c = django_cache(b, d, redis_port)
        return Ops(c.get, c.set, c.incr, c.get)
    c = cachelib_cache(b, d, redis_port)
    return Ops(c.get, c.set, c.inc, c.get)


def wipe(b: Backend, d: str, redis_port: int | None) -> None:
    """Empty the backend before a round (its files or its Redis database)."""
    if b.name == "redis":
        import redis

        redis.Redis(host="127.0.0.1", port=redis_port, db=REDIS_DB[b.group]).flushdb()
    elif b.group == "django":
        django_cache(b, d, redis_port).clear()
    else:
        cachelib_cache(b, d, redis_port).clear()


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[str], Any], keys: list[str], seconds: float) -> dict[str, float]:
    """Call ``fn`` on ``keys`` in turn (wrapping round) for ``seconds``; ops and time."""
    batches = [keys[i:i + 8] for i in range(0, len(keys), 8)]  # a clock read per 8 ops: ~1%
    ops = 0
    with no_gc():
        t0 = time.perf_counter()
        while True:
            for batch in batches:
                for k in batch:
                    fn(k)
                ops += len(batch)
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    return {"ops": ops, "secs": elapsed}


def timed_gets(get: Callable[[str], Any], keys: list[str], seconds: float) -> dict[str, float]:
    misses = 0

    def counted(k: str) -> None:
        nonlocal misses
        if get(k) is None:
            misses += 1

    r = timed(counted, keys, seconds)
    r["misses"] = misses
    return r


def contended(b: Backend, cfg: Config, d: str, redis_port: int | None, key: str) -> dict[str, Any]:
    """``cfg.procs`` forked processes increment ``key`` together for ``cfg.seconds``, each
    with a cache object of its own; aggregate rate and the count's growth against the
    increments made."""
    before = ops_of(b, d, redis_port).read_counter(key)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()

    def child() -> None:
        os.close(ready_r)
        os.close(go_w)
        os.close(out_r)
        incr = ops_of(b, d, redis_port).incr
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        n = 0
        with no_gc():
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
            end = start + cfg.seconds
            while True:
                for _ in range(4):
                    incr(key)
                n += 4
                now = time.monotonic()
                if now >= end:
                    break
        os.write(out_w, (json.dumps({"n": n, "start": start, "end": now}) + "\n").encode())

    pids = [fork(child) for _ in range(cfg.procs)]
    for fd in (ready_w, go_r, out_w):
        os.close(fd)
    for _ in range(cfg.procs):
        if not os.read(ready_r, 1):
            break
    os.write(go_w, b"g" * cfg.procs)
    with os.fdopen(out_r) as f:
        lines = f.read().splitlines()
    codes = wait(pids, timeout=60)
    os.close(ready_r)
    os.close(go_w)
    if any(code != 0 for code in codes.values()) or len(lines) != cfg.procs:
        raise RuntimeError(f"incr processes failed: exit codes {sorted(codes.values(), key=str)}")
    parts = [json.loads(line) for line in lines]
    made = sum(p["n"] for p in parts)
    final = ops_of(b, d, redis_port).read_counter(key)
    return {"ops": made, "secs": max(p["end"] for p in parts) - min(p["start"] for p in parts),
            "final": final, "lost": made - (final - before)}


def measure(b: Backend, cfg: Config, d: str, redis_port: int | None, rnd: int) -> dict[str, Any]:
    """One round of every figure for one backend, in this (freshly forked) process.

    A shared backend is emptied and filled once, in round 0 (filling FileBasedCache
    takes seconds); a per-process one is filled in every round's process."""
    import prefork_sessions

    ops = ops_of(b, d, redis_port)
    value = make_value(cfg.value)
    keys = [f"key:{i}" for i in range(cfg.keys)]
    counters = [f"counter:{i}" for i in range(cfg.counters)]
    if rnd == 0 or not b.shared:
        wipe(b, d, redis_port)
        for k in keys:
            ops.set(k, value)
        for k in [*counters, CONTENDED]:
            ops.set(k, 0)
    shuffled = keys[:]
    random.Random(cfg.seed * 1000 + rnd).shuffle(shuffled)
    out: dict[str, Any] = {"accelerated": prefork_sessions.ACCELERATED if b.ours else None}
    out["get"] = timed_gets(ops.get, shuffled, cfg.seconds)
    out["set"] = timed(lambda k: ops.set(k, value), shuffled, cfg.seconds)
    before = sum(ops.read_counter(k) for k in counters)
    out["incr"] = timed(ops.incr, counters, cfg.seconds)
    out["incr"]["lost"] = out["incr"]["ops"] - (sum(ops.read_counter(k) for k in counters) - before)
    if b.shared:
        out["incr_procs"] = contended(b, cfg, d, redis_port, CONTENDED)
    return out


# --------------------------------------------------------------------------- rounds


def run_round(b: Backend, cfg: Config, d: str, redis_port: int | None, rnd: int) -> dict[str, Any]:
    """``measure`` in a fresh forked process; its result, or {"error": ...}."""
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        try:
            result = measure(b, cfg, d, redis_port, rnd)
        except Exception:  # noqa: BLE001 - reported as this backend's failure
            result = {"error": traceback.format_exc()}
        os.write(w, json.dumps(result).encode())
        os.close(w)

    pid = fork(child)
    _running.add(pid)
    os.close(w)
    with os.fdopen(r) as f:
        raw = f.read()
    code = wait([pid], timeout=120)[pid]
    _running.discard(pid)
    if code != 0 or not raw:
        return {"error": f"measuring process exited with {code}"}
    result: dict[str, Any] = json.loads(raw)
    return result


def rate(r: dict[str, Any]) -> float:
    return float(r["ops"] / r["secs"]) if r["secs"] > 0 else float("inf")


def summarise(rounds: list[dict[str, Any]]) -> dict[str, float]:
    good = [r for r in rounds if "error" not in r]
    return {f: statistics.median(rate(r[f]) for r in good) for f in FIGURES if good and f in good[0]}


def preimport() -> None:
    """Configure Django and import every backend's modules here, once: each forked
    measuring process inherits them instead of importing them again in its round."""
    import django
    from django.conf import settings
    from django.utils.module_loading import import_string

    if not settings.configured:
        settings.configure(USE_TZ=True, CACHES={})
        django.setup()
    import cachelib  # noqa: F401
    import redis  # noqa: F401

    for path in ("prefork_sessions.django.MmapCache", "django.core.cache.backends.locmem.LocMemCache",
                 "django.core.cache.backends.filebased.FileBasedCache", "diskcache.DjangoCache",
                 "django.core.cache.backends.redis.RedisCache", "prefork_sessions.cachelib.MmapCache"):
        import_string(path)


def run(cfg: Config, ns: argparse.Namespace, d: str) -> int:
    chosen = [b for b in BACKENDS if not ns.only or b.name in ns.only]
    if ns.only_group != "all":
        chosen = [b for b in chosen if b.group == ns.only_group]
    need_redis = any(b.name == "redis" for b in chosen)
    preimport()

    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {(b.group, b.name): [] for b in chosen}
    t0 = time.monotonic()
    with redis_server(d) if need_redis else _no_redis() as port:
        for rnd in range(cfg.rounds):
            order = chosen[rnd % len(chosen):] + chosen[:rnd % len(chosen)]
            for b in order:
                started = time.monotonic()
                result = run_round(b, cfg, d, port, rnd)
                result["wall"] = time.monotonic() - started
                rounds[(b.group, b.name)].append(result)
    elapsed = time.monotonic() - t0
    report = build_report(cfg, chosen, rounds, d, elapsed)
    if ns.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render(report))
    failed = report["failures"] or (ns.enforce_targets and any(not t["ok"] for t in report["targets"]))
    if not report["failures"] and not ns.json:
        # Like the other stress programs: say so when every check (answers, exact
        # counters of the atomic backends) held; the targets are marked above.
        print("\nall invariants held (every get answered, no atomic counter lost an increment)")
    return 1 if failed else 0


@contextmanager
def _no_redis() -> Iterator[None]:
    yield None


# --------------------------------------------------------------------------- report


def build_report(cfg: Config, chosen: list[Backend], rounds: dict[tuple[str, str], list[dict[str, Any]]],
                 d: str, elapsed: float) -> dict[str, Any]:
    failures: list[str] = []
    lost: dict[tuple[str, str], int] = {}
    accelerated: list[bool] = []
    for b in chosen:
        label = f"{GROUP_TITLES[b.group]}: {b.label}"
        for i, r in enumerate(rounds[(b.group, b.name)]):
            if "error" in r:
                failures.append(f"{label}, round {i + 1}: {r['error'].strip().splitlines()[-1]}")
                print(r["error"], file=sys.stderr)
                continue
            if r["accelerated"] is not None:
                accelerated.append(r["accelerated"])
            if r["get"]["misses"]:
                failures.append(f"{label}, round {i + 1}: {r['get']['misses']} gets missed a stored key")
            if r["incr"]["lost"]:
                failures.append(f"{label}, round {i + 1}: one process lost {r['incr']['lost']} increments")
            if "incr_procs" in r:
                n = r["incr_procs"]["lost"]
                lost[(b.group, b.name)] = lost.get((b.group, b.name), 0) + n
                if n and b.atomic_incr:
                    failures.append(f"{label}, round {i + 1}: {cfg.procs} processes lost {n} of "
                                    f"{r['incr_procs']['ops']} increments on a backend whose incr is atomic")
    summary = {f"{g}:{n}": summarise(rs) for (g, n), rs in rounds.items()}
    made = {f"{g}:{n}": sum(r["incr_procs"]["ops"] for r in rs if "incr_procs" in r) for (g, n), rs in rounds.items()}
    targets = []
    for group, fig, other, minimum in TARGETS:
        mine, theirs = summary.get(f"{group}:mmap", {}), summary.get(f"{group}:{other}", {})
        if fig in mine and fig in theirs:
            ratio = mine[fig] / theirs[fig]
            label = next(b.label for b in BACKENDS if b.group == group and b.name == other)
            targets.append({"name": f"{GROUP_TITLES[group]}: {fig} MmapCache / {label} >= {minimum:g}x",
                            "ratio": ratio, "min": minimum, "ok": ratio >= minimum})
    return {
        "config": cfg.__dict__, "machine": machine(d), "build": store_build(),
        "pager": pager_line(accelerated), "elapsed": elapsed,
        "backends": [{"group": b.group, "name": b.name, "label": b.label, "shared": b.shared,
                      "atomic_incr": b.atomic_incr} for b in chosen],
        "seconds_per_backend": {f"{g}:{n}": round(sum(r.get("wall", 0.0) for r in rs), 2)
                                for (g, n), rs in rounds.items()},
        "summary": summary, "lost": {f"{g}:{n}": v for (g, n), v in lost.items()}, "increments": made,
        "targets": targets, "failures": failures,
    }


def render(report: dict[str, Any]) -> str:
    cfg = report["config"]
    heading = (f"bench_cache: {cfg['rounds']} interleaved rounds, {cfg['seconds']:g} s per figure, "
               f"{cfg['keys']:,} keys holding {VALUE_TITLES[cfg['value']]}, {cfg['counters']} counters; "
               "medians in ops/s; ratio = MmapCache / that backend")
    out = [heading, ""]
    for group in ("django", "cachelib"):
        rows = [b for b in report["backends"] if b["group"] == group]
        if not rows:
            continue
        mine = report["summary"].get(f"{group}:mmap", {})
        heads = ["backend"] + [FIGURE_TITLES[f].format(procs=cfg["procs"]) for f in FIGURES] + [
            f"lost of {cfg['procs']}-proc incrs"] + [f"ratio {f}" for f in FIGURES]
        table = []
        for b in rows:
            key = f"{group}:{b['name']}"
            s = report["summary"].get(key, {})
            cells = [b["label"]] + [f"{s[f]:,.0f}" if f in s else "-" for f in FIGURES]
            if not b["shared"]:
                cells.append("not shared")
            elif key in report["lost"]:
                n, made = report["lost"][key], report["increments"][key]
                cells.append(f"{n:,} of {made:,}" if n else "0")
            else:
                cells.append("-")
            cells += [f"{mine[f] / s[f]:.2f}x" if f in s and f in mine and s[f] else "-" for f in FIGURES]
            table.append(cells)
        out += [f"{GROUP_TITLES[group]}", "", *markdown(heads, table), ""]
    for t in report["targets"]:
        out.append(f"{'PASS' if t['ok'] else 'FAIL'} {t['name']}: {t['ratio']:.2f}x")
    for f in report["failures"]:
        out.append(f"FAILURE {f}")
    out += ["", machine_line(report["machine"]), report["pager"], f"Package: {report['build']}",
            f"Run took {report['elapsed']:.1f} s."]
    return "\n".join(out)


def markdown(heads: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + (":" if i else "-")) for i, w in enumerate(widths)) + "|"
    return [line(heads), rule, *(line(r) for r in rows)]


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=0.12, help="seconds each figure runs, per round [0.12]")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; figures are medians [5]")
    p.add_argument("--keys", type=int, default=500, help="keys stored and read [500]")
    p.add_argument("--counters", type=int, default=100, help="counters for the one-process incr [100]")
    p.add_argument("--procs", type=int, default=4, help="processes incrementing one key [4]")
    p.add_argument("--only", default="", help="comma-separated backend names: mmap, locmem, filebased, "
                   "diskcache, redis, simple, filesystem [all]")
    p.add_argument("--group", dest="only_group", choices=("django", "cachelib", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 0.05 s figures, 200 keys")
    p.add_argument("--enforce-targets", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--value", choices=VALUES, default="html",
                   help="what every key holds: a rendered HTML fragment, or a dict [html]")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=180,
                   help="hard limit in seconds; a run still going is killed and fails [180]")
    p.add_argument("--dir", default=None, help="directory for the cache files [a new temporary directory]")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.rounds, ns.seconds, ns.keys, ns.counters = 1, 0.05, 200, 20
    ns.only = {n.strip() for n in ns.only.split(",") if n.strip()}
    unknown = ns.only - {b.name for b in BACKENDS}
    if unknown:
        p.error(f"unknown backend(s) in --only: {', '.join(sorted(unknown))}")
    if ns.rounds < 1 or ns.seconds <= 0 or ns.keys < 1 or ns.counters < 1 or ns.procs < 1:
        p.error("--rounds, --seconds, --keys, --counters and --procs must be positive")
    return Config(ns.keys, ns.counters, ns.seconds, ns.rounds, ns.procs, ns.seed, ns.value), ns


def main(argv: list[str] | None = None) -> int:
    cfg, ns = parse_args(argv)

    def expired(_signum: int, _frame: Any) -> None:
        raise Overtime

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, ns.timeout)  # not inherited by the forked processes
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=ns.dir) as d:
            return run(cfg, ns, d)
    except Overtime:
        for pid in list(_running):
            kill(pid)
        print(f"TIMEOUT: bench_cache still running after {ns.timeout:g} s (a hang is a failure)",
              file=sys.stderr, flush=True)
        return TIMEOUT_EXIT
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    sys.exit(main())
