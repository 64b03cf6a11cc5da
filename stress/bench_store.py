#!/usr/bin/env python3
"""Benchmark MmapStore against lmdb and Cache::FastMmap, side by side, in one run.

Method (what makes the figures comparable):

* Every store runs in a fresh process for every round (a Python subprocess, or
  stress/bench_fastmmap.pl for Cache::FastMmap), so one store's heap and page-cache
  state never reaches the next.  Rounds are interleaved (round 1 of every store, then
  round 2, ...; the order rotates each round) and each figure is the median over the
  rounds, never the best.
* Files live in /dev/shm (tmpfs) for every store (the system temp dir when there is
  no /dev/shm); each store's file is created, empty, before its clock starts.
* Raw figures store distinct seeded random 1 KiB byte strings.  Serialised figures
  store a ~1 KiB session dict (user id, csrf token, auth, prefs, flash list, cart
  items, timestamps) through JSON on every side: MmapStore(serializer="json")
  (orjson), lmdb with the same library, Cache::FastMmap with JSON::XS, and
  Cache::FastMmap's default Storable beside it.
* Figures: insert into a fresh file; overwrite, sustained: every key rewritten over
  --passes passes (so page compaction is inside the figure), reported as the median
  pass and the last pass; get of every key in shuffled order; get_and_set:
  --counters counters x --increments increments in shuffled order (lmdb: a write txn
  read-modify-write); contended: --procs processes x --contended increments of ONE
  counter, started together (aggregate ops/s = all ops / (last end - first start)),
  the final count checked exact; retention: never-expiring 0.5-4 KiB values inserted
  until their bytes reach 85% / 70% of a 16 MiB store, % still present.
* The collector is off while timing (as in timeit).  Bounded in time (--timeout),
  loopback only, temp files removed.  Exit status 1 when a store failed or a count
  was wrong, 2 on --timeout; a missed target is reported, not an error.

diskcache and redis (a private redis-server on 127.0.0.1) run only when named in
--only: they are 20-150x slower per operation, so at default sizes they would take
minutes per round.

    python stress/bench_store.py                        # full run, table
    python stress/bench_store.py --quick                # smoke run, a few seconds
    python stress/bench_store.py --only mmapstore,lmdb --repeat 7 --json
    PREFORK_SESSIONS_PURE=1 python stress/bench_store.py   # the pure-Python pager
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import importlib.util
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

STORES = ("mmapstore", "lmdb", "fastmmap", "diskcache", "redis")
DEFAULT_STORES = ("mmapstore", "lmdb", "fastmmap")
MIB = 1 << 20
PURE_ENV = "PREFORK_SESSIONS_PURE"
now = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across processes and with Perl

RAW_FIGURES = ("insert", "overwrite", "overwrite_last", "get", "get_and_set", "contended")
SESSION_FIGURES = ("insert", "overwrite", "overwrite_last", "get")
TITLES = {
    "insert": "insert into a fresh file",
    "overwrite": "overwrite, sustained: median pass",
    "overwrite_last": "overwrite, sustained: last pass",
    "get": "get, shuffled",
    "get_and_set": "get_and_set, counters",
    "contended": "contended, one counter",
}
MMAP_RAW, MMAP_SESSION = "MmapStore (raw)", "MmapStore (json)"
LMDB_RAW, FASTMMAP_RAW = "lmdb (raw)", "Cache::FastMmap (raw_values)"
# (peer, figure, minimum MmapStore/peer ratio), all on the raw pairing.
TARGETS = [(LMDB_RAW, f, 1.1) for f in ("insert", "overwrite", "get", "get_and_set", "contended")] + [
    (FASTMMAP_RAW, "get", 3.0), (FASTMMAP_RAW, "insert", 1.5), (FASTMMAP_RAW, "contended", 1.6)]
RETENTION_TARGET = (0.85, 99.9)  # fill, minimum % kept


class Overtime(Exception):
    """--timeout passed."""


@dataclass
class Config:
    keys: int = 10_000
    value_size: int = 1024
    session_size: int = 1024  # the session dicts' JSON size, roughly
    seed: int = 1
    repeat: int = 5
    passes: int = 10
    get_passes: int = 5
    counters: int = 100
    increments: int = 2_000  # per counter
    procs: int = 4
    contended: int = 2_000  # increments per process
    cache_size: int = 64 * MIB
    page_size: int = 64 * 1024
    retention_cache_size: int = 16 * MIB
    fills: tuple[float, ...] = (0.85, 0.70)
    min_size: int = 512
    max_size: int = 4096
    only: tuple[str, ...] = DEFAULT_STORES
    timeout: float = 900.0


@dataclass(frozen=True)
class Variant:
    """One store with one value encoding: a column of the report."""

    store: str  # the --only name
    label: str
    kind: str  # "raw" (1 KiB bytes) or "session" (the dict)
    codec: str  # how values are encoded: raw, json, storable
    short: str  # in the ratio columns' titles


def json_lib() -> str:
    return "orjson" if importlib.util.find_spec("orjson") else "json"


def variants() -> list[Variant]:
    lib = json_lib()
    return [
        Variant("mmapstore", MMAP_RAW, "raw", "raw", "Mmap"),
        Variant("lmdb", LMDB_RAW, "raw", "raw", "lmdb"),
        Variant("fastmmap", FASTMMAP_RAW, "raw", "raw", "FastMmap"),
        Variant("diskcache", "diskcache (raw)", "raw", "raw", "diskcache"),
        Variant("redis", "redis (raw)", "raw", "raw", "redis"),
        Variant("mmapstore", MMAP_SESSION, "session", "json", "Mmap"),
        Variant("lmdb", f"lmdb ({lib})", "session", "json", f"lmdb {lib}"),
        Variant("fastmmap", "Cache::FastMmap (JSON::XS)", "session", "json", "FastMmap JSON::XS"),
        Variant("fastmmap", "Cache::FastMmap (Storable)", "session", "storable", "FastMmap Storable"),
    ]


def mine_for(v: Variant) -> str:
    """The MmapStore variant a peer's ratios are taken against."""
    return MMAP_RAW if v.kind == "raw" else MMAP_SESSION


