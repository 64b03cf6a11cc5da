#!/usr/bin/env python3
"""HTTP benchmark: what a session costs a real gunicorn app, side by side in one run.

Three suites, each its own table with its own baseline (--suite, default all):

  werkzeug  a plain werkzeug hello-world (the baseline); the session layer on
            MmapStore with the session only read, and with a counter written
            every request; that counter on diskcache and on a real redis-server;
            and the werkzeug demo itself (prefork_sessions.demo, gunicorn_conf.py's
            default app), which writes its counter on every GET /.
  flask     Flask's default signed-cookie session (the baseline, no server
            state); Flask with prefork_sessions.flask.init_app on MmapStore;
            Flask-Session on redis-server and on cachelib's FileSystemCache.
  django    Django's signed_cookies engine (the baseline); prefork_sessions.django
            on MmapStore; Django's cache (LocMemCache), file and db (sqlite) engines.
  redis     both on one redis-server: Flask-Session (the baseline) and the
            werkzeug demo on RedisStore (gunicorn_conf.py with
            PREFORK_SESSIONS_REDIS_URL), each writing its counter every request
            (stress/bench_redis.py runs this suite after its store figures).

Every Flask and Django engine runs twice: a counter written on every request,
and the session only read; each is compared with the baseline of its kind.

Each variant is its own ``gunicorn -c gunicorn_conf.py`` with 2 sync workers on
127.0.0.1 (tests/_live.py starts it; --threads N runs gthread workers, as
gunicorn_conf.py does by default), serving an app of stress/bench_apps.py or
stress/bench_django_app.py.  redis-server is private (a free loopback port, no
persistence, always stopped).  Load: wrk with a Lua script giving every
request one of --sessions cookies obtained beforehand, or, where wrk is missing
or with --loader python, a bounded Python load generator.  A suite's variants
are measured in turn, --rounds times, interleaved (the order rotating), so each
round's ratio to the baseline compares runs seconds apart; the table gives the
median requests/s and the median of the per-round ratios (robust to other load
on the machine coming and going), and the CPU time the workers spent per
request (from /proc, user + system) with the baseline's divided by it: the
throughput ratio the variants would have if the workers had the CPUs to
themselves, which other load on the machine barely moves.

Sessions are checked, not assumed: every worker tallies the measured requests
that found no session (a broken session, or one kept per process); after the
rounds each written counter must have grown by the requests answered, each
read one must be unchanged, and a client that keeps its cookie (one connection
per request, so the workers take turns) must see its counter count.

Prints the tables, the targets (werkzeug: read >= 0.95x, counter and demo >=
0.85x hello-world; Flask and Django: ours >= 0.9x the signed-cookie baseline,
>= 2x Flask-Session and Django's db engine; redis: the demo >= 1.5x
Flask-Session) with PASS/FAIL marks, and the
machine.  Exit status 1 when a run broke (non-2xx answers, socket errors, no
requests, a session that did not hold, a server that would not start); a
missed target fails the exit status only with --enforce-targets.

    python stress/bench_http.py --seconds 6 --rounds 5
    python stress/bench_http.py --suite flask --only flask-ours --profile flask-ours
    python stress/bench_http.py --suite werkzeug --only demo --threads 4
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as C
from _live import LiveGunicorn, request  # tests/_live.py: the shared live-gunicorn helper
from bench_store import machine, machine_line, redis_server  # stress/bench_store.py

BROWSER_REQUESTS = 6  # requests of the cookie-keeping client after the rounds


@dataclass(frozen=True)
class Variant:
    key: str
    suite: str
    label: str
    baseline: str  # the variant this one's ratios divide by
    cookie: str = ""  # the session cookie's name ("" for no session)
    state: str = "server"  # where sessions live: server (shared), cookie, process, none
    write: bool = True  # the measured request writes the session
    app: str = ""  # PREFORK_SESSIONS_APP; default bench_apps:make("<key>")
    init: str = "/init"  # starts a session (answers {"visits": 1})
    peek: str = "/peek"  # reads the counter; the demo's own page increments it
    tally: bool = True  # the app tallies requests without a session
    redis: bool = False  # sessions on the private redis-server (PREFORK_SESSIONS_REDIS_URL points at it)


def _variants() -> list[Variant]:
    out = [
        Variant("hello", "werkzeug", "hello-world (no session)", "hello", state="none", write=False,
                tally=False),
        Variant("read", "werkzeug", "session read, MmapStore", "hello", "session_id", write=False),
        Variant("counter", "werkzeug", "session written every request, MmapStore", "hello", "session_id"),
        Variant("diskcache", "werkzeug", "session written every request, diskcache", "hello", "session_id"),
        Variant("redis", "werkzeug", "session written every request, redis-server", "hello", "session_id",
                redis=True),
        Variant("demo", "werkzeug", "werkzeug demo (prefork_sessions.demo), written every request", "hello",
                "session_id", app="werkzeug", init="/", peek="/", tally=False),
    ]
    engines = {
        "flask": [("cookie", "Flask signed-cookie session (default)", "cookie"),
                  ("ours", "Flask, prefork_sessions on MmapStore", "server"),
                  ("redis", "Flask-Session, redis-server", "server"),
                  ("cachelib", "Flask-Session, cachelib FileSystemCache", "server")],
        "django": [("cookie", "Django signed_cookies", "cookie"),
                   ("ours", "Django, prefork_sessions on MmapStore", "server"),
                   ("cache", "Django cache (LocMemCache, per process)", "process"),
                   ("file", "Django file", "server"),
                   ("db", "Django db (sqlite)", "server")],
    }
    for suite, names in engines.items():
        cookie = "session" if suite == "flask" else "sessionid"
        for write in (True, False):
            suffix, what = ("", "written every request") if write else ("-read", "read")
            for name, label, state in names:
                out.append(Variant(f"{suite}-{name}{suffix}", suite, f"{label}, {what}",
                                   f"{suite}-cookie{suffix}", cookie, state, write, redis=name == "redis"))
    out += [
        Variant("redis-flask-session", "redis", "Flask-Session, redis-server, written every request",
                "redis-flask-session", "session", app='bench_apps:make("flask-redis")', redis=True),
        Variant("redis-demo", "redis", "werkzeug demo on RedisStore, written every request",
                "redis-flask-session", "session_id", app="werkzeug", init="/", peek="/", tally=False, redis=True),
    ]
    return out


VARIANTS = {v.key: v for v in _variants()}
SUITES = ("werkzeug", "flask", "django", "redis")
# (variant, reference, minimum of variant / reference)
TARGETS = [("read", "hello", 0.95), ("counter", "hello", 0.85), ("demo", "hello", 0.85)] + [
    (f"{s}-ours{m}", f"{s}-{peer}{m}", ratio)
    for s, peers in (("flask", (("cookie", 0.9), ("redis", 2.0), ("cachelib", 2.0))),
                     ("django", (("cookie", 0.9), ("db", 2.0))))
    for m in ("", "-read") for peer, ratio in peers
] + [("redis-demo", "redis-flask-session", 1.5)]

LUA = """
local cookies = {%s}
local step = %d
local n = 0
function setup(thread)
  thread:set("id", n)
  n = n + 1
