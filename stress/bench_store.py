#!/usr/bin/env python3
"""Benchmark MmapStore side by side with its peers, in one run, on one workload.

Peers: Cache::FastMmap (Perl, driven by stress/bench_fastmmap.pl), diskcache, lmdb
(sync off) and a real redis-server started here on a free 127.0.0.1 port.  Every
store gets the same keys (``session:<32 hex>``), the same values and the same
operation sequences (written to a temp dir for the Perl side):

* set: insert every key into an empty store (the first writes to a fresh file, so
  this includes each store's first-touch cost); set (overwrite): every key again;
  get: every key, several passes (all hits);
* mix: 80 % get / 20 % set on random keys, in 1 process and in 2 processes started
  together (each does --mix-ops; aggregate ops/s = all ops / (last end - first start));
* incr: ``get_and_set`` increments of --counters counters (peers: FastMmap
  get_and_set, diskcache ``Cache.incr`` (a transaction), lmdb a write txn
  read-modify-write, redis INCR);
* retention (bounded stores only: MmapStore, FastMmap, same cache and page size):
  never-expiring sessions of seeded random size 0.5-4 KiB inserted until the
  inserted bytes (key + value) reach 85 % / 70 % of the cache size; % still present.

Pairings for ratios (MmapStore/peer, higher is better): MmapStore(serializer="raw")
against FastMmap(raw_values => 1), diskcache, lmdb and redis (all storing the 1 KiB
bytes value); MmapStore(serializer="json") against FastMmap's default Storable
serializer, both storing ``{"data": <1 KiB str>}``.  Each throughput figure is the
median of --repeat rounds, every round running each store once (interleaved, so
load that comes and goes hits all of them alike), each on a fresh store; the
collector is off while timing (as in timeit).  Bounded in time (--timeout), loopback only, temp files removed.

    python stress/bench_store.py                 # full run, table
    python stress/bench_store.py --quick         # smoke run
    python stress/bench_store.py --only mmapstore,fastmmap --repeat 5 --json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

STORES = ("mmapstore", "fastmmap", "diskcache", "lmdb", "redis")
OPS = ("set", "update", "get", "mix1", "mix2", "incr")
OP_TITLES = {
    "set": "set (insert)",
    "update": "set (overwrite)",
    "get": "get (hits)",
    "mix1": "80/20 get/set, 1 proc",
    "mix2": "80/20 get/set, 2 procs",
    "incr": "get_and_set incr",
}
# (operation, minimum MmapStore/Cache::FastMmap ratio)
TARGETS = {"get": 2.0, "set": 1.0, "mix2": 1.5}
RETENTION_TARGET = (0.85, 99.9)  # fill, minimum % kept
MIB = 1 << 20
now = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across processes and with Perl


class Overtime(BaseException):
    """--timeout passed: not an Exception, so no store's error handling can swallow it."""


@dataclass
class Config:
    keys: int = 10_000
    value_size: int = 1024
    seed: int = 1
    repeat: int = 3
    get_passes: int = 5
    mix_ops: int = 50_000
    incr_ops: int = 20_000
    counters: int = 100
    cache_size: int = 64 * MIB
    page_size: int = 64 * 1024
    retention_cache_size: int = 16 * MIB
    fills: tuple[float, ...] = (0.85, 0.70)
    min_size: int = 512
    max_size: int = 4096
    only: tuple[str, ...] = STORES
    timeout: float = 900.0


@dataclass
class Workload:
    keys: list[str]
    mix: list[list[int]]  # per process: key index << 1 | is_set
    incr: list[int]  # counter index per increment
    retention: list[tuple[str, int]]  # (key, value size)
    counter_keys: list[str] = field(default_factory=list)


