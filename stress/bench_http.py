#!/usr/bin/env python3
"""HTTP benchmark: what a session costs a real gunicorn app, side by side in one run.

Five servers, each ``gunicorn -c gunicorn_conf.py`` with 2 sync workers on
127.0.0.1 (tests/_live.py starts them), serving the apps of stress/bench_apps.py:
a plain werkzeug hello-world; the session layer on MmapStore with the session
only read; with a counter written every request; and the same counter with the
session layer on diskcache and on a real redis-server (started here on a free
loopback port, no persistence, always stopped).  Each is loaded with wrk (a Lua
script gives every request one of --sessions cookies obtained beforehand), or,
where wrk is missing or with --loader python, a bounded Python load generator.
Variants are measured in turn, --rounds times, interleaved, so each round's
ratio to hello-world compares runs a few seconds apart; the table gives the
median requests/s and the median of the per-round ratios (robust to other load
on the machine coming and going).  It also gives the CPU time the workers spent
per request (from /proc, user + system) and hello-world's CPU per request
divided by it: the throughput ratio the variants would have if the workers had
the CPUs to themselves, which other load on the machine barely moves.

Prints requests/s and the ratio to hello-world with the targets
(written-every-request >= 0.85x, read-only >= 0.95x) and PASS/FAIL marks, and
the machine.  Exit status 1 when a run broke (non-2xx answers, socket errors,
no requests, a server that would not start); a missed target fails the exit
status only with --enforce-targets.

    python stress/bench_http.py --seconds 6 --rounds 5
    python stress/bench_http.py --only hello,counter --profile counter
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
from _live import LiveGunicorn, request  # tests/_live.py: the shared live-gunicorn helper
from bench_store import machine, machine_line, redis_server  # stress/bench_store.py

VARIANTS = {
    "hello": "hello-world (no session)",
    "read": "session read, MmapStore",
    "counter": "session written every request, MmapStore",
    "diskcache": "session written every request, diskcache",
    "redis": "session written every request, redis-server",
}
TARGETS = {"read": 0.95, "counter": 0.85}
COOKIE = "session_id"

LUA = """
local cookies = {%s}
local i = 0
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


def cookies_for(port: int, n: int) -> list[str]:
    """Start ``n`` sessions (GET /init) and return their ids."""
    out = []
    for _ in range(n):
        status, headers, body = request(port, "/init")
        if status != 200:
            raise RuntimeError(f"GET /init answered {status}: {body[:300]!r}")
        for h in headers.get_all("Set-Cookie") or []:
            name, _, rest = h.partition("=")
            if name.strip() == COOKIE:
                out.append(rest.split(";", 1)[0])
    if len(out) != n:
        raise RuntimeError(f"got {len(out)} session cookies from {n} requests to /init")
    return out


def run_wrk(port: int, cookies: list[str], ns: argparse.Namespace, seconds: float,
            workdir: Path) -> dict[str, Any]:
    script = workdir / "cookies.lua"
    quoted = ", ".join(f'"{c}"' for c in cookies or ["none"])
    script.write_text(LUA % (quoted, COOKIE))
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


def _py_loader(port: int, cookies: list[str], seconds: float, offset: int, q: Any) -> None:
    n = bad = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        headers = {"Cookie": f"{COOKIE}={cookies[(n + offset) % len(cookies)]}"} if cookies else {}
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


