#!/usr/bin/env python3
"""gunicorn under load: the real ``gunicorn -c gunicorn_conf.py`` serving the demo
counter on 127.0.0.1 to many concurrent clients, while workers are SIGKILLed at
random and retired by --max-requests.

Each client keeps its session cookie and makes --requests sequential requests
to ``GET /`` (a new connection each, so any worker may answer).  Invariants
(DESIGN.md section 7):
  * a client's visits never repeat or go back, and never skip except directly
    after requests whose connection a kill cut (at most one skip per cut request);
  * no status other than 200 (a kill shows as a cut connection, never a 5xx);
  * no request hangs (--request-timeout) and no session is lost (the cookie never
    changes; visits never restart at 1);
  * several worker pids served each client (workers really were replaced);
  * after the server stops, store.check() == [] on its session file.

    python stress/gunicorn_load.py --workers 4 --clients 32 --requests 250 --seed 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import _common as C
from _live import Browser, LiveGunicorn  # tests/_live.py: the shared live-gunicorn helper

from prefork_sessions import MmapStore

CUT = (ConnectionError, http.client.IncompleteRead, http.client.BadStatusLine)


@dataclass
class Client:
    index: int
    ok: int = 0
    cuts: int = 0
    skips: int = 0
    last: int | None = None
    pending_cuts: int = 0  # cut requests since the last answer
    pids: set[int] = field(default_factory=set)
    statuses: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    cookie: str | None = None

    def run(self, server: LiveGunicorn, requests: int, timeout: float) -> None:
        browser = Browser(server)
        for i in range(requests):
            before = browser.cookie
            try:
                status, _, body = browser.get("/", timeout=timeout)
            except TimeoutError:
                self.problems.append(f"request {i}: no answer in {timeout} s (a hang)")
                continue
            except CUT:
                self.cuts += 1
                self.pending_cuts += 1
                continue
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200:
                self.problems.append(f"request {i}: HTTP {status}: {body[:200]!r}")
                continue
            self.ok += 1
            data = json.loads(body)
            n, pid = data["visits"], data["worker"]
            self.pids.add(pid)
            if before is None:  # no session yet (first request, or the first ones were cut)
                if n != 1:
                    self.problems.append(f"request {i}: a new session counted {n}, not 1")
                self.cookie = browser.cookie
            elif browser.cookie != self.cookie:
                self.problems.append(f"request {i}: session lost: the cookie changed (visits {n})")
                self.cookie = browser.cookie
            elif self.last is not None:
                skipped = n - self.last - 1
                if n <= self.last:
                    self.problems.append(f"request {i}: visits {n} after {self.last} (repeat/back)")
                elif skipped > self.pending_cuts:
                    self.problems.append(
                        f"request {i}: visits {n} after {self.last}: {skipped} skipped, "
                        f"but only {self.pending_cuts} cut request(s) before it")
                else:
                    self.skips += skipped
            self.last = n
            self.pending_cuts = 0


def workers_of(master: int) -> list[int]:
    try:
        with open(f"/proc/{master}/task/{master}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def killer(master: int, rnd: random.Random, every: tuple[float, float], stop: threading.Event,
           killed: list[int]) -> None:
    while not stop.wait(rnd.uniform(*every)):
        pids = workers_of(master)
        if pids:
            pid = rnd.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", "--processes", type=int, default=4, help="gunicorn workers [4]")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per worker (>1: gthread workers) [1]")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients [32]")
    p.add_argument("--requests", "--ops", type=int, default=250, help="requests per client [250]")
    p.add_argument("--max-requests", type=int, default=100,
                   help="gunicorn --max-requests (0: off) [100]")
    p.add_argument("--kill-every", type=float, nargs=2, default=(0.1, 0.4), metavar=("MIN", "MAX"),
                   help="seconds between worker kills, uniform [0.1 0.4]; 0 0: no kills")
    p.add_argument("--min-workers-seen", type=int, default=3,
                   help="distinct worker pids each client must see [3]")
    p.add_argument("--preload", action="store_true", help="gunicorn --preload (post_fork reopens)")
    p.add_argument("--request-timeout", type=float, default=20, help="per-request timeout, s [20]")
    C.add_common_args(p, timeout=300)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stress-gunicorn-", dir=ns.dir) as tmp:
        server = LiveGunicorn(
            tmp, workers=ns.workers, threads=ns.threads, preload=ns.preload,
            args=("--max-requests", str(ns.max_requests), "--max-requests-jitter",
                  str(ns.max_requests // 5)) if ns.max_requests else ())
        C.hard_timeout(ns.timeout, "gunicorn_load", cleanup=server.stop)
        with server:
            return run(ns, server)


def run(ns: argparse.Namespace, server: LiveGunicorn) -> int:
    assert server.proc is not None
    rnd = random.Random(ns.seed)
    clients = [Client(i) for i in range(ns.clients)]
    errors: list[str] = []

    def drive(c: Client) -> None:
        try:
            c.run(server, ns.requests, ns.request_timeout)
        except Exception as e:  # noqa: BLE001 - reported as a broken invariant
            errors.append(f"client {c.index}: {type(e).__name__}: {e}")

    stop, killed = threading.Event(), []
    kill_thread = None
    if ns.kill_every[1] > 0:
        kill_thread = threading.Thread(
            target=killer, args=(server.proc.pid, rnd, tuple(ns.kill_every), stop, killed))
    threads = [threading.Thread(target=drive, args=(c,)) for c in clients]
    start = time.monotonic()
    for t in threads:
        t.start()
    if kill_thread:
        kill_thread.start()
    for t in threads:
        t.join()
    stop.set()
    if kill_thread:
        kill_thread.join()
    elapsed = time.monotonic() - start
    log = server.log_tail(1 << 30)
    code = server.stop()

    with MmapStore(server.store_path) as store:
        problems = store.check()
        stats = store.stats()

    report = C.Report(
        f"gunicorn_load: gunicorn -c gunicorn_conf.py, {ns.workers} workers x {ns.threads} "
        f"thread(s){', preload' if ns.preload else ''}, max_requests {ns.max_requests}; "
        f"{ns.clients} clients x {ns.requests} requests in {elapsed:.1f} s; "
        f"{len(killed)} workers SIGKILLed; seed {ns.seed}",
        ["client", "answered", "cut by a kill", "skips after a cut", "final visits", "workers seen",
         "problems"],
    )
    def cells(c: Client) -> list[int]:
        return [c.ok, c.cuts, c.skips, c.last or 0, len(c.pids), len(c.problems)]

    if len(clients) <= 12:
        for c in clients:
            report.row(c.index, *cells(c))
    else:  # one row per client with a problem, then the spread
        for c in clients:
            if c.problems:
                report.row(c.index, *cells(c))
        columns = list(zip(*(cells(c) for c in clients), strict=True))
        report.row("min per client", *(min(col) for col in columns))
        report.row("max per client", *(max(col) for col in columns))
    report.row("all", sum(c.ok for c in clients), sum(c.cuts for c in clients),
               sum(c.skips for c in clients), sum(c.last or 0 for c in clients),
               len(set().union(*(c.pids for c in clients))), sum(len(c.problems) for c in clients))
    booted = log.count("Booting worker with pid")
    report.note(f"{sum(c.ok for c in clients) / elapsed:,.0f} answered requests/s; "
                f"{booted} workers booted in all; gunicorn exit status {code}; store: entries "
                f"{stats['entries']}, recovered_pages {stats['recovered_pages']}, "
                f"evictions {stats['evictions']}")
    problems_all = [f"client {c.index}: {p}" for c in clients for p in c.problems] + errors
    if problems_all:
        report.note("first problems:\n  " + "\n  ".join(problems_all[:8]))
    statuses: dict[int, int] = {}
    for c in clients:
        for s, n in c.statuses.items():
            statuses[s] = statuses.get(s, 0) + n
    report.check("every answer was 200 (cut connections aside)", set(statuses) <= {200},
                 f"statuses {statuses}")
    report.check("visits never repeat, go back, or skip except right after a cut request",
                 not any("repeat" in p or "skipped" in p for p in problems_all),
                 "; ".join(p for p in problems_all if "repeat" in p or "skipped" in p)[:500])
    report.check("no session lost", not any("session" in p for p in problems_all),
                 "; ".join(p for p in problems_all if "session" in p)[:500])
    report.check("no request hung, no client crashed",
                 not errors and not any("hang" in p for p in problems_all),
                 "; ".join(errors + [p for p in problems_all if "hang" in p])[:500])
    report.check("every client got answers", all(c.ok > 0 for c in clients), "")
    few = [c.index for c in clients if len(c.pids) < ns.min_workers_seen]
    report.check(f"each client was served by >= {ns.min_workers_seen} worker pids", not few,
                 f"clients {few} saw fewer")
    if ns.kill_every[1] > 0:
        report.check("workers were killed", len(killed) > 0, "the killer never found a worker")
    report.check("store.check() == [] after the run", problems == [], "; ".join(problems[:5]))
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