def make_workload(cfg: Config) -> Workload:
    rng = random.Random(cfg.seed)

    def key() -> str:
        return f"session:{rng.getrandbits(128):032x}"

    keys = list({key(): None for _ in range(cfg.keys)})
    while len(keys) < cfg.keys:  # collisions of 128-bit keys: only for form's sake
        keys = list(dict.fromkeys(keys + [key()]))
    n = len(keys)
    mix = [[(rng.randrange(n) << 1) | (rng.random() < 0.2) for _ in range(cfg.mix_ops)] for _ in range(2)]
    incr = [rng.randrange(cfg.counters) for _ in range(cfg.incr_ops)]
    # Twice what the largest fill can take at the smallest size: never runs out.
    retention = [(key(), rng.randint(cfg.min_size, cfg.max_size))
                 for _ in range(int(2 * cfg.retention_cache_size / cfg.min_size))]
    return Workload(keys, mix, incr, retention, [f"counter:{i}" for i in range(cfg.counters)])


def write_workload(wl: Workload, directory: str) -> None:
    def lines(name: str, items: Any) -> None:
        with open(os.path.join(directory, name), "w") as f:
            f.write("".join(f"{x}\n" for x in items))

    lines("keys.txt", wl.keys)
    for p, seq in enumerate(wl.mix):
        lines(f"mix_{p}.txt", seq)
    lines("incr.txt", wl.incr)
    lines("retention.txt", (f"{k} {s}" for k, s in wl.retention))


# --------------------------------------------------------------------------- stores


class Adapter:
    """One store under test: fast callables for the timed loops plus fork hooks."""

    label = ""
    pairing = "raw"  # which MmapStore variant this store's ratios compare against
    incr_how = ""

    def __init__(self, cfg: Config, tmp: str, value: Any) -> None:
        self.cfg, self.tmp, self.value = cfg, tmp, value

    def open(self) -> None:  # a fresh, empty store
        raise NotImplementedError

    def close(self) -> None:
        pass

    def keys(self, keys: list[str]) -> list[Any]:
        return keys

    def before_fork(self) -> None:
        pass

    def after_fork(self) -> None:
        pass

    def child_open(self) -> None:  # in a forked child
        pass

    get: Callable[[Any], Any]
    set: Callable[[Any, Any], Any]
    incr: Callable[[Any], Any]


def _bump_bytes(v: bytes | None) -> bytes:
    return b"%d" % (int(v) + 1) if v else b"1"


def _bump_int(v: int | None) -> int:
    return (v or 0) + 1


class MmapAdapter(Adapter):
    incr_how = "get_and_set"

    def __init__(self, cfg: Config, tmp: str, value: Any, serializer: str) -> None:
        super().__init__(cfg, tmp, value)
        self.serializer = serializer
        self.label = f"MmapStore ({serializer})"
        self.pairing = serializer
        self.n = 0

    def open(self) -> None:
        from prefork_sessions import NEVER, MmapStore

        self.n += 1
        self.path = os.path.join(self.tmp, f"mmap-{self.serializer}-{self.n}")
        self.store = MmapStore(self.path, cache_size=self.cfg.cache_size, page_size=self.cfg.page_size,
                               expire=NEVER, serializer=self.serializer)
        self._bind()

    def _bind(self) -> None:
        st = self.store
        self.get, self.set = st.get, st.set
        gs = st.get_and_set
        bump: Callable[[Any], Any]
        if self.serializer == "raw":
            bump = _bump_bytes
        else:
            bump = _bump_int
        self.incr = lambda k: gs(k, bump)

    def child_open(self) -> None:
        self.store.reopen()
        self._bind()

    def close(self) -> None:
        self.store.close()
        os.unlink(self.path)