def run_python(port: int, cookies: list[str], ns: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """Bounded fallback: --connections processes, each one request at a time for ``seconds``."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_py_loader, args=(port, cookies, seconds, i, q))
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
    p.add_argument("--processes", "--workers", type=int, default=2, help="gunicorn sync workers [2]")
    p.add_argument("--threads", type=int, default=1, help="threads per worker (>1: gthread) [1]")
    p.add_argument("--seconds", type=float, default=6, help="seconds of load per measurement [6]")
    p.add_argument("--warmup", type=float, default=1, help="seconds of load before each [1]")
    p.add_argument("--rounds", type=int, default=5, help="measurements per variant; medians reported [5]")
    p.add_argument("--connections", type=int, default=8, help="concurrent connections [8]")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads [1]")
    p.add_argument("--sessions", type=int, default=64, help="distinct session cookies [64]")
    p.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto",
                   help="load generator: wrk if installed, else python [auto]")
    p.add_argument("--only", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (hello always runs)")
    p.add_argument("--enforce-targets", action="store_true",
                   help="exit 1 when a ratio misses its target")
    p.add_argument("--inprocess", type=int, default=5000, metavar="N",
                   help="also time each app called in-process, N calls (0: skip) [5000]")
    p.add_argument("--profile", choices=[v for v in VARIANTS if v != "hello"],
                   help="also cProfile one worker of this variant and print the top functions")
    C.add_common_args(p, timeout=900)
    ns = p.parse_args(argv)
    ns.only = ["hello"] + [v for v in ns.only.split(",") if v and v != "hello"]
    unknown = set(ns.only) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
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
    with tempfile.TemporaryDirectory(prefix="stress-bench-http-", dir=ns.dir) as tmp:
        try:
            return run(ns, Path(tmp), servers)
        finally:
            stop_all()


def run(ns: argparse.Namespace, tmp: Path, servers: list[LiveGunicorn]) -> int:
    report = C.Report(
        f"bench_http: gunicorn -c gunicorn_conf.py, {ns.processes} "
        f"{'sync' if ns.threads == 1 else 'gthread'} workers, {ns.loader} "
        f"({ns.connections} connections, {ns.sessions} sessions), median of {ns.rounds} rounds x "
        f"{ns.seconds:g} s",
        ["variant", "requests/s", "x hello", "target", "mark", "worker CPU us/req",
         "x hello by CPU", "requests", "non-2xx", "socket errors"],
    )
    with contextlib.ExitStack() as stack:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(C.HERE), str(C.REPO),
                                                           os.environ.get("PYTHONPATH")]))}
        if "redis" in ns.only:
            env["BENCH_REDIS_PORT"] = str(stack.enter_context(redis_server(str(tmp))))
        env["BENCH_DISKCACHE_DIR"] = str(tmp / "diskcache")
        by_variant: dict[str, tuple[LiveGunicorn, list[str]]] = {}
        for v in ns.only:
            server = LiveGunicorn(tmp / v, workers=ns.processes, threads=ns.threads,
                                  app=f'bench_apps:make("{v}")', store_size=64 << 20, env=env)
            servers.append(server)
            server.start()
            try:
                cookies = cookies_for(server.port, ns.sessions) if v != "hello" else []
            except RuntimeError as e:
                raise RuntimeError(f"{v}: {e}\n{server.log_tail()}") from None
            by_variant[v] = (server, cookies)
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in ns.only}
        for _ in range(ns.rounds):
            for v in ns.only:
                server, cookies = by_variant[v]
                load = (lambda s, v=v, server=server, cookies=cookies:
                        run_wrk(server.port, cookies, ns, s, tmp / v) if ns.loader == "wrk"
                        else run_python(server.port, cookies, ns, s))
                if ns.warmup > 0:
                    load(ns.warmup)
                assert server.proc is not None
                cpu0 = workers_cpu(server.proc.pid)
                r = load(ns.seconds)
                r["cpu_us"] = (workers_cpu(server.proc.pid) - cpu0) / max(r["requests"], 1) * 1e6
                results[v].append(r)
        profile = profile_worker(ns, tmp, env) if ns.profile else ""
        inproc = (inprocess_costs([v for v in ns.only if v in ("hello", "read", "counter")], env,
                                  tmp, ns.inprocess) if ns.inprocess else "")

    hellos = [r["rate"] for r in results["hello"]]
    hello_cpu = statistics.median(r["cpu_us"] for r in results["hello"])
    for v in ns.only:
        rate = statistics.median(r["rate"] for r in results[v])
        ratio = statistics.median(r["rate"] / h if h else 0.0 for r, h in zip(results[v], hellos))
        target = TARGETS.get(v)
        mark = "" if target is None else ("PASS" if ratio >= target else "FAIL")
        errs = sum(sum(x["errors"].values()) for x in results[v])
        cpu = statistics.median(r["cpu_us"] for r in results[v])
        report.row(VARIANTS[v], round(rate), f"{ratio:.2f}x",
                   f">= {target:.2f}x" if target else "", mark, round(cpu),
                   f"{hello_cpu / cpu:.2f}x" if cpu else "-", sum(x["requests"] for x in results[v]),
                   sum(x["non2xx"] for x in results[v]), errs)
        report.check(f"{v}: answered requests", all(x["requests"] > 0 for x in results[v]), "none")
        report.check(f"{v}: every answer 2xx", all(x["non2xx"] == 0 for x in results[v]),
                     f"{sum(x['non2xx'] for x in results[v])} non-2xx answers")
        report.check(f"{v}: no socket errors", errs == 0,
                     f"{[x['errors'] for x in results[v]]}")
        if target is not None and ns.enforce_targets:
            report.check(f"{v}: >= {target:.2f}x hello-world", ratio >= target, f"{ratio:.2f}x")
    report.note("every round (requests/s): " + "; ".join(
        f"{v} " + "/".join(f"{x['rate']:,.0f}" for x in results[v]) for v in ns.only))
    report.note(machine_line(machine()))
    report.note(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if inproc:
        report.note(inproc)
    if profile:
        report.note(profile)
    return report.finish()


def inprocess_costs(variants: list[str], env: dict[str, str], tmp: Path, n: int) -> str:
    """Microseconds per request of each app called directly (no HTTP, no gunicorn), and of
    the MmapStore calls a session request makes: where the time goes, free of network noise."""
    import timeit

    from werkzeug.test import EnvironBuilder, run_wsgi_app

    os.environ.update(env, PREFORK_SESSIONS_PATH=str(tmp / "inprocess.store"))
    import bench_apps

    lines, cost = [], {}
    for v in variants:
        app = bench_apps.make(v)
        headers = {}
        if v != "hello":
            _, _, h = run_wsgi_app(app, EnvironBuilder(path="/init").get_environ())
            headers["Cookie"] = h["Set-Cookie"].split(";", 1)[0]
        environ = EnvironBuilder(path="/", headers=headers).get_environ()

        def call(app: Any = app, environ: dict[str, Any] = environ) -> None:
            body, _, _ = run_wsgi_app(app, dict(environ))
            b"".join(body)

        cost[v] = min(timeit.repeat(call, number=n, repeat=3)) / n * 1e6
        extra = f" (+{cost[v] - cost['hello']:.1f} over hello-world)" if v != "hello" else ""
        lines.append(f"  {VARIANTS[v]:<45} {cost[v]:7.1f} us{extra}")
    store = bench_apps._mmap_store()
    store.set("probe", {"_d": {"visits": 1}, "_e": 0.0, "_f": []})
    for name, fn in (("MmapStore.get(session)", lambda: store.get("probe")),
                     ("MmapStore.get_and_set(session, identity)",
                      lambda: store.get_and_set("probe", lambda x: x))):
        us = min(timeit.repeat(fn, number=n * 5, repeat=3)) / (n * 5) * 1e6
        lines.append(f"  {name:<45} {us:7.1f} us")
    store.close()
    return f"in-process cost per request (app called directly, best of 3 x {n}):\n" + "\n".join(lines)


def profile_worker(ns: argparse.Namespace, tmp: Path, env: dict[str, str]) -> str:
    """One worker of ns.profile under cProfile for --seconds of load; the top functions."""
    out = tmp / "profile.pstats"
    penv = dict(env, BENCH_PROFILE=str(out))
    server = LiveGunicorn(tmp / "profile", workers=1, threads=ns.threads,
                          app=f'bench_apps:profiled("{ns.profile}")', store_size=64 << 20, env=penv)
    with server:
        cookies = cookies_for(server.port, ns.sessions)
        if ns.loader == "wrk":
            run_wrk(server.port, cookies, ns, ns.seconds, tmp / "profile")
        else:
            run_python(server.port, cookies, ns, ns.seconds)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not out.exists():
        return "profile: the worker wrote no profile"
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(str(out), stream=buf).sort_stats("tottime").print_stats(25)
    return f"profile of one {ns.profile} worker (by own time):\n{buf.getvalue()}"


if __name__ == "__main__":
    sys.exit(main())