# --------------------------------------------------------------------------- workload


def make_session(rng: random.Random, target: int) -> dict[str, Any]:
    """A plausible web session of about ``target`` bytes of compact JSON."""
    t = 1_700_000_000 + rng.random() * 86_400 * 30
    s: dict[str, Any] = {
        "user_id": rng.randrange(1, 10_000_000),
        "username": f"user{rng.randrange(1_000_000):06d}",
        "csrf_token": base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("="),
        "created_at": round(t, 6),
        "last_seen": round(t + rng.random() * 3600, 6),
        "auth": {"method": rng.choice(["password", "oauth:github", "sso"]), "mfa": rng.random() < 0.4,
                 "roles": rng.sample(["user", "beta", "staff", "billing"], rng.randint(1, 3))},
        "prefs": {"theme": rng.choice(["light", "dark"]), "lang": rng.choice(["en-GB", "de-DE", "fr-FR"]),
                  "tz": rng.choice(["Europe/Berlin", "America/New_York", "Asia/Tokyo"]),
                  "page_size": rng.choice([10, 25, 50])},
        "flash": [{"category": rng.choice(["info", "success", "warning"]),
                   "message": f"Item {rng.randrange(10_000)} was added to your cart"}
                  for _ in range(rng.randint(0, 2))],
        "cart": {"currency": "EUR", "coupon": None, "items": []},
        "recent": [f"/products/{rng.randrange(100_000)}" for _ in range(rng.randint(2, 5))],
    }
    items = s["cart"]["items"]
    while len(json.dumps(s, separators=(",", ":"))) < target - 40:
        items.append({"sku": f"SKU-{rng.randrange(16 ** 6):06X}", "qty": rng.randint(1, 4),
                      "price_cents": rng.randrange(199, 99_999), "added_at": round(t + rng.random() * 600, 3)})
    return s


def write_workload(cfg: Config, d: str) -> dict[str, int]:
    """Write the seeded workload every worker reads; return the session JSON sizes."""
    rng = random.Random(cfg.seed)
    keys: dict[str, None] = {}
    while len(keys) < cfg.keys:
        keys[f"session:{rng.getrandbits(128):032x}"] = None
    blob = rng.randbytes(cfg.keys * cfg.value_size)  # value i: blob[i * size:(i + 1) * size]
    sessions = [json.dumps(make_session(rng, cfg.session_size), separators=(",", ":")) for _ in keys]
    order = list(range(cfg.keys))
    rng.shuffle(order)
    incr = [c for c in range(cfg.counters) for _ in range(cfg.increments)]
    rng.shuffle(incr)
    # Retention values: slices of the blob.  Twice what the largest fill can take at
    # the smallest size, so it never runs out.
    retention = []
    for _ in range(int(2 * cfg.retention_cache_size / cfg.min_size)):
        size = rng.randint(cfg.min_size, cfg.max_size)
        retention.append(f"session:{rng.getrandbits(128):032x} {size} {rng.randrange(len(blob) - size + 1)}")

    def lines(name: str, items: Any) -> None:
        with open(os.path.join(d, name), "w") as f:
            f.write("".join(f"{x}\n" for x in items))

    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(asdict(cfg), f)
    with open(os.path.join(d, "values.bin"), "wb") as bf:
        bf.write(blob)
    lines("keys.txt", keys)
    lines("sessions.jsonl", sessions)
    lines("get_order.txt", order)
    lines("incr.txt", incr)
    lines("retention.txt", retention)
    sizes = [len(s) for s in sessions]
    return {"min": min(sizes), "mean": round(sum(sizes) / len(sizes)), "max": max(sizes)}