class DiskcacheAdapter(Adapter):
    label = "diskcache"
    incr_how = "Cache.incr (transaction)"

    def open(self) -> None:

        self.dir = tempfile.mkdtemp(prefix="diskcache-", dir=self.tmp)
        self._connect()

    def _connect(self) -> None:
        import diskcache  # type: ignore[import-untyped]

        self.cache = diskcache.Cache(self.dir)
        self.get, self.set = self.cache.get, self.cache.set
        incr = self.cache.incr
        self.incr = lambda k: incr(k, 1, 0)

    def before_fork(self) -> None:
        self.cache.close()

    def after_fork(self) -> None:
        self._connect()

    def child_open(self) -> None:
        self._connect()

    def close(self) -> None:
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class LmdbAdapter(Adapter):
    label = "lmdb"
    incr_how = "write txn read-modify-write"

    def keys(self, keys: list[str]) -> list[Any]:
        return [k.encode() for k in keys]  # lmdb takes bytes; encoded before timing

    def open(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lmdb-", dir=self.tmp)
        self._connect()

    def _connect(self) -> None:
        import lmdb

        # sync/metasync off: no fsync per commit, as the others; writemap: commits
        # write straight into the shared map, the closest to an mmap store.
        env = self.env = lmdb.open(self.dir, map_size=1 << 30, sync=False, metasync=False,
                                   writemap=True, max_readers=16)
        begin = env.begin

        def get(k: bytes) -> bytes | None:
            with begin() as t:
                return t.get(k)

        def set_(k: bytes, v: bytes) -> None:
            with begin(write=True) as t:
                t.put(k, v)

        def incr(k: bytes) -> int:
            with begin(write=True) as t:
                v = t.get(k)
                n = int(v) + 1 if v else 1
                t.put(k, b"%d" % n)
                return n

        self.get, self.set, self.incr = get, set_, incr

    # py-lmdb: an Environment must not be used across fork(), and one process must
    # not open the same environment twice; so the parent closes it around the fork.
    def before_fork(self) -> None:
        self.env.close()

    def after_fork(self) -> None:
        self._connect()

    def child_open(self) -> None:
        self._connect()

    def close(self) -> None:
        self.env.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisAdapter(Adapter):
    label = "redis"
    incr_how = "INCR"

    def __init__(self, cfg: Config, tmp: str, value: Any, port: int) -> None:
        super().__init__(cfg, tmp, value)
        self.port = port

    def open(self) -> None:
        self._connect()
        self.client.flushall()

    def _connect(self) -> None:
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port)  # one client per process
        self.get, self.set, self.incr = self.client.get, self.client.set, self.client.incr

    def child_open(self) -> None:
        self._connect()

    def close(self) -> None:
        self.client.flushall()
        self.client.close()


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


# --------------------------------------------------------------------------- timed loops


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def mix_loop(get: Callable[[Any], Any], set_: Callable[[Any, Any], Any], keys: list[Any],
             value: Any, seq: list[int]) -> None:
    for v in seq:
        if v & 1:
            set_(keys[v >> 1], value)
        else:
            get(keys[v >> 1])


def run_parallel(a: Adapter, keys: list[Any], seqs: list[list[int]]) -> dict[str, Any]:
    """Fork one child per sequence; each opens its own handle, waits for 'go', times itself."""
    a.before_fork()
    go_r, go_w = os.pipe()
    kids = []
    ok = False
    try:
        for seq in seqs:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    os.close(r)
                    os.close(go_w)
                    a.child_open()
                    get, set_ = a.get, a.set
                    os.write(w, b"ready\n")
                    os.read(go_r, 1)
                    gc.disable()
                    t0 = now()
                    mix_loop(get, set_, keys, a.value, seq)
                    t1 = now()
                    os.write(w, f"{t0!r} {t1!r} {len(seq)}\n".encode())
                    code = 0
                except BaseException:  # noqa: BLE001  (the child must report and _exit, whatever happened)
                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(w)
            kids.append((pid, os.fdopen(r)))
        os.close(go_r)
        for _, f in kids:
            if f.readline() != "ready\n":
                raise RuntimeError(f"{a.label}: a mix child failed to start")
        os.write(go_w, b"g" * len(kids))
        spans = []
        for _, f in kids:
            line = f.readline()
            if not line:
                raise RuntimeError(f"{a.label}: a mix child died")
            start, end, n = line.split()
            spans.append((float(start), float(end), int(n)))
        ok = True
    finally:
        os.close(go_w)
        for pid, f in kids:
            f.close()
            if not ok:  # stopped early (error, --timeout): a child may be stuck; never wait on it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if status and ok:
                raise RuntimeError(f"{a.label}: mix child exited with status {status}")
        a.after_fork()
    ops = sum(s[2] for s in spans)
    return {"ops": ops, "secs": max(s[1] for s in spans) - min(s[0] for s in spans),
            "per_proc": [s[1] - s[0] for s in spans]}