end
function init(args)
  i = (id or 0) * step  -- wrk threads start apart in the cookie list
end
request = function()
  i = i + 1
  return wrk.format("GET", "/", {["Cookie"] = "%s=" .. cookies[(i %% #cookies) + 1]})
end
"""


def workers_cpu(master: int) -> float:
    """CPU seconds (user + system) used so far by the master's worker processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        with open(f"/proc/{master}/task/{master}/children") as f:
            pids = f.read().split()
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def cookie_of(headers: http.client.HTTPMessage, name: str) -> str | None:
    for h in headers.get_all("Set-Cookie") or []:
        key, _, rest = h.partition("=")
        if key.strip() == name:
            return rest.split(";", 1)[0]
    return None


def visits(body: bytes, what: str) -> int:
    try:
        return int(json.loads(body)["visits"])
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"{what}: no visits count in {body[:300]!r}") from None


def cookies_for(port: int, v: Variant, n: int) -> list[str]:
    """Start ``n`` sessions (GET v.init, each answering visits 1) and return their cookies."""
    out = []
    for _ in range(n):
        status, headers, body = request(port, v.init, headers={"Accept": "application/json"})
        if status != 200:
            raise RuntimeError(f"GET {v.init} answered {status}: {body[:300]!r}")
        cookie = cookie_of(headers, v.cookie)
        if cookie is None:
            raise RuntimeError(f"GET {v.init} set no {v.cookie} cookie: {headers.get_all('Set-Cookie')}")
        if '"' in cookie or "\\" in cookie:
            raise RuntimeError(f"cookie {cookie!r} cannot go into the Lua script as it is")
        if visits(body, f"GET {v.init}") != 1:
            raise RuntimeError(f"GET {v.init} of a new session answered {body[:300]!r}, not visits 1")
        out.append(cookie)
    return out


def browser_check(port: int, v: Variant) -> tuple[bool, str]:
    """A client that keeps its cookie, one connection per request: does its count count?"""
    cookie = cookies_for(port, v, 1)[0]
    seen = []
    for _ in range(BROWSER_REQUESTS):
        status, headers, body = request(port, "/", headers={"Cookie": f"{v.cookie}={cookie}",
                                                            "Accept": "application/json"})
        if status != 200:
            return False, f"GET / answered {status}"
        seen.append(visits(body, "GET /"))
        cookie = cookie_of(headers, v.cookie) or cookie
    want = list(range(2, BROWSER_REQUESTS + 2)) if v.write else [1] * BROWSER_REQUESTS
    return seen == want, f"visits {seen}, expected {want}"


def run_wrk(port: int, cookies: list[str], v: Variant, ns: argparse.Namespace, seconds: float,
            workdir: Path) -> dict[str, Any]:
    script = workdir / "cookies.lua"
    quoted = ", ".join(f'"{c}"' for c in cookies or ["none"])
    script.write_text(LUA % (quoted, max(1, len(cookies) // ns.wrk_threads), v.cookie or "none"))
    cmd = ["wrk", "-t", str(ns.wrk_threads), "-c", str(ns.connections), "-d", f"{max(1, round(seconds))}s",
           "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}/"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr or p.stdout}")
    out = p.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not rate or not total:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return {"rate": float(rate.group(1)), "requests": int(total.group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": dict(zip(("connect", "read", "write", "timeout"),
                               map(int, errs.groups()))) if errs else {}}


def _py_loader(port: int, cookie: str, cookies: list[str], seconds: float, offset: int, q: Any) -> None:
    n = bad = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        headers = {"Cookie": f"{cookie}={cookies[(n + offset) % len(cookies)]}"} if cookies else {}
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers=headers)
            r = conn.getresponse()
            r.read()
            conn.close()
            n += 1
            bad += not 200 <= r.status < 400
        except OSError:
            errors += 1
    q.put((n, bad, errors))


def run_python(port: int, cookies: list[str], v: Variant, ns: argparse.Namespace,
               seconds: float) -> dict[str, Any]:
    """Bounded fallback: --connections processes, each one request at a time for ``seconds``,
    each starting at its own part of the cookie list (so one session is rarely in two at once)."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    step = max(1, len(cookies) // ns.connections)
    procs = [ctx.Process(target=_py_loader, args=(port, v.cookie, cookies, seconds, i * step, q))
             for i in range(ns.connections)]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 30) for _ in procs]
    elapsed = time.monotonic() - start
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    n = sum(r[0] for r in results)
    return {"rate": n / elapsed, "requests": n, "non2xx": sum(r[1] for r in results),
            "errors": {"python": sum(r[2] for r in results)}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=[*SUITES, "all"], default="all",
                   help="which table(s): werkzeug, flask, django, redis or all [all]")
    p.add_argument("--processes", "--workers", type=int, default=2, help="gunicorn workers [2]")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per worker: 1 sync workers, >1 gthread (gunicorn_conf.py's default: 4) [1]")
    p.add_argument("--seconds", type=float, default=6, help="seconds of load per measurement [6]")
    p.add_argument("--warmup", type=float, default=1, help="seconds of load before each [1]")
    p.add_argument("--rounds", type=int, default=5, help="measurements per variant; medians reported [5]")
    p.add_argument("--connections", type=int, default=8, help="concurrent connections [8]")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads [1]")
    p.add_argument("--sessions", type=int, default=64, help="distinct session cookies [64]")
    p.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto",
                   help="load generator: wrk if installed, else python [auto]")
    p.add_argument("--only", default="",
                   help="comma-separated variants (each suite's baselines always run): "
                        + ",".join(VARIANTS))
    p.add_argument("--enforce-targets", action="store_true",
                   help="exit 1 when a ratio misses its target")
    p.add_argument("--inprocess", type=int, default=5000, metavar="N",
                   help="also time each app called in-process, at most N calls (0: skip) [5000]")
    p.add_argument("--profile", choices=[v for v in VARIANTS if v != "hello"],
                   help="also cProfile one worker of this variant and print the top functions")
    C.add_common_args(p, timeout=3600)
    ns = p.parse_args(argv)
    suites = SUITES if ns.suite == "all" else (ns.suite,)
    only = [v for v in ns.only.split(",") if v]
    unknown = set(only) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    chosen = [k for k, v in VARIANTS.items() if v.suite in suites and (not only or k in only)]
    if not chosen:
        p.error(f"--only {ns.only} names no variant of --suite {ns.suite}")
    wanted = set(chosen) | {VARIANTS[k].baseline for k in chosen}
    ns.only = [k for k in VARIANTS if k in wanted]  # the registry's order, baselines first
    if ns.profile and ns.profile not in ns.only:
        p.error(f"--profile {ns.profile}: not among the variants run")
    if ns.loader == "auto":
        ns.loader = "wrk" if shutil.which("wrk") else "python"
    elif ns.loader == "wrk" and not shutil.which("wrk"):
        p.error("wrk is not installed (Debian: apt-get install wrk); use --loader python")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    servers: list[LiveGunicorn] = []

    def stop_all() -> None:
        for s in servers:
            s.stop()

    C.hard_timeout(ns.timeout, "bench_http", cleanup=stop_all)
    with tempfile.TemporaryDirectory(prefix="stress-bench-http-", dir=ns.dir) as tmp, \
            contextlib.ExitStack() as stack:
        redis = any(VARIANTS[k].redis for k in ns.only)
        env = base_env(stack.enter_context(redis_server(tmp)) if redis else None)
        status = 0
        for suite in SUITES:
            variants = [VARIANTS[k] for k in ns.only if VARIANTS[k].suite == suite]
            if variants:
                try:
                    status |= run_suite(ns, suite, variants, Path(tmp), env, servers)
                finally:
                    stop_all()
                    servers.clear()
        return status


def base_env(redis_port: int | None) -> dict[str, str]:
    """What every server's environment adds: stress/ and the checkout on PYTHONPATH, one
    secret, and the private redis-server's port (BENCH_REDIS_PORT) when there is one."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(C.HERE), str(C.REPO), os.environ.get("PYTHONPATH")])),
           "BENCH_SECRET": secrets.token_hex(32)}  # Flask's and Django's SECRET_KEY, every worker
    if redis_port is not None:
        env["BENCH_REDIS_PORT"] = str(redis_port)
    return env


def server_env(v: Variant, tmp: Path, env: dict[str, str]) -> dict[str, str]:
    """The environment of ``v``'s server: its own files under tmp/<key>."""
    d = tmp / v.key
    (d / "tally").mkdir(parents=True, exist_ok=True)
    out = dict(env, BENCH_TALLY_DIR=str(d / "tally"), BENCH_DISKCACHE_DIR=str(d / "diskcache"),
               BENCH_CACHELIB_DIR=str(d / "cachelib"), BENCH_DJANGO_FILES=str(d / "files"),
               BENCH_DJANGO_DB=str(d / "db.sqlite3"), BENCH_DJANGO_VARIANT=v.key)
    (d / "files").mkdir(exist_ok=True)
    if v.redis:  # the demo's store, and the gunicorn hook's check, on the private redis-server
        out["PREFORK_SESSIONS_REDIS_URL"] = f"redis://127.0.0.1:{int(env['BENCH_REDIS_PORT'])}/0"
    return out


def migrate(v: Variant, tmp: Path, env: dict[str, str]) -> None:
    """Django's sessions table in ``v``'s sqlite file, before its server starts."""
    run_env = dict(os.environ, **env, PREFORK_SESSIONS_PATH=str(tmp / v.key / "sessions.store"))
    p = subprocess.run([sys.executable, "-c", "import bench_django_app as m; m.migrate()"],
                       env=run_env, cwd=C.HERE, capture_output=True, text=True, timeout=120, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{v.key}: migrate failed ({p.returncode}):\n{p.stderr[-3000:]}")


def run_suite(ns: argparse.Namespace, suite: str, variants: list[Variant], tmp: Path,
              base_env: dict[str, str], servers: list[LiveGunicorn],
              summary: dict[str, Any] | None = None) -> int:
    """Measure ``variants``, print the suite's table; 1 when a run broke.  ``summary``,
    if given, receives each variant's medians and the targets (stress/bench_redis.py)."""
    kind = "sync" if ns.threads == 1 else f"gthread ({ns.threads} threads)"
    report = C.Report(
        f"bench_http, {suite}: gunicorn -c gunicorn_conf.py, {ns.processes} {kind} workers, {ns.loader} "
        f"({ns.connections} connections, {ns.sessions} sessions), median of {ns.rounds} rounds x "
        f"{ns.seconds:g} s",
        ["variant", "requests/s", "x baseline", "worker CPU us/req", "x baseline by CPU",
         "requests", "no session found", "non-2xx", "socket errors"],
    )
    envs = {v.key: server_env(v, tmp, base_env) for v in variants}

    def start(v: Variant) -> tuple[LiveGunicorn, list[str]]:
        if v.key.startswith("django-db"):
            migrate(v, tmp, envs[v.key])
        server = LiveGunicorn(tmp / v.key, workers=ns.processes, threads=ns.threads,
                              app=v.app or f'bench_apps:make("{v.key}")', store_size=64 << 20,
                              env=envs[v.key])
        servers.append(server)
        server.start()
        try:
            return server, cookies_for(server.port, v, ns.sessions) if v.cookie else []
        except RuntimeError as e:
            raise RuntimeError(f"{v.key}: {e}\n{server.log_tail()}") from None

    with ThreadPoolExecutor(4) as pool:  # a few at once: start-up is mostly imports
        by_variant = dict(zip((v.key for v in variants), pool.map(start, variants)))

    results: dict[str, list[dict[str, Any]]] = {v.key: [] for v in variants}
    loaded = {v.key: [0, 0] for v in variants}  # requests answered, loads run (each may leave some in flight)
    for rnd in range(ns.rounds):
        for v in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
            server, cookies = by_variant[v.key]

            def load(s: float, v: Variant = v, server: LiveGunicorn = server,
                     cookies: list[str] = cookies) -> dict[str, Any]:
                r = (run_wrk(server.port, cookies, v, ns, s, tmp / v.key) if ns.loader == "wrk"
                     else run_python(server.port, cookies, v, ns, s))
                loaded[v.key][0] += r["requests"]
                loaded[v.key][1] += 1
                return r

            if ns.warmup > 0:
                load(ns.warmup)
            assert server.proc is not None
            cpu0 = workers_cpu(server.proc.pid)
            r = load(ns.seconds)
            r["cpu_us"] = (workers_cpu(server.proc.pid) - cpu0) / max(r["requests"], 1) * 1e6
            results[v.key].append(r)

    checks = {v.key: session_checks(v, *by_variant[v.key], loaded[v.key], ns) for v in variants}
    profile = profile_worker(ns, tmp, envs[ns.profile]) if ns.profile in envs else ""
    with ThreadPoolExecutor(4) as pool:  # each stop waits for its workers to exit
        list(pool.map(lambda v: by_variant[v.key][0].stop(), variants))
    for v in variants:
        tally = tallies(v, tmp, loaded[v.key], ns)
        checks[v.key]["checks"] += tally.pop("checks", [])
        checks[v.key].update(tally)
    inproc = inprocess_costs(variants, tmp, envs, ns.inprocess) if ns.inprocess else ""

    def median_ratio(a: str, b: str, field: str = "rate") -> float:
        pairs = zip(results[a], results[b])
        if field == "rate":
            return statistics.median(x["rate"] / y["rate"] if y["rate"] else 0.0 for x, y in pairs)
        return statistics.median(y["cpu_us"] / x["cpu_us"] if x["cpu_us"] else 0.0 for x, y in pairs)

    for v in variants:
        rs = results[v.key]
        cpu = statistics.median(r["cpu_us"] for r in rs)
        errs = sum(sum(x["errors"].values()) for x in rs)
        label = v.label + (" (baseline)" if v.baseline == v.key else "")
        report.row(label, round(statistics.median(r["rate"] for r in rs)),
                   f"{median_ratio(v.key, v.baseline):.2f}x", round(cpu),
                   f"{median_ratio(v.key, v.baseline, 'cpu'):.2f}x", sum(x["requests"] for x in rs),
                   checks[v.key].get("lost_cell", "-"), sum(x["non2xx"] for x in rs), errs)
        report.check(f"{v.key}: answered requests", all(x["requests"] > 0 for x in rs), "none")
        report.check(f"{v.key}: every answer 2xx", all(x["non2xx"] == 0 for x in rs),
                     f"{sum(x['non2xx'] for x in rs)} non-2xx answers")
        report.check(f"{v.key}: no socket errors", errs == 0, f"{[x['errors'] for x in rs]}")
        for name, ok, why in checks[v.key]["checks"]:
            report.check(f"{v.key}: {name}", ok, why)

    keys = {v.key for v in variants}
    lines = ["| target | by requests/s | by worker CPU | mark |", "|---|---|---|---|"]
    targets = []
    for a, b, want in TARGETS:
        if a in keys and b in keys:
            ratio, by_cpu = median_ratio(a, b), median_ratio(a, b, "cpu")
            mark = "PASS" if ratio >= want else "FAIL"
            lines.append(f"| {a} >= {want:.2f}x {b} | {ratio:.2f}x | {by_cpu:.2f}x | {mark} |")
            targets.append({"target": f"HTTP {a} >= {want:.1f}x {b} (requests/s)", "value": ratio,
                            "ok": ratio >= want, "by_cpu": by_cpu})
            if ns.enforce_targets:
                report.check(f"{a} >= {want:.2f}x {b}", ratio >= want, f"{ratio:.2f}x")
    if len(lines) > 2:
        report.note("targets (median of the per-round ratios):\n\n" + "\n".join(lines))
    report.note("sessions: " + "; ".join(f"{k} {c['summary']}" for k, c in checks.items() if c["summary"]))
    report.note("every round (requests/s): " + "; ".join(
        f"{v.key} " + "/".join(f"{x['rate']:,.0f}" for x in results[v.key]) for v in variants))
    report.note(machine_line(machine(str(tmp))))
    report.note(versions())
    report.note(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if inproc:
        report.note(inproc)
    if profile:
        report.note(profile)
    if summary is not None:
        summary["variants"] = {v.key: {"label": v.label, "rate": statistics.median(r["rate"] for r in results[v.key]),
                                       "cpu_us": statistics.median(r["cpu_us"] for r in results[v.key]),
                                       "ratio": median_ratio(v.key, v.baseline),
                                       "cpu_ratio": median_ratio(v.key, v.baseline, "cpu")} for v in variants}
        summary["targets"] = targets
        summary["table"] = report.render()
    return report.finish()


def session_checks(v: Variant, server: LiveGunicorn, cookies: list[str], loaded: list[int],
                   ns: argparse.Namespace) -> dict[str, Any]:
    """After the rounds: did the sessions hold?  The counters of the loaded cookies, and a
    client that keeps its cookie."""
    out: dict[str, Any] = {"checks": [], "summary": ""}
    if not v.cookie:
        return out
    ok, why = browser_check(server.port, v)
    notes = [f"client keeping its cookie: {'ok' if ok else why}"]
    if v.state != "process":
        out["checks"].append(("a client keeping its cookie sees its session", ok, why))
    counts = []
    for cookie in cookies:
        status, _, body = request(server.port, v.peek, headers={"Cookie": f"{v.cookie}={cookie}",
                                                                "Accept": "application/json"})
        if status != 200:
            raise RuntimeError(f"{v.key}: GET {v.peek} answered {status}: {body[:300]!r}")
        counts.append(visits(body, f"{v.key}: GET {v.peek}") - (v.peek == "/"))  # the demo's page counts
    requests, loads = loaded
    if v.state == "cookie":
        notes.append("state in the cookie, which the loader sends as it got it")
    elif v.write:
        grown, slack = sum(c - 1 for c in counts), ns.connections * loads
        notes.append(f"counters grew by {grown:,} for {requests:,} requests answered "
                     f"(up to {slack:,} more in flight when a load stopped)")
        if v.state == "server" and exclusive(ns):  # at most a few lost to a late request
            out["checks"].append(("counters grew by the requests answered",
                                  requests * 0.999 <= grown <= requests + slack,
                                  f"grew by {grown:,} for {requests:,} requests"))
        elif v.state == "server":  # engines without a merge lose concurrent increments
            out["checks"].append(("counters grew", 0 < grown <= requests + slack,
                                  f"grew by {grown:,} for {requests:,} requests"))
    elif v.state == "server":
        changed = sum(c != 1 for c in counts)
        notes.append(f"{len(counts) - changed} of {len(counts)} read sessions unchanged")
        out["checks"].append(("read sessions unchanged", changed == 0,
                              f"{changed} of {len(counts)} do not read visits 1: {counts[:10]}"))
    out["summary"] = ", ".join(notes)
    return out


def exclusive(ns: argparse.Namespace) -> bool:
    """Whether the load keeps each session to one request at a time (so every increment
    must count): a single wrk thread (or Python loader) rotating through at least twice
    as many cookies as connections."""
    return ns.sessions >= 2 * ns.connections and (ns.loader == "python" or ns.wrk_threads == 1)


def versions() -> str:
    """The versions of what the servers run, beside bench_store's machine line."""
    from importlib import metadata

    found = []
    for dist in ("gunicorn", "Werkzeug", "Flask", "Flask-Session", "cachelib", "msgspec", "Django"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{dist} {metadata.version(dist)}")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
        found.append((wrk.stdout + wrk.stderr).split(" [")[0].strip())
    return "Servers: " + ", ".join(found)


def tallies(v: Variant, tmp: Path, loaded: list[int], ns: argparse.Namespace) -> dict[str, Any]:
    """What the stopped server's workers tallied: requests served, and those without a session."""
    if not v.tally:
        return {}
    found = [json.loads(p.read_text()) for p in sorted((tmp / v.key / "tally").glob("tally-*.json"))]
    served, lost = sum(t["served"] for t in found), sum(t["lost"] for t in found)
    requests, loads = loaded
    low = requests + BROWSER_REQUESTS
    checks = [("every worker tallied", len(found) >= ns.processes,
               f"{len(found)} tallies for {ns.processes} workers"),
              ("the workers served the requests answered", low <= served <= low + ns.connections * loads,
               f"{served:,} served, {low:,} answered")]
    if v.state != "process":
        checks.append(("every request found its session", lost == 0,
                       f"{lost:,} of {served:,} requests found no session"))
    cell = f"{lost:,}" + (f" ({lost / served:.0%})" if lost and served else "")
    return {"checks": checks, "lost_cell": cell}


def bench_apps_name(v: Variant) -> str:
    """The name stress/bench_apps.py builds ``v``'s app by (its key, unless ``v.app`` says otherwise)."""
    made = re.fullmatch(r'bench_apps:make\("([^"]+)"\)', v.app)
    if made:
        return made.group(1)
    return "demo" if v.app == "werkzeug" else v.key


def inprocess_costs(variants: list[Variant], tmp: Path, envs: dict[str, dict[str, str]], n: int) -> str:
    """Microseconds per request of each app called directly (no HTTP, no gunicorn), each in a
    fresh process (Django configures itself once per process); for the werkzeug suite also
    the MmapStore calls a session request makes: where the time goes, free of network noise."""
    cost: dict[str, float] = {}
    failed: dict[str, str] = {}
    groups = [[v] for v in variants if v.suite == "django"]  # Django: one settings per process
    groups += [[v for v in variants if v.suite != "django"]]
    for group in filter(None, groups):
        env = dict(os.environ, **envs[group[0].key], PREFORK_SESSIONS_SIZE=str(64 << 20),
                   BENCH_INPROCESS_DIR=str(tmp / "inprocess"))
        env.pop("BENCH_TALLY_DIR")
        (tmp / "inprocess").mkdir(exist_ok=True)
        names = [bench_apps_name(v) for v in group]
        p = subprocess.run([sys.executable, str(C.HERE / "bench_apps.py"), str(n), *names],
                           env=env, cwd=C.HERE, capture_output=True, text=True, timeout=600, check=False)
        if p.returncode == 0:
            got = json.loads(p.stdout.strip().splitlines()[-1])
            cost.update((v.key, got[name]) for v, name in zip(group, names))
        else:
            failed.update((v.key, (p.stderr.strip().splitlines() or ["?"])[-1]) for v in group)
    lines = []
    for v in variants:
        if v.key in failed:
            lines.append(f"  {v.label:<60} failed: {failed[v.key]}")
            continue
        extra = (f" ({cost[v.key] - cost[v.baseline]:+.1f} over the baseline)"
                 if v.baseline != v.key and v.baseline in cost else "")
        lines.append(f"  {v.label:<60} {cost[v.key]:7.1f} us{extra}")
    if variants[0].suite == "werkzeug":
        import timeit

        from prefork_sessions import MmapStore

        with MmapStore(str(tmp / "probe.store"), cache_size=16 << 20) as store:
            store.set("probe", {"_d": {"visits": 1}, "_e": 0.0, "_f": []})
            for name, fn in (("MmapStore.get(session)", lambda: store.get("probe")),
                             ("MmapStore.get_and_set(session, identity)",
                              lambda: store.get_and_set("probe", lambda x: x))):
                us = min(timeit.repeat(fn, number=n * 5, repeat=3, timer=time.process_time)) / (n * 5) * 1e6
                lines.append(f"  {name:<60} {us:7.1f} us")
    return (f"in-process CPU time per request (app called directly, best of 3 x at most {n}):\n"
            + "\n".join(lines))


def profile_worker(ns: argparse.Namespace, tmp: Path, env: dict[str, str]) -> str:
    """One worker of ns.profile under cProfile for --seconds of load; the top functions."""
    v = VARIANTS[ns.profile]
    out = tmp / "profile.pstats"
    (tmp / "profile" / "tally").mkdir(parents=True, exist_ok=True)
    penv = dict(env, BENCH_PROFILE=str(out), BENCH_TALLY_DIR=str(tmp / "profile" / "tally"))
    server = LiveGunicorn(tmp / "profile", workers=1, threads=ns.threads,
                          app=f'bench_apps:profiled("{ns.profile}")', store_size=64 << 20, env=penv)
    with server:
        cookies = cookies_for(server.port, v, ns.sessions)
        if ns.loader == "wrk":
            run_wrk(server.port, cookies, v, ns, ns.seconds, tmp / "profile")
        else:
            run_python(server.port, cookies, v, ns, ns.seconds)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not out.exists():
        return "profile: the worker wrote no profile"
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(out), stream=buf)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return f"profile of one {ns.profile} worker (by own time, then cumulative):\n{buf.getvalue()}"


if __name__ == "__main__":
    sys.exit(main())