@dataclass
class Workload:
    cfg: Config
    keys: list[str]
    blob: bytes
    order: list[int]
    incr: list[int]

    @classmethod
    def load(cls, d: str) -> Workload:
        with open(os.path.join(d, "config.json")) as f:
            raw = json.load(f)
        cfg = Config(**{f.name: raw[f.name] for f in fields(Config)})

        def ints(name: str) -> list[int]:
            with open(os.path.join(d, name)) as f:
                return [int(x) for x in f]

        with open(os.path.join(d, "keys.txt")) as f:
            keys = f.read().split()
        with open(os.path.join(d, "values.bin"), "rb") as bf:
            blob = bf.read()
        return cls(cfg, keys, blob, ints("get_order.txt"), ints("incr.txt"))

    def values(self) -> list[bytes]:
        n = self.cfg.value_size
        return [self.blob[i * n:(i + 1) * n] for i in range(len(self.keys))]

    def sessions(self, d: str, loads: Callable[[bytes], Any]) -> list[Any]:
        with open(os.path.join(d, "sessions.jsonl"), "rb") as f:
            return [loads(line) for line in f]

    def retention(self, d: str) -> list[tuple[str, bytes]]:
        out = []
        with open(os.path.join(d, "retention.txt")) as f:
            for line in f:
                k, size, off = line.split()
                out.append((k, self.blob[int(off):int(off) + int(size)]))
        return out


# --------------------------------------------------------------------------- stores (in a worker)


def _bump_bytes(v: bytes | None) -> bytes:
    return b"%d" % (int(v) + 1) if v else b"1"


def _bump_int(v: int | None) -> int:
    return (v or 0) + 1