def run_python(a: Adapter, wl: Workload, cfg: Config) -> dict[str, dict[str, Any]]:
    """One pass of every operation on a fresh store."""
    res: dict[str, dict[str, Any]] = {}
    keys = a.keys(wl.keys)
    ckeys = a.keys(wl.counter_keys)
    value = a.value
    a.open()
    try:
        get, set_, incr = a.get, a.set, a.incr
        with no_gc():
            t0 = now()
            for k in keys:
                set_(k, value)
            res["set"] = {"ops": len(keys), "secs": now() - t0}
        with no_gc():  # the same keys again: overwrites, on pages the inserts already touched
            t0 = now()
            for k in keys:
                set_(k, value)
            res["update"] = {"ops": len(keys), "secs": now() - t0}
        hits = 0
        with no_gc():
            t0 = now()
            for _ in range(cfg.get_passes):
                for k in keys:
                    if get(k) is not None:
                        hits += 1
            res["get"] = {"ops": len(keys) * cfg.get_passes, "secs": now() - t0}
        if hits != res["get"]["ops"]:
            raise RuntimeError(f"{a.label}: {hits} hits of {res['get']['ops']} gets: it evicted; "
                               "raise --cache-size")
        with no_gc():
            t0 = now()
            mix_loop(get, set_, keys, value, wl.mix[0])
            secs = now() - t0
        res["mix1"] = {"ops": len(wl.mix[0]), "secs": secs, "per_proc": [secs]}
        res["mix2"] = run_parallel(a, keys, wl.mix[:2])
        incr = a.incr
        with no_gc():
            t0 = now()
            for i in wl.incr:
                incr(ckeys[i])
            res["incr"] = {"ops": len(wl.incr), "secs": now() - t0}
        total = sum(int(a.get(k) or 0) for k in ckeys)
        if total != len(wl.incr):
            raise RuntimeError(f"{a.label}: counters sum to {total}, expected {len(wl.incr)}")
    finally:
        a.close()
    return res


def perl_args(cfg: Config, workload_dir: str, tmp: str) -> list[str]:
    return ["perl", os.path.join(HERE, "bench_fastmmap.pl"), "--workload", workload_dir, "--dir", tmp,
            "--keys", str(cfg.keys), "--value-size", str(cfg.value_size), "--seed", str(cfg.seed),
            "--get-passes", str(cfg.get_passes), "--mix-ops", str(cfg.mix_ops), "--mix-procs", "1,2",
            "--incr-ops", str(cfg.incr_ops), "--counters", str(cfg.counters),
            "--cache-size", str(cfg.cache_size), "--page-size", str(cfg.page_size),
            "--retention-cache-size", str(cfg.retention_cache_size),
            "--fills", ",".join(str(f) for f in cfg.fills),
            "--min-size", str(cfg.min_size), "--max-size", str(cfg.max_size)]


def run_perl(cfg: Config, workload_dir: str, tmp: str, serializer: str, phases: str,
             timeout: float) -> dict[str, Any]:
    cmd = perl_args(cfg, workload_dir, tmp) + ["--serializer", serializer, "--phases", phases]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"bench_fastmmap.pl failed ({p.returncode}): {p.stderr.strip()}")
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def retention_mmap(cfg: Config, wl: Workload, tmp: str) -> dict[str, dict[str, Any]]:
    from prefork_sessions import NEVER, MmapStore

    out: dict[str, dict[str, Any]] = {}
    for fill in cfg.fills:
        path = os.path.join(tmp, f"retention-{fill}")
        with MmapStore(path, cache_size=cfg.retention_cache_size, page_size=cfg.page_size,
                       expire=NEVER, serializer="raw") as st:
            limit = fill * cfg.retention_cache_size
            nbytes, inserted = 0, []
            for k, size in wl.retention:
                if nbytes >= limit:
                    break
                st.set(k, b"r" * size)
                nbytes += len(k) + size
                inserted.append(k)
            kept = sum(1 for k in inserted if st.get(k) is not None)
            stats = st.stats()
        os.unlink(path)
        out[f"{fill:.2f}"] = {"inserted": len(inserted), "kept": kept, "bytes": nbytes,
                              "evictions": stats.get("evictions")}
    return out


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
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
    versions = {}
    for mod in ("orjson", "diskcache", "lmdb", "redis"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        versions["redis-server"] = subprocess.run(
            ["redis-server", "--version"], check=False, capture_output=True, text=True, timeout=10
        ).stdout.split("v=")[1].split()[0]
    with contextlib.suppress(Exception):
        versions["Cache::FastMmap"] = subprocess.run(
            ["perl", "-MCache::FastMmap", "-e", "print $Cache::FastMmap::VERSION"],
            check=False, capture_output=True, text=True, timeout=10).stdout.strip() or "missing"
    info["versions"] = versions
    return info


def store_build() -> str:
    """Which MmapStore is measured: where from, git commit (+dirty), compiled helpers loaded."""
    try:
        import prefork_sessions
    except ImportError as e:
        return f"not importable ({e})"
    where = os.path.dirname(prefork_sessions.__file__)
    desc = "?"
    with contextlib.suppress(Exception):
        git = ["git", "-C", where]
        sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "."], check=False, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        desc = f"git {sha}{' + uncommitted changes' if dirty else ''}" if sha else "not a git checkout"
    ext = sorted(name for name, mod in sys.modules.items()
                 if name.startswith("prefork_sessions.") and str(getattr(mod, "__file__", "")).endswith(".so"))
    return f"{where} ({desc}); compiled modules loaded: {', '.join(ext) or 'none'}"