class Adapter:
    """One store in a worker process: bound callables for the timed loops.

    ``create`` makes a fresh empty store (untimed), ``connect`` opens the existing one
    (in the contended run's children), ``remove`` deletes its files.
    """

    def __init__(self, cfg: Config, path: str, codec: str) -> None:
        self.cfg, self.path, self.codec = cfg, path, codec

    def create(self) -> None:
        self.connect()

    def connect(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def key(self, k: str) -> Any:
        return k

    def count(self, k: Any) -> int:
        return int(self.get(k) or 0)

    get: Callable[[Any], Any]
    set: Callable[[Any, Any], Any]
    incr: Callable[[Any], Any]


class MmapAdapter(Adapter):
    def connect(self) -> None:
        from prefork_sessions import NEVER, MmapStore

        self.store = st = MmapStore(self.path, cache_size=self.cfg.cache_size, page_size=self.cfg.page_size,
                                    expire=NEVER, serializer=self.codec)
        self.get, self.set = st.get, st.set
        gs = st.get_and_set
        bump = _bump_bytes if self.codec == "raw" else _bump_int
        self.incr = lambda k: gs(k, bump)

    def close(self) -> None:
        self.store.close()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class LmdbAdapter(Adapter):
    def key(self, k: str) -> Any:
        return k.encode()  # lmdb takes bytes; encoded before timing

    def connect(self) -> None:
        import lmdb

        # sync/metasync off: no fsync per commit, as the others; writemap: commits
        # write straight into the shared map, the closest to an mmap store.
        env = self.env = lmdb.open(self.path, map_size=1 << 30, sync=False, metasync=False, writemap=True,
                                   max_readers=2 * self.cfg.procs + 8)
        begin = env.begin
        if self.codec == "raw":
            def get(k: bytes) -> Any:
                with begin() as t:
                    return t.get(k)

            def set_(k: bytes, v: Any) -> None:
                with begin(write=True) as t:
                    t.put(k, v)
        else:
            dumps, loads = json_codec()

            def get(k: bytes) -> Any:
                with begin() as t:
                    v = t.get(k)
                return None if v is None else loads(v)

            def set_(k: bytes, v: Any) -> None:
                b = dumps(v)
                with begin(write=True) as t:
                    t.put(k, b)

        def incr(k: bytes) -> None:  # the read and the write in one write txn: exact
            with begin(write=True) as t:
                v = t.get(k)
                t.put(k, b"%d" % (int(v) + 1) if v else b"1")

        self.get, self.set, self.incr = get, set_, incr

    def close(self) -> None:
        self.env.close()  # py-lmdb: an Environment must not cross fork(): closed before it


class DiskcacheAdapter(Adapter):
    def connect(self) -> None:
        import diskcache  # type: ignore[import-untyped]

        self.cache = c = diskcache.Cache(self.path)
        self.get, self.set = c.get, c.set
        self.incr = lambda k: c.incr(k, 1, 0)  # a transaction: exact

    def close(self) -> None:
        self.cache.close()


class RedisAdapter(Adapter):
    def create(self) -> None:
        self.connect()
        self.client.flushall()

    def connect(self) -> None:
        import redis

        self.client = c = redis.Redis(host="127.0.0.1", port=int(os.environ["BENCH_REDIS_PORT"]))
        self.get, self.set, self.incr = c.get, c.set, c.incr

    def close(self) -> None:
        self.client.close()

    def remove(self) -> None:
        self.create()  # flushall
        self.close()


ADAPTERS: dict[str, type[Adapter]] = {"mmapstore": MmapAdapter, "lmdb": LmdbAdapter,
                                      "diskcache": DiskcacheAdapter, "redis": RedisAdapter}


def json_codec() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """The JSON library MmapStore uses (orjson), or the standard one without it."""
    if json_lib() == "orjson":
        import orjson

        return orjson.dumps, orjson.loads
    return (lambda v: json.dumps(v, separators=(",", ":")).encode()), json.loads


# --------------------------------------------------------------------------- timed loops (in a worker)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_sets(set_: Callable[[Any, Any], Any], keys: list[Any], vals: list[Any]) -> dict[str, float]:
    with no_gc():
        t0 = now()
        for k, v in zip(keys, vals):
            set_(k, v)
        secs = now() - t0
    return {"ops": len(keys), "secs": secs}


def timed_gets(get: Callable[[Any], Any], keys: list[Any], passes: int) -> dict[str, float]:
    misses = 0
    with no_gc():
        t0 = now()
        for _ in range(passes):
            for k in keys:
                if get(k) is None:
                    misses += 1
        secs = now() - t0
    if misses:
        raise RuntimeError(f"get: {misses} misses of {len(keys) * passes}: the store evicted; raise --cache-size")
    return {"ops": len(keys) * passes, "secs": secs}


def timed_incr(incr: Callable[[Any], Any], keys: list[Any], seq: list[int]) -> dict[str, float]:
    with no_gc():
        t0 = now()
        for i in seq:
            incr(keys[i])
        secs = now() - t0
    return {"ops": len(seq), "secs": secs}


def contended(a: Adapter, key: Any) -> dict[str, Any]:
    """cfg.procs forked children, each with its own handle, increment one counter together.

    The parent's handle is closed across the fork (py-lmdb requires it; the others
    get the same treatment) and reopened to read the final count.
    """
    procs, n = a.cfg.procs, a.cfg.contended
    a.close()
    go_r, go_w = os.pipe()
    kids: list[tuple[int, Any]] = []
    ok = False
    try:
        for _ in range(procs):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    os.close(r)
                    os.close(go_w)
                    a.connect()
                    incr = a.incr
                    os.write(w, b"ready\n")
                    os.read(go_r, 1)
                    gc.disable()
                    t0 = now()
                    for _ in range(n):
                        incr(key)
                    t1 = now()
                    a.close()
                    os.write(w, f"{t0!r} {t1!r}\n".encode())
                    code = 0
                except BaseException:  # noqa: BLE001  (the child must report and _exit, whatever happened)
                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(w)
            kids.append((pid, os.fdopen(r)))
        for _, f in kids:
            if f.readline() != "ready\n":
                raise RuntimeError("contended: a child failed to start")
        os.write(go_w, b"g" * procs)
        spans = []
        for _, f in kids:
            line = f.readline()
            if not line:
                raise RuntimeError("contended: a child died")
            start, end = line.split()
            spans.append((float(start), float(end)))
        ok = True
    finally:
        os.close(go_r)
        os.close(go_w)
        for pid, f in kids:
            f.close()
            if not ok:  # a child may be stuck on a lock: never wait on it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if status and ok:
                raise RuntimeError(f"contended: a child exited with status {status}")
    a.connect()
    return {"ops": procs * n, "secs": max(e for _, e in spans) - min(s for s, _ in spans),
            "per_proc": [e - s for s, e in spans], "count": a.count(key), "expected": procs * n}


def worker_ops(a: Adapter, wl: Workload, vals: list[Any], counters: bool) -> dict[str, Any]:
    """Every figure once, on a store created empty before the first clock starts."""
    cfg = wl.cfg
    keys = [a.key(k) for k in wl.keys]
    res: dict[str, Any] = {}
    a.create()
    try:
        res["insert"] = timed_sets(a.set, keys, vals)
        passes = []
        n = len(vals)
        for p in range(1, cfg.passes + 1):  # pass p writes value i + p: always a new value
            passes.append(timed_sets(a.set, keys, vals[p % n:] + vals[:p % n]))
        res["overwrite"] = {"passes": passes}
        res["get"] = timed_gets(a.get, [keys[i] for i in wl.order], cfg.get_passes)
        want = vals[cfg.passes % n:] + vals[:cfg.passes % n]
        wrong = sum(1 for k, v in zip(keys, want) if a.get(k) != v)
        if wrong:
            raise RuntimeError(f"{wrong} of {len(keys)} keys read back a value other than the last written")
        if counters:
            ckeys = [a.key(f"counter:{i}") for i in range(cfg.counters)]
            res["get_and_set"] = timed_incr(a.incr, ckeys, wl.incr)
            counts = [a.count(k) for k in ckeys]
            res["get_and_set"].update(count=sum(counts), expected=len(wl.incr),
                                      exact=all(c == cfg.increments for c in counts))
            res["contended"] = contended(a, a.key("counter:contended"))
    finally:
        a.close()
        a.remove()
    return res


def worker_retention(wl: Workload, d: str, tmp: str) -> dict[str, Any]:
    from prefork_sessions import NEVER, MmapStore

    cfg = wl.cfg
    items = wl.retention(d)
    out: dict[str, Any] = {}
    for fill in cfg.fills:
        path = os.path.join(tmp, f"retention-{fill}")
        with MmapStore(path, cache_size=cfg.retention_cache_size, page_size=cfg.page_size,
                       expire=NEVER, serializer="raw") as st:
            limit = fill * cfg.retention_cache_size
            nbytes, inserted = 0, []
            for k, v in items:
                if nbytes >= limit:
                    break
                st.set(k, v)
                nbytes += len(k) + len(v)
                inserted.append(k)
            kept = sum(1 for k in inserted if st.get(k) is not None)
        os.unlink(path)
        out[f"{fill:.2f}"] = {"inserted": len(inserted), "kept": kept, "bytes": nbytes}
    return out


def worker_main(label: str, d: str, phase: str, tmp: str) -> int:
    v = next(x for x in variants() if x.label == label)
    wl = Workload.load(d)
    out: dict[str, Any] = {}
    if v.store == "mmapstore":
        import prefork_sessions

        out["accelerated"] = bool(prefork_sessions.ACCELERATED)
    if phase == "retention":
        out["retention"] = worker_retention(wl, d, tmp)
    else:
        vals = wl.values() if v.kind == "raw" else wl.sessions(d, json_codec()[1])
        a = ADAPTERS[v.store](wl.cfg, os.path.join(tmp, f"{v.store}-{os.getpid()}"), v.codec)
        out["results"] = worker_ops(a, wl, vals, counters=v.kind == "raw")
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


# --------------------------------------------------------------------------- redis-server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(tmp: str) -> Iterator[int]:
    """A private redis-server on a free loopback port, no persistence; always stopped."""
    import redis

    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server not found on PATH (Debian: apt-get install redis-server)")
    d = tempfile.mkdtemp(prefix="redis-", dir=tmp)
    for _ in range(3):  # the free port can be taken between probe and bind: retry
        port = free_port()
        proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", d, "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
             "--logfile", os.path.join(d, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping():
                        break
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            else:
                continue
            yield port
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    raise RuntimeError(f"redis-server did not start; see {d}/redis.log")


# --------------------------------------------------------------------------- running workers


def run_worker(cmd: list[str], deadline: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one worker in its own process group; kill the whole group if time runs out."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env=env)
    try:
        out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise Overtime("the benchmark exceeded --timeout") from None
    finally:
        if p.returncode is None:  # timeout, Ctrl-C, SIGTERM: the worker and its children go too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    if p.returncode:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise RuntimeError(f"worker exited with status {p.returncode}: {tail}")
    result: dict[str, Any] = json.loads(out)
    return result


def worker_cmd(v: Variant, d: str, phase: str, tmp: str) -> list[str]:
    if v.store == "fastmmap":
        return ["perl", os.path.join(HERE, "bench_fastmmap.pl"), "--workload", d, "--dir", tmp,
                "--serializer", v.codec, "--phase", phase]
    return [sys.executable, os.path.abspath(__file__), "--worker", v.label, "--workload", d,
            "--phase", phase, "--dir", tmp]


# --------------------------------------------------------------------------- reporting


def mount_of(path: str) -> str:
    """The file system type ``path`` lives on (longest mount point prefix)."""
    best, fs = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fs = mnt, parts[2]
    return fs


def machine(directory: str | None = None) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(), "kernel": f"{platform.system()} {platform.release()}",
    }
    if directory:
        info["dir"], info["fs"] = directory, mount_of(os.path.realpath(directory))
    versions = {}
    for mod in ("orjson", "lmdb", "diskcache", "redis"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        versions["redis-server"] = subprocess.run(
            ["redis-server", "--version"], check=False, capture_output=True, text=True, timeout=10
        ).stdout.split("v=")[1].split()[0]
    for mod in ("Cache::FastMmap", "JSON::XS", "Storable"):
        with contextlib.suppress(Exception):
            versions[mod] = subprocess.run(
                ["perl", f"-M{mod}", "-e", f"print ${mod}::VERSION"],
                check=False, capture_output=True, text=True, timeout=10).stdout.strip() or "missing"
    info["versions"] = versions
    return info


def machine_line(m: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    fs = f"; files in {m['dir']} ({m['fs']})" if m.get("dir") else ""
    return (f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['kernel']}, "
            f"Python {m['python']}{fs}; {v}")


def store_build() -> str:
    """Which MmapStore is measured: where from, git commit (+dirty)."""
    spec = importlib.util.find_spec("prefork_sessions")
    if spec is None or not spec.origin:
        return "not importable"
    where = os.path.dirname(spec.origin)
    desc = "?"
    with contextlib.suppress(Exception):
        git = ["git", "-C", where]
        sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "."], check=False, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        desc = f"git {sha}{' + uncommitted changes' if dirty else ''}" if sha else "not a git checkout"
    return f"{where} ({desc})"


def pager_line(accelerated: list[bool]) -> str:
    env = os.environ.get(PURE_ENV)
    if not accelerated:
        return "MmapStore pager: not measured"
    if len(set(accelerated)) > 1:
        return "MmapStore pager: MIXED (some workers C, some pure Python): the figures are not comparable"
    if accelerated[0]:
        return "MmapStore pager: C (prefork_sessions.ACCELERATED is True)"
    why = f"{PURE_ENV}={env}" if env else "the C extension did not load"
    return f"MmapStore pager: pure Python ({why}; prefork_sessions.ACCELERATED is False)"


def rate(r: dict[str, Any]) -> float:
    return float(r["ops"] / r["secs"]) if r["secs"] > 0 else float("inf")


def figure_rates(res: dict[str, Any]) -> dict[str, float]:
    """One round's ops/s per figure; the overwrite passes give the median pass and the last."""
    out: dict[str, float] = {f: rate(res[f]) for f in ("insert", "get", "get_and_set", "contended") if f in res}
    passes = [rate(p) for p in res["overwrite"]["passes"]]
    out["overwrite"], out["overwrite_last"] = statistics.median(passes), passes[-1]
    return out


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per store and figure, the median of the rounds' ops/s."""
    out = {}
    for label, rs in rounds.items():
        per = [figure_rates(r) for r in rs]
        out[label] = {f: statistics.median(p[f] for p in per) for f in per[0]}
    return out


def count_failures(rounds: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every counter that did not end exact, in any round: the one result that must not vary."""
    bad = []
    for label, rs in rounds.items():
        for i, r in enumerate(rs, 1):
            for fig in ("get_and_set", "contended"):
                c = r.get(fig)
                if c and (c["count"] != c["expected"] or not c.get("exact", True)):
                    bad.append(f"{label} {TITLES[fig]}, round {i}: count {c['count']:,}, "
                               f"expected {c['expected']:,}{'' if c.get('exact', True) else ' (per counter wrong)'}")
    return bad


def ratios_of(summary: dict[str, dict[str, float]], vs: list[Variant]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for v in vs:
        mine = mine_for(v)
        if v.store != "mmapstore" and v.label in summary and mine in summary:
            out[v.label] = {f: summary[mine][f] / x for f, x in summary[v.label].items() if f in summary[mine]}
    return out


def evaluate_targets(ratios: dict[str, dict[str, float]], retention: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for peer, fig, want in TARGETS:
        got = ratios.get(peer, {}).get(fig)
        out.append({"what": f"{TITLES[fig]}: MmapStore / {peer}", "target": f">= {want:.1f}x",
                    "value": got, "pass": None if got is None else got >= want})
    fill, want_pct = RETENTION_TARGET
    r = retention.get(MMAP_RAW, {}).get(f"{fill:.2f}")
    pct = 100.0 * r["kept"] / r["inserted"] if r else None
    out.append({"what": f"retention at {fill:.0%} fill: MmapStore", "target": f">= {want_pct}%",
                "value": pct, "pass": None if pct is None else pct >= want_pct})
    return out


def table(summary: dict[str, dict[str, float]], ratios: dict[str, dict[str, float]], labels: list[str],
          figures: tuple[str, ...], notes: dict[str, str], short: dict[str, str]) -> list[str]:
    peers = [lb for lb in labels if lb in ratios]
    head = ["figure (ops/s)"] + labels + [f"Mmap/{short[p]}" for p in peers]
    rows = []
    for f in figures:
        if not any(f in summary[lb] for lb in labels):
            continue
        row = [TITLES[f] + notes.get(f, "")]
        row += [f"{summary[lb][f]:,.0f}" if f in summary[lb] else "" for lb in labels]
        row += [f"{ratios[p][f]:.2f}x" if f in ratios[p] else "" for p in peers]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return [line(head), sep] + [line(r) for r in rows]


def render(report: dict[str, Any]) -> str:
    o = io.StringIO()
    cfg = report["config"]

    def p(*a: object) -> None:
        print(*a, file=o)

    p(machine_line(report["machine"]))
    p(f"MmapStore: {report['store_build']}")
    p(report["pager"])
    la = report["load_average"]
    p(f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in la['start'])}, at end "
      f"{'/'.join(f'{x:.2f}' for x in la['end'])}: other work on this machine skews the figures")
    ss = report["session_bytes"]
    p(f"Workload: {cfg['keys']:,} keys session:<32 hex>; raw values: distinct random {cfg['value_size']} B; "
      f"sessions: dicts of {ss['min']}-{ss['max']} B as JSON (mean {ss['mean']}); cache {cfg['cache_size'] // MIB} "
      f"MiB, page {cfg['page_size'] // 1024} KiB; seed {cfg['seed']}")
    p(f"Method: median of {cfg['repeat']} interleaved rounds, each store in a fresh process every round, "
      "files created before the clock starts; collector off while timing")
    summary, ratios = report["summary"], report["ratios"]
    order = [v["label"] for v in report["variants"]]
    notes = {"overwrite": f" of {cfg['passes']}", "overwrite_last": f" of {cfg['passes']}",
             "get": f", {cfg['get_passes']} passes", "get_and_set": f", {cfg['counters']} x {cfg['increments']:,}",
             "contended": f", {cfg['procs']} procs x {cfg['contended']:,}"}
    for kind, figs, title in (("raw", RAW_FIGURES, f"Raw values ({cfg['value_size']} B random bytes)"),
                              ("session", SESSION_FIGURES, "Session dicts through JSON (Storable beside it)")):
        labels = [v["label"] for v in report["variants"] if v["kind"] == kind and v["label"] in summary]
        if labels:
            p()
            p(f"{title}:")
            p()
            short = {v["label"]: v["short"] for v in report["variants"]}
            for line in table(summary, ratios, [lb for lb in order if lb in labels], figs, notes, short):
                p(line)
    p()
    if report["count_failures"]:
        for f in report["count_failures"]:
            p(f"!!! FAIL: COUNTER NOT EXACT: {f}")
    else:
        done = [lb for lb in order if lb in report["rounds"] and "contended" in report["rounds"][lb][0]]
        if done:
            p(f"Counters exact in every round: {cfg['counters']} x {cfg['increments']:,} and contended "
              f"{cfg['procs'] * cfg['contended']:,} of {cfg['procs'] * cfg['contended']:,} "
              f"for {', '.join(done)}")
    ret = report["retention"]
    if ret:
        lw = max(len(lb) for lb in ret)
        p()
        p(f"Retention: {cfg['retention_cache_size'] // MIB} MiB store, {cfg['page_size'] // 1024} KiB pages, "
          f"never-expiring random values of {cfg['min_size']}-{cfg['max_size']} B (seed {cfg['seed']}), "
          "inserted until key+value bytes reach the fill")
        p()
        p(f"| {'store':<{lw}} | fill | inserted |   kept |  % kept |")
        p(f"|{'-' * (lw + 2)}|-----:|---------:|-------:|--------:|")
        for lb, fills in ret.items():
            for fill, r in sorted(fills.items(), reverse=True):
                pct = 100.0 * r["kept"] / r["inserted"]
                p(f"| {lb:<{lw}} | {float(fill):>4.0%} | {r['inserted']:>8,} | {r['kept']:>6,} | {pct:6.2f}% |")
    p()
    p("Targets (one run):")
    for t in report["targets"]:
        mark = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        if t["value"] is None:
            val = "not measured"
        else:
            val = f"{t['value']:.2f}%" if t["target"].endswith("%") else f"{t['value']:.2f}x"
        p(f"  [{mark}] {t['what']}: {val} (target {t['target']})")
    for e in report["errors"]:
        p(f"  [error] {e}")
    return o.getvalue()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, help="number of session keys (default 10000)")
    ap.add_argument("--value-size", type=int, help="raw value size in bytes (default 1024)")
    ap.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    ap.add_argument("--repeat", type=int, help="interleaved rounds; each figure is their median (default 5)")
    ap.add_argument("--passes", type=int, help="sustained overwrite passes (default 10)")
    ap.add_argument("--only", help=f"comma list of stores: {','.join(STORES)} (default {','.join(DEFAULT_STORES)})")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run of a few seconds")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    ap.add_argument("--timeout", type=float, help="abort the whole run after this many seconds (default 900)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one store, one round, in this process
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=("ops", "retention"), default="ops", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    cfg = Config()
    if ns.quick:
        cfg = Config(keys=500, repeat=1, get_passes=2, counters=10, increments=100, contended=200,
                     cache_size=16 * MIB, retention_cache_size=4 * MIB, timeout=300.0)
    for name in ("keys", "value_size", "repeat", "passes", "timeout"):
        if getattr(ns, name) is not None:
            setattr(cfg, name, getattr(ns, name))
    cfg.seed = ns.seed
    if min(cfg.keys, cfg.repeat, cfg.value_size, cfg.passes) < 1:
        ap.error("--keys, --value-size, --repeat and --passes must be positive")
    if cfg.keys * cfg.value_size < cfg.max_size:
        ap.error(f"--keys x --value-size must be at least {cfg.max_size} (the retention values are cut from it)")
    # Room for every key four times over (with per-entry overhead), so gets never miss.
    need = 4 * cfg.keys * (max(cfg.value_size, cfg.session_size) + 128)
    while cfg.cache_size < need:
        cfg.cache_size *= 2
    if ns.only:
        only = tuple(s.strip().lower() for s in ns.only.split(",") if s.strip())
        bad = [s for s in only if s not in STORES]
        if bad:
            ap.error(f"--only: unknown store(s) {', '.join(bad)}; choose from {', '.join(STORES)}")
        cfg.only = only
    return cfg, ns


def bench_dir() -> str:
    """/dev/shm where it is a writable directory (tmpfs, the same for every store)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def main(argv: list[str] | None = None) -> int:
    cfg, ns = parse_args(argv)
    if ns.worker:
        return worker_main(ns.worker, ns.workload, ns.phase, ns.dir)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    tmp = tempfile.mkdtemp(prefix="bench_store-", dir=bench_dir())
    try:
        return run(cfg, ns, tmp, time.monotonic() + cfg.timeout)
    except Overtime as e:
        print(f"bench_store: {e} ({cfg.timeout:.0f}s)", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(cfg: Config, ns: argparse.Namespace, tmp: str, deadline: float) -> int:
    m = machine(os.path.dirname(tmp))  # where every store's files go
    load_start = os.getloadavg()
    wdir = os.path.join(tmp, "workload")
    os.mkdir(wdir)
    session_bytes = write_workload(cfg, wdir)
    plan = [v for v in variants() if v.store in cfg.only]
    rounds: dict[str, list[dict[str, Any]]] = {}
    retention: dict[str, Any] = {}
    accelerated: list[bool] = []
    errors: list[str] = []
    failed: set[tuple[str, str]] = set()  # (label, phase): not run again

    def log(*a: object) -> None:
        if not ns.json:
            print(*a, file=sys.stderr, flush=True)

    def attempt(v: Variant, phase: str, env: dict[str, str] | None) -> dict[str, Any] | None:
        if (v.label, phase) in failed:
            return None
        try:
            out = run_worker(worker_cmd(v, wdir, phase, tmp), deadline, env)
        except Exception as e:  # one store failing must not cost the others' figures
            if isinstance(e, Overtime):
                raise
            failed.add((v.label, phase))
            errors.append(f"{v.label} ({phase}): {type(e).__name__}: {e}")
            log(f"  {v.label} failed: {e}")
            return None
        if "accelerated" in out:
            accelerated.append(out["accelerated"])
        return out

    with contextlib.ExitStack() as stack:
        env = None
        if "redis" in cfg.only:
            try:
                env = dict(os.environ, BENCH_REDIS_PORT=str(stack.enter_context(redis_server(tmp))))
            except Exception as e:  # noqa: BLE001  (reported, the others still run)
                errors.append(f"redis: {type(e).__name__}: {e}")
                plan = [v for v in plan if v.store != "redis"]
        for i in range(cfg.repeat):
            # Interleaved, in a rotating order: a burst of outside load, or whatever one
            # store leaves behind, lands on different stores in different rounds.
            k = i % len(plan) if plan else 0
            for v in plan[k:] + plan[:k]:
                log(f"  round {i + 1}/{cfg.repeat}: {v.label}")
                out = attempt(v, "ops", env)
                if out is not None:
                    rounds.setdefault(v.label, []).append(out["results"])
        for v in plan:
            if v.kind == "raw" and v.store in ("mmapstore", "fastmmap"):
                log(f"  retention: {v.label}")
                out = attempt(v, "retention", env)
                if out is not None:
                    retention[v.label] = {f"{float(f):.2f}": r for f, r in out["retention"].items()}
    # A store whose ops failed in some round has no figures: a median of the rounds
    # that happened to work would hide the failure.
    rounds = {lb: rs for lb, rs in rounds.items() if (lb, "ops") not in failed}
    summary = summarise(rounds)
    ratios = ratios_of(summary, plan)
    failures = count_failures(rounds)
    report = {"machine": m, "config": asdict(cfg), "store_build": store_build(), "pager": pager_line(accelerated),
              "accelerated": accelerated[0] if len(set(accelerated)) == 1 else None,
              "pure_env": os.environ.get(PURE_ENV), "session_bytes": session_bytes,
              "variants": [asdict(v) for v in plan], "rounds": rounds, "summary": summary, "ratios": ratios,
              "retention": retention, "targets": evaluate_targets(ratios, retention),
              "count_failures": failures, "errors": errors,
              "load_average": {"start": load_start, "end": os.getloadavg()}}
    if ns.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render(report), end="")
    if failures:
        print(f"bench_store: {len(failures)} counter(s) not exact:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