def machine_line(m: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    return (f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['kernel']}, "
            f"Python {m['python']}; {v}")


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def summarise(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """ops/s (aggregate) and us/op (mean wall time per op within one process)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, ops in results.items():
        out[label] = {}
        for op, r in ops.items():
            per = r.get("per_proc") or [r["secs"]]
            per_proc_ops = r["ops"] / len(per)
            out[label][op] = {"ops_per_s": r["ops"] / r["secs"],
                              "us_per_op": 1e6 * (sum(per) / len(per)) / per_proc_ops}
    return out


def ratios_and_targets(summary: dict[str, Any], pair_of: dict[str, str],
                       retention: dict[str, Any]) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    ratios: dict[str, dict[str, float]] = {}
    for peer, mine in pair_of.items():
        if peer in summary and mine in summary:
            ratios[peer] = {op: summary[mine][op]["ops_per_s"] / summary[peer][op]["ops_per_s"]
                            for op in OPS if op in summary[peer] and op in summary[mine]}
    targets = []
    for peer in ("Cache::FastMmap (raw_values)", "Cache::FastMmap (Storable)"):
        for op, want in TARGETS.items():
            got = ratios.get(peer, {}).get(op)
            targets.append({"what": f"{OP_TITLES[op]} vs {peer}", "target": f">= {want:.1f}x",
                            "value": None if got is None else round(got, 3),
                            "pass": None if got is None else got >= want})
    fill, want_pct = RETENTION_TARGET
    r = retention.get("MmapStore (raw)", {}).get(f"{fill:.2f}")
    pct = 100.0 * r["kept"] / r["inserted"] if r else None
    targets.append({"what": f"MmapStore retention at {fill:.0%} fill", "target": f">= {want_pct}%",
                    "value": None if pct is None else round(pct, 3),
                    "pass": None if pct is None else pct >= want_pct})
    return ratios, targets


def render(report: dict[str, Any]) -> str:
    o = io.StringIO()
    cfg = report["config"]

    def p(*a: object) -> None:
        print(*a, file=o)

    p(machine_line(report["machine"]))
    p(f"MmapStore: {report['store_build']}")
    la = report["load_average"]
    p(f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in la['start'])}, at end "
      f"{'/'.join(f'{x:.2f}' for x in la['end'])}: other work on this machine skews the figures")
    p(f"Workload: {cfg['keys']:,} keys session:<32 hex>, {cfg['value_size']} B values; get x{cfg['get_passes']} "
      f"passes; mix {cfg['mix_ops']:,} ops/proc; {cfg['incr_ops']:,} increments over {cfg['counters']} "
      f"counters; cache {cfg['cache_size'] // MIB} MiB, page {cfg['page_size'] // 1024} KiB; median of "
      f"{cfg['repeat']} interleaved rounds; seed {cfg['seed']}")
    p()
    summary, ratios, pair_of = report["summary"], report["ratios"], report["pair_of"]
    labels = [lb for lb in report["order"] if lb in summary]
    incr_how = report["incr_how"]
    shown = {lb: f"{lb} [{incr_how[lb]}]" for lb in labels if incr_how.get(lb)}
    lw = max([len(x) for x in shown.values()] + [len(lb) for lb in labels] + [24])
    p(f"| {'operation':<22} | {'store':<{lw}} | {'ops/s':>11} | {'us/op':>7} | {'Mmap/peer':>9} | target       |")
    p(f"|{'-' * 24}|{'-' * (lw + 2)}|{'-' * 13}|{'-' * 9}|{'-' * 11}|--------------|")
    for op in OPS:
        first = True
        for lb in labels:
            r = summary[lb].get(op)
            if r is None:
                continue
            ratio = ratios.get(lb, {}).get(op)
            tgt = ""
            if ratio is not None and lb.startswith("Cache::FastMmap") and op in TARGETS:
                tgt = f">={TARGETS[op]:.1f}x {'PASS' if ratio >= TARGETS[op] else 'FAIL'}"
            name = OP_TITLES[op] if first else ""
            lbx = shown.get(lb, lb) if op == "incr" else lb
            rs = "" if lb not in pair_of else ("n/a" if ratio is None else f"{ratio:.2f}x")
            p(f"| {name:<22} | {lbx:<{lw}} | {fmt_rate(r['ops_per_s']):>11} | {r['us_per_op']:>7.2f} | "
              f"{rs:>9} | {tgt:<12} |")
            first = False
    p()
    p("Ratios: MmapStore (raw) vs Cache::FastMmap (raw_values), diskcache, lmdb, redis; "
      "MmapStore (json) vs Cache::FastMmap (Storable). us/op: wall time per op within one process.")
    ret = report["retention"]
    if ret:
        p()
        p(f"Retention: {cfg['retention_cache_size'] // MIB} MiB cache, {cfg['page_size'] // 1024} KiB pages, "
          f"never-expiring values of {cfg['min_size']}-{cfg['max_size']} B (seed {cfg['seed']}), "
          "filled until inserted key+value bytes reach the fill")
        p(f"| {'store':<{lw}} | fill | inserted |   kept | % kept  | target       |")
        p(f"|{'-' * (lw + 2)}|------|----------|--------|---------|--------------|")
        fill_t, want = RETENTION_TARGET
        for lb, fills in ret.items():
            for fill, r in sorted(fills.items(), reverse=True):
                pct = 100.0 * r["kept"] / r["inserted"]
                tgt = ""
                if lb.startswith("MmapStore") and fill == f"{fill_t:.2f}":
                    tgt = f">={want}% {'PASS' if pct >= want else 'FAIL'}"
                p(f"| {lb:<{lw}} | {float(fill):>4.0%} | {r['inserted']:>8,} | {r['kept']:>6,} | {pct:6.2f}% | "
                  f"{tgt:<12} |")
    p()
    p("Targets (MmapStore/Cache::FastMmap in this run):")
    for t in report["targets"]:
        mark = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        val = "n/a" if t["value"] is None else (f"{t['value']:.2f}%" if "retention" in t["what"]
                                                 else f"{t['value']:.2f}x")
        p(f"  [{mark}] {t['what']}: {val} (target {t['target']})")
    for e in report["errors"]:
        p(f"  [skipped] {e}")
    return o.getvalue()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, help="number of session keys (default 10000)")
    ap.add_argument("--value-size", type=int, help="value size in bytes (default 1024)")
    ap.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    ap.add_argument("--repeat", type=int, help="interleaved rounds; each figure is their median (default 3)")
    ap.add_argument("--only", help=f"comma list of stores: {','.join(STORES)} (default all)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    ap.add_argument("--timeout", type=float, help="abort the whole run after this many seconds (default 900)")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile MmapStore (raw) set/get/mix and print the top functions")
    ns = ap.parse_args(argv)
    cfg = Config()
    if ns.quick:
        cfg = Config(keys=500, repeat=1, get_passes=2, mix_ops=2_000, incr_ops=1_000, counters=20,
                     cache_size=16 * MIB, retention_cache_size=4 * MIB, timeout=300.0)
    for name in ("keys", "value_size", "repeat", "timeout"):
        if getattr(ns, name) is not None:
            setattr(cfg, name, getattr(ns, name))
    cfg.seed = ns.seed
    if cfg.keys < 1 or cfg.repeat < 1 or cfg.value_size < 1:
        ap.error("--keys, --value-size and --repeat must be positive")
    # Room for every key four times over (with per-entry overhead), so gets never miss.
    need = 4 * cfg.keys * (cfg.value_size + 128)
    while cfg.cache_size < need:
        cfg.cache_size *= 2
    if ns.only:
        only = tuple(s.strip().lower() for s in ns.only.split(",") if s.strip())
        bad = [s for s in only if s not in STORES]
        if bad:
            ap.error(f"--only: unknown store(s) {', '.join(bad)}; choose from {', '.join(STORES)}")
        cfg.only = only
    return cfg, ns


def median(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per operation, the run with the median throughput (the lower middle one for an
    even count): a typical figure, where the best one flatters whoever got a quiet moment."""
    out = {}
    for op in runs[0]:
        ranked = sorted((r[op] for r in runs), key=lambda r: r["ops"] / r["secs"])
        out[op] = ranked[(len(ranked) - 1) // 2]
    return out


def profile_mmap(cfg: Config, wl: Workload, tmp: str) -> str:
    a = MmapAdapter(cfg, tmp, b"x" * cfg.value_size, "raw")
    a.open()
    try:
        prof = cProfile.Profile()
        prof.enable()
        for k in wl.keys:
            a.set(k, a.value)
        for _ in range(cfg.get_passes):
            for k in wl.keys:
                a.get(k)
        mix_loop(a.get, a.set, wl.keys, a.value, wl.mix[0])
        prof.disable()
    finally:
        a.close()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    return s.getvalue()


def main(argv: list[str] | None = None) -> int:
    cfg, ns = parse_args(argv)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise Overtime(f"benchmark exceeded --timeout {cfg.timeout:.0f}s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(cfg.timeout)))
    deadline = time.monotonic() + cfg.timeout
    tmp = tempfile.mkdtemp(prefix="bench_store-")
    try:
        return run(cfg, ns, tmp, deadline)
    except Overtime as e:
        print(f"bench_store: {e}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
        shutil.rmtree(tmp, ignore_errors=True)


def run(cfg: Config, ns: argparse.Namespace, tmp: str, deadline: float) -> int:
    m = machine()
    load_start = os.getloadavg()
    wl = make_workload(cfg)
    wdir = os.path.join(tmp, "workload")
    os.mkdir(wdir)
    write_workload(wl, wdir)
    raw_value = b"x" * cfg.value_size
    obj_value = {"data": "x" * cfg.value_size}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    retention: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    incr_how: dict[str, str] = {}
    pair_of = {"Cache::FastMmap (raw_values)": "MmapStore (raw)", "Cache::FastMmap (Storable)": "MmapStore (json)",
               "diskcache": "MmapStore (raw)", "lmdb": "MmapStore (raw)", "redis": "MmapStore (raw)"}
    order = ["MmapStore (raw)", "Cache::FastMmap (raw_values)", "MmapStore (json)", "Cache::FastMmap (Storable)",
             "diskcache", "lmdb", "redis"]
    def log(*a: object) -> None:
        if not ns.json:
            print(*a, file=sys.stderr, flush=True)

    # Repeats are interleaved (round 1 of every store, then round 2, ...) so a burst of
    # outside load lands on several stores rather than on all runs of one.
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {}
    failed: set[str] = set()

    def attempt(name: str, fn: Callable[[], None]) -> None:
        if name in failed:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001  one store failing must not cost the others' figures
            failed.add(name)
            errors.append(f"{name}: {type(e).__name__}: {e}")
            log(f"  {name} skipped: {type(e).__name__}: {e}")

    def python_once(a: Adapter) -> Callable[[], None]:
        incr_how[a.label] = a.incr_how

        def once() -> None:
            runs.setdefault(a.label, []).append(run_python(a, wl, cfg))
        return once

    def perl_once(ser: str, label: str) -> Callable[[], None]:
        incr_how[label] = "get_and_set"

        def once() -> None:
            left = max(1.0, deadline - time.monotonic())
            runs.setdefault(label, []).append(run_perl(cfg, wdir, tmp, ser, "ops", left)["results"])
        return once

    with contextlib.ExitStack() as stack:
        plan: list[tuple[str, str, Callable[[], None]]] = []  # (store, label, one run)
        if "mmapstore" in cfg.only:
            try:
                import prefork_sessions  # noqa: F401
            except Exception as e:  # noqa: BLE001  (reported in the table, others still run)
                failed.add("mmapstore")
                errors.append(f"mmapstore: {type(e).__name__}: {e}")
            else:
                for value, ser in ((raw_value, "raw"), (obj_value, "json")):
                    ma = MmapAdapter(cfg, tmp, value, ser)
                    plan.append(("mmapstore", ma.label, python_once(ma)))
        if "fastmmap" in cfg.only:
            for ser, label in (("raw", "Cache::FastMmap (raw_values)"), ("storable", "Cache::FastMmap (Storable)")):
                plan.append(("fastmmap", label, perl_once(ser, label)))
        if "diskcache" in cfg.only:
            da = DiskcacheAdapter(cfg, tmp, raw_value)
            plan.append(("diskcache", da.label, python_once(da)))
        if "lmdb" in cfg.only:
            la = LmdbAdapter(cfg, tmp, raw_value)
            plan.append(("lmdb", la.label, python_once(la)))
        if "redis" in cfg.only:
            try:
                port = stack.enter_context(redis_server(tmp))
            except Exception as e:  # noqa: BLE001  (reported in the table, others still run)
                failed.add("redis")
                errors.append(f"redis: {type(e).__name__}: {e}")
            else:
                ra = RedisAdapter(cfg, tmp, raw_value, port)
                plan.append(("redis", ra.label, python_once(ra)))
        for i in range(cfg.repeat):
            for store, label, once in plan:
                log(f"  round {i + 1}/{cfg.repeat}: {label}")
                attempt(store, once)
    for label, rs in runs.items():
        store = next(st for st, lb, _ in plan if lb == label)
        if store not in failed:
            results[label] = median(rs)

    if "mmapstore" in cfg.only:
        attempt("mmapstore", lambda: retention.__setitem__("MmapStore (raw)", retention_mmap(cfg, wl, tmp)))
    if "fastmmap" in cfg.only:
        attempt("fastmmap", lambda: retention.__setitem__("Cache::FastMmap (raw_values)", run_perl(
            cfg, wdir, tmp, "raw", "retention", max(1.0, deadline - time.monotonic()))["results"]["retention"]))

    # Perl prints fill keys as given ("0.85"); normalise to two decimals.
    retention = {lb: {f"{float(k):.2f}": v for k, v in f.items()} for lb, f in retention.items()}
    summary = summarise(results)
    ratios, targets = ratios_and_targets(summary, pair_of, retention)
    cfg_d = asdict(cfg)
    report = {"machine": m, "config": cfg_d, "summary": summary, "raw": results, "ratios": ratios,
              "retention": retention, "targets": targets, "errors": errors, "pair_of": pair_of,
              "order": order, "incr_how": incr_how, "store_build": store_build(),
              "load_average": {"start": load_start, "end": os.getloadavg()}}
    if ns.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render(report), end="")
    if ns.profile and "mmapstore" in cfg.only:
        print("\ncProfile of MmapStore (raw): set all keys, get passes, 1-process mix")
        print(profile_mmap(cfg, wl, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
