#!/usr/bin/env python3
"""Redis benchmark: contended updates of one session and one counter, and the demo over HTTP.

One run against a private redis-server (a free 127.0.0.1 port, no persistence,
always stopped).  ``--processes`` forked processes (8) update ONE entry at once
for ``--seconds`` per round, in two kinds:

  counter  one JSON integer, +1 per update;
  session  one session (a realistic ~400-byte dict), each process bumping its
           own key in it (``p<i>`` = its number of updates so far, read from
           the session it loaded: a lost update shows as a count that fell behind).

by each way of updating it:

  get_and_set      RedisStore.get_and_set with a Python fn (counter, and the
                   session as one JSON dict)
  WATCH loop       WATCH/GET/MULTI/SET/EXEC written here (the baseline the targets
                   are against)
  GET+SET          plain read then whole write: loses updates, showing why
  ours             prefork_sessions' session layer (SessionManager on a RedisStore):
                   ``open([sid])``, ``s[key] = ...``, ``finish(s, 200)``
  Flask-Session    its RedisSessionInterface (JSON format), open_session/save_session
                   in a request context with the cookie
  django-redis-sessions   its SessionStore(session_key), ``s[key] = ...``, ``save()``

Like for like: every row uses the same redis-py client settings, the same
values and JSON (orjson for ours and the loops; Flask-Session's msgspec JSON;
Django's signed JSON, which is its format).  Framework request handling is left
out of every row (Flask's request context is built once per process): each
update is its session layer's load + save.  Rows run one at a time on a flushed
database, interleaved by round (the order rotating); figures are medians over
the rounds, ratios the median of the per-round ratios.

Per row: updates/s (all updates / first start to last end); commands sent per
update, counted by the client (a script call is one command, so is each command
of a MULTI); server calls per update from ``INFO commandstats`` deltas (calls a
script makes included), with the commands behind them; retries (calls of the
Python fn beyond one per update, WatchErrors of the loop, or WATCH calls beyond
one per update where only the server can tell); lost updates, verified at the
end through each row's own layer (counter: increments made - final value;
session: each process's count minus what its key holds).

Targets (PASS/FAIL; --enforce-targets makes a miss exit 1): 0 lost updates for
get_and_set and our session layer; get_and_set <= 3 commands per update and
>= 1.5x the WATCH loop's updates/s; our session saves >= 3x the loop.  HTTP
(--http-seconds, 0 skips): stress/bench_http.py's "redis" suite on the same
redis-server, the werkzeug demo on RedisStore (gunicorn_conf.py with
PREFORK_SESSIONS_REDIS_URL) against Flask-Session, target >= 1.5x requests/s.

Exit status 1 when an invariant broke: a process failed or hung, a row made no
updates, an atomic row (get_and_set, WATCH loop, ours) lost an update, a stored
count is above the updates made, or the client's command count disagrees with
the server's for a row without scripts; 3 on --timeout.

    python stress/bench_redis.py --seconds 2 --rounds 3
    python stress/bench_redis.py --only session-ours --http-seconds 0 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import _common as C
import orjson
import redis
from bench_store import machine, machine_line, redis_server, store_build

LIFETIME = 3600  # seconds every session row gives its session
SECRET = "bench-redis-secret-" + "0123456789abcdef" * 2
SCRIPT_CALLS = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"}
Update = Callable[[], "int | None"]  # one update; returns the retries it took (None: not observable)


class CountingConnection(redis.connection.Connection):
    """A redis-py connection counting the commands this process sends: a script
    call is one, each command of a pipeline or MULTI/EXEC one."""

    sent = 0  # class-wide: every client of the process

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        CountingConnection.sent += 1
        super().send_command(*args, **kwargs)

    def pack_commands(self, commands: Any) -> Any:
        commands = list(commands)
        CountingConnection.sent += len(commands)
        return super().pack_commands(commands)


def new_client(url: str) -> redis.Redis:
    """The client every row uses (RedisStore's own settings: one retry, bounded waits)."""
    import redis.backoff
    import redis.retry

    return redis.Redis.from_url(url, connection_class=CountingConnection, socket_timeout=5,
                                socket_connect_timeout=5, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1))


def base_session(procs: int) -> dict[str, Any]:
    """What every session row starts from: a plausible login session and a 0 per process."""
    d: dict[str, Any] = {
        "user_id": 48213, "csrf_token": "9f3a" * 16, "locale": "en-GB",
        "cart": [{"sku": f"SKU-{n:05d}", "qty": n % 3 + 1, "price": 19.99} for n in range(4)],
        "flags": {"beta": True, "tour_done": False},
    }
    d.update({pkey(i): 0 for i in range(procs)})
    return d


def pkey(i: int) -> str:
    return f"p{i}"


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Kind:
    """What a row updates: its key, first value, one process's change, what to verify."""

    name: str
    key: str

    def first(self, procs: int) -> Any:
        return 0 if self.name == "counter" else base_session(procs)

    def change(self, i: int) -> Callable[[Any], Any]:
        if self.name == "counter":
            return lambda n: n + 1
        k = pkey(i)
        return lambda d: {**d, k: d.get(k, 0) + 1}

    def counts(self, value: Any, procs: int) -> list[int]:
        """The counter as [value]; a session as each process's count (0 when missing)."""
        if self.name == "counter":
            return [int(value or 0)]
        return [int((value or {}).get(pkey(i), 0)) for i in range(procs)]

    @property
    def px(self) -> int | None:
        return None if self.name == "counter" else LIFETIME * 1000


COUNTER, SESSION = Kind("counter", "counter"), Kind("session", "session")


class Row:
    """One way of updating; ``setup`` runs in the parent on a flushed database,
    ``worker`` in each forked process (connected before it returns), ``stored``
    in the parent after the run."""

    key = ""
    label = ""
    kind = SESSION
    atomic = True  # lost updates are a bug (an invariant), not a finding
    discards: int | None = None  # commands queued per transaction an aborted EXEC drops, where known
    retries = True  # it may retry (False: it never does, it overwrites)
    missing = ""  # why the row cannot run here ("" = it can)

    def __init__(self, url: str, procs: int) -> None:
        self.url, self.procs = url, procs

    def setup(self) -> None:
        raise NotImplementedError

    def worker(self, i: int) -> Update:
        raise NotImplementedError

    def stored(self) -> list[int]:
        raise NotImplementedError


class GetAndSet(Row):
    def _store(self) -> Any:
        from prefork_sessions import RedisStore

        store = RedisStore(self.url, client=new_client(self.url), prefix=f"bench:{self.key}:")
        store.get("ping")  # connected before the run
        return store

    def setup(self) -> None:
        self._store().set(self.kind.key, self.kind.first(self.procs))

    def worker(self, i: int) -> Update:
        store, change, calls = self._store(), self.kind.change(i), [0]
        expire = None if self.kind.px is None else LIFETIME

        def fn(value: Any) -> Any:
            calls[0] += 1
            return change(value)

        def update() -> int:
            before = calls[0]
            store.get_and_set(self.kind.key, fn, expire)
            return calls[0] - before - 1

        return update

    def stored(self) -> list[int]:
        return self.kind.counts(self._store().get(self.kind.key), self.procs)


class Raw(Row):
    """The rows written here on redis-py: the same JSON (orjson) as RedisStore."""

    def _client(self) -> redis.Redis:
        c = new_client(self.url)
        c.ping()
        return c

    def setup(self) -> None:
        self._client().set(self.kind.key, orjson.dumps(self.kind.first(self.procs)), px=self.kind.px)

    def stored(self) -> list[int]:
        raw = self._client().get(self.kind.key)
        return self.kind.counts(None if raw is None else orjson.loads(raw), self.procs)


class WatchLoop(Raw):
    discards = 1  # the SET
    def worker(self, i: int) -> Update:
        c, change, key, px = self._client(), self.kind.change(i), self.kind.key, self.kind.px

        def update() -> int:
            retries = 0
            with c.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        new = change(orjson.loads(pipe.get(key)))
                        pipe.multi()
                        pipe.set(key, orjson.dumps(new), px=px)
                        pipe.execute()
                        return retries
                    except redis.WatchError:
                        retries += 1

        return update


class GetSet(Raw):
    atomic = retries = False

    def worker(self, i: int) -> Update:
        c, change, key, px = self._client(), self.kind.change(i), self.kind.key, self.kind.px

        def update() -> None:
            c.set(key, orjson.dumps(change(orjson.loads(c.get(key)))), px=px)

        return update


class Ours(Row):
    key, label = "session-ours", "session: prefork_sessions SessionManager on RedisStore"
    sid = ""

    def _manager(self) -> Any:
        from prefork_sessions import RedisStore
        from prefork_sessions._session import SessionManager, SessionOptions

        store = RedisStore(self.url, client=new_client(self.url), prefix="bench:ours:")
        store.get("ping")
        return SessionManager(store, SessionOptions(lifetime=LIFETIME, secret=SECRET))

    def setup(self) -> None:
        m = self._manager()
        s = m.open([])
        s.update(base_session(self.procs))
        m.finish(s, 200)
        self.sid = s.id

    def worker(self, i: int) -> Update:
        m, sid, k = self._manager(), self.sid, pkey(i)

        def update() -> None:
            s = m.open([sid])
            s[k] = s.get(k, 0) + 1
            m.finish(s, 200)

        return update

    def stored(self) -> list[int]:
        s = self._manager().open([self.sid])
        return [int(s.get(pkey(i), 0)) for i in range(self.procs)]


class FlaskSession(Row):
    key, label = "session-flask-session", "session: Flask-Session RedisSessionInterface"
    atomic = retries = False
    sid = ""

    def __init__(self, url: str, procs: int) -> None:
        super().__init__(url, procs)
        from flask import Flask
        from flask_session import Session

        self.app = Flask("bench_redis")
        self.app.config.update(SECRET_KEY=SECRET, SESSION_TYPE="redis", SESSION_REDIS=new_client(url),
                               SESSION_SERIALIZATION_FORMAT="json", SESSION_KEY_PREFIX="bench:flask:",
                               PERMANENT_SESSION_LIFETIME=LIFETIME)
        Session(self.app)
        self.iface = self.app.session_interface

    def _context(self) -> Any:
        cookie = {"Cookie": f"{self.app.config['SESSION_COOKIE_NAME']}={self.sid}"} if self.sid else {}
        return self.app.test_request_context("/", headers=cookie)

    def setup(self) -> None:
        from flask import request

        self.sid = ""
        with self._context():
            s = self.iface.open_session(self.app, request)
            s.update(base_session(self.procs))
            self.iface.save_session(self.app, s, self.app.response_class())
            self.sid = s.sid

    def worker(self, i: int) -> Update:
        from flask import request

        app, iface, k = self.app, self.iface, pkey(i)
        self._context().push()  # once per process: the row times the session interface alone
        iface.client.ping()

        def update() -> None:
            s = iface.open_session(app, request)
            s[k] = s.get(k, 0) + 1
            iface.save_session(app, s, app.response_class())

        return update

    def stored(self) -> list[int]:
        from flask import request

        with self._context():
            s = self.iface.open_session(self.app, request)
            return [int(s.get(pkey(i), 0)) for i in range(self.procs)]


class DjangoRedisSessions(Row):
    key, label = "session-django-redis-sessions", "session: django-redis-sessions"
    atomic = retries = False
    sid = ""
    _configured = False

    def __init__(self, url: str, procs: int) -> None:
        super().__init__(url, procs)
        try:
            metadata.version("django-redis-sessions")
        except metadata.PackageNotFoundError:
            self.missing = "django-redis-sessions is not installed (pip install django-redis-sessions)"
            return
        from django.conf import settings

        if not DjangoRedisSessions._configured:  # Django is configured once per process
            import django

            settings.configure(SECRET_KEY=SECRET, SESSION_ENGINE="redis_sessions.session",
                               SESSION_COOKIE_AGE=LIFETIME, SESSION_REDIS={"prefix": "bench:django"},
                               SESSION_REDIS_CONNECTION_OBJECT=new_client(url))
            django.setup()
            DjangoRedisSessions._configured = True
        from redis_sessions.session import SessionStore

        self.store_class = SessionStore

    def setup(self) -> None:
        s = self.store_class()
        s.update(base_session(self.procs))
        s.save()
        self.sid = s.session_key

    def worker(self, i: int) -> Update:
        store_class, sid, k = self.store_class, self.sid, pkey(i)
        store_class(sid).server.ping()

        def update() -> None:
            s = store_class(session_key=sid)
            s[k] = s.get(k, 0) + 1
            s.save()

        return update

    def stored(self) -> list[int]:
        s = self.store_class(session_key=self.sid)
        return [int(s.get(pkey(i), 0)) for i in range(self.procs)]


def _rows() -> list[type[Row]]:
    out: list[type[Row]] = []
    for kind in (COUNTER, SESSION):
        for base, name, what in ((GetAndSet, "get_and_set", "RedisStore.get_and_set, Python fn"),
                                 (WatchLoop, "watch", "WATCH/GET/MULTI/SET/EXEC loop"),
                                 (GetSet, "get+set", "plain GET + SET")):
            out.append(type(f"{base.__name__}_{kind.name}", (base,),
                            {"key": f"{kind.name}-{name}", "label": f"{kind.name}: {what}", "kind": kind}))
    return out + [Ours, FlaskSession, DjangoRedisSessions]


ROWS = {r.key: r for r in _rows()}
BASELINE = {"counter": "counter-watch", "session": "session-watch"}
# (row, what, limit): "lost" == limit, "sent" <= limit, "ratio" (to its kind's WATCH loop) >= limit
TARGETS = [("counter-get_and_set", "lost", 0), ("session-get_and_set", "lost", 0), ("session-ours", "lost", 0),
           ("counter-get_and_set", "sent", 3), ("session-get_and_set", "sent", 3),
           ("counter-get_and_set", "ratio", 1.5), ("session-get_and_set", "ratio", 1.5),
           ("session-ours", "ratio", 3.0)]


# --------------------------------------------------------------------------- one measurement


def _child(row: Row, i: int, seconds: float, ready_w: int, go_r: int, out_w: int) -> None:
    update = row.worker(i)
    os.write(ready_w, b"r")
    if os.read(go_r, 1) != b"g":
        return
    sent0 = CountingConnection.sent
    n, retries, observed = 0, 0, True
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        r = update()
        n += 1
        if r is None:
            observed = False
        else:
            retries += r
    stop = time.monotonic()
    result = {"i": i, "updates": n, "retries": retries if observed else None,
              "sent": CountingConnection.sent - sent0, "start": start, "stop": stop}
    os.write(out_w, json.dumps(result).encode() + b"\n")


def _read(fd: int, deadline: float, until: Callable[[bytes], bool]) -> bytes:
    """Read ``fd`` until ``until(data)``, end of file or the deadline."""
    data = b""
    while not until(data):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def commandstats(admin: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in admin.info("commandstats").items()}


def measure(row: Row, ns: argparse.Namespace, admin: redis.Redis) -> dict[str, Any]:
    """One round of ``row``: --processes processes updating at once for --seconds."""
    # One update first, then a clean slate: what a first call costs once per server
    # (SCRIPT LOAD after NOSCRIPT) is not what an update costs.
    admin.flushdb()
    row.setup()
    row.worker(0)()
    admin.flushdb()
    row.setup()
    procs = ns.processes
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = [C.fork(lambda i=i: _child(row, i, ns.seconds, ready_w, go_r, out_w)) for i in range(procs)]
    for fd in (ready_w, go_r, out_w):
        os.close(fd)
    problems: list[str] = []
    try:
        ready = _read(ready_r, time.monotonic() + 60, lambda d: len(d) >= procs)
        before = commandstats(admin)
        os.write(go_w, b"g" * procs)
        lines = _read(out_r, time.monotonic() + ns.seconds + 60, lambda d: d.count(b"\n") >= procs)
    finally:
        for fd in (ready_r, go_w, out_r):
            os.close(fd)
        codes = C.wait(pids, 30)
    after = commandstats(admin)
    results = [json.loads(line) for line in lines.splitlines()]
    if len(ready) < procs:
        problems.append(f"{procs - len(ready)} of {procs} processes never got ready")
    bad = {pid: code for pid, code in codes.items() if code != 0}
    if bad:
        problems.append(f"processes failed or hung (exit codes {sorted(bad.values(), key=str)}; tracebacks above)")
    if len(results) < procs:
        problems.append(f"{procs - len(results)} of {procs} processes reported nothing")
    calls = {k: v - before.get(k, 0) for k, v in after.items() if k != "info" and v != before.get(k, 0)}
    results.sort(key=lambda r: r["i"])
    per = [r["updates"] for r in results]
    updates = sum(per)
    stored = row.stored()
    if row.kind is COUNTER:
        lost, above = updates - stored[0], stored[0] > updates
        stale = int(lost != 0)
    else:
        stored = stored[:len(per)]
        lost = sum(max(0, n - s) for n, s in zip(per, stored))
        above = any(s > n for n, s in zip(per, stored))
        stale = sum(n != s for n, s in zip(per, stored))
    span = (max(r["stop"] for r in results) - min(r["start"] for r in results)) if results else 0.0
    retries = [r["retries"] for r in results]
    if results and None not in retries:
        retries_total: int | None = sum(r for r in retries if r is not None)
        retries_how = "counted"
    elif "watch" in calls:
        retries_total, retries_how = max(0, calls["watch"] - updates), "WATCH calls beyond one per update"
    else:
        retries_total, retries_how = None, ""
    return {"updates": updates, "per_process": per, "stored": stored, "seconds": span,
            "rate": updates / span if span > 0 else 0.0, "sent": sum(r["sent"] for r in results),
            "calls": calls, "server_calls": sum(calls.values()), "scripts": bool(SCRIPT_CALLS & set(calls)),
            "retries": retries_total, "retries_how": retries_how, "lost": lost, "stale": stale,
            "above": above, "problems": problems}


# --------------------------------------------------------------------------- the run


def per_update(x: float, updates: int) -> float:
    return x / updates if updates else 0.0


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    updates = sum(r["updates"] for r in rounds)
    calls: dict[str, int] = {}
    for r in rounds:
        for k, v in r["calls"].items():
            calls[k] = calls.get(k, 0) + v
    retries = [r["retries"] for r in rounds]
    return {
        "rate": statistics.median(r["rate"] for r in rounds),
        "updates": updates,
        "sent_per_update": per_update(sum(r["sent"] for r in rounds), updates),
        "server_calls_per_update": per_update(sum(r["server_calls"] for r in rounds), updates),
        "calls_per_update": {k: per_update(v, updates) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
        "retries": None if None in retries else sum(retries),
        "retries_how": rounds[0]["retries_how"],
        "lost": sum(r["lost"] for r in rounds),
        "stale_keys": sum(r["stale"] for r in rounds),
        "scripts": any(r["scripts"] for r in rounds),
    }


def ratio(rounds: dict[str, list[dict[str, Any]]], a: str, b: str) -> float | None:
    if a not in rounds or b not in rounds:
        return None
    return statistics.median(x["rate"] / y["rate"] if y["rate"] else 0.0 for x, y in zip(rounds[a], rounds[b]))


def evaluate_targets(summary: dict[str, dict[str, Any]],
                     rounds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for key, what, limit in TARGETS:
        if key not in summary:
            continue
        s = summary[key]
        if what == "lost":
            value, ok, text = s["lost"], s["lost"] == limit, f"{key}: {limit} lost updates"
        elif what == "sent":
            value, ok = s["sent_per_update"], s["sent_per_update"] <= limit
            text = f"{key}: <= {limit} commands sent per update"
        else:
            base = BASELINE[ROWS[key].kind.name]
            r = ratio(rounds, key, base)
            if r is None:
                continue
            value, ok, text = r, r >= limit, f"{key} >= {limit:.1f}x {base} (updates/s)"
        out.append({"target": text, "value": value, "ok": ok})
    return out


def fmt_value(t: dict[str, Any]) -> str:
    v = t["value"]
    if "x " in t["target"]:
        return f"{v:.2f}x"
    return f"{v:.3f}" if isinstance(v, float) else f"{v:,}"  # 3.001 is not <= 3: show it


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | mark |", "|---|---|---|"]
    lines += [f"| {t['target']} | {fmt_value(t)} | {'PASS' if t['ok'] else 'FAIL'} |" for t in targets]
    return "\n".join(lines)


def breakdown(s: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in s["calls_per_update"].items()) or "-"


def render(report: dict[str, Any]) -> C.Report:
    cfg = report["config"]
    rep = C.Report(
        f"bench_redis: {cfg['processes']} processes updating one entry at once, redis-server on 127.0.0.1, "
        f"median of {cfg['rounds']} rounds x {cfg['seconds']:g} s",
        ["row", "updates/s", "x WATCH loop", "commands sent / update", "server calls / update",
         "retries / update", "lost updates", "updates"])
    for key, s in report["summary"].items():
        base = BASELINE[ROWS[key].kind.name]
        r = ratio(report["rounds"], key, base)
        lost = f"{s['lost']:,}" + (f" ({s['lost'] / s['updates']:.0%})" if s["lost"] and s["updates"] else "")
        retries = "-" if s["retries"] is None else f"{per_update(s['retries'], s['updates']):.2f}"
        rep.row(ROWS[key].label + (" (baseline)" if key == base else ""), round(s["rate"]),
                "-" if r is None else f"{r:.2f}x", f"{s['sent_per_update']:.3f}",
                f"{s['server_calls_per_update']:.2f}", retries, lost, s["updates"])
    for key, why in report["skipped"].items():
        rep.row(f"{key}: not run", "-", "-", "-", "-", "-", "-", why)
    rep.note("targets (ratios: median of the per-round ratios):\n\n" + targets_table(report["targets"]))
    rep.note("server calls per update, by command (INFO commandstats; a script's own calls included):\n"
             + "\n".join(f"  {key}: {breakdown(s)}" for key, s in report["summary"].items()))
    how = {k: s["retries_how"] for k, s in report["summary"].items()
           if s["retries_how"] != "counted" and ROWS[k].retries}
    rep.note("retries: calls of the Python fn beyond one per update, or the loop's WatchErrors"
             + "".join(f"; {k}: {h or 'not observable from outside (no WATCH)'}" for k, h in how.items())
             + "; plain GET+SET, Flask-Session and django-redis-sessions never retry: they overwrite")
    rep.note("lost updates: counter, increments made - final value; session, each process's updates - "
             "what its key holds, summed over the rounds; keys wrong at the end: "
             + (", ".join(f"{k} {s['stale_keys']}" for k, s in report["summary"].items() if s["stale_keys"])
                or "none"))
    rep.note("every round (updates/s): " + "; ".join(
        f"{k} " + "/".join(f"{r['rate']:,.0f}" for r in rs) for k, rs in report["rounds"].items()))
    rep.note(machine_line(report["machine"]))
    rep.note(f"Measured: prefork_sessions at {report['build']}; {report['versions']}")
    for name, why in report["failures"]:
        rep.check(name, False, why)
    for name in report["checked"]:
        rep.check(name, True)
    return rep


def failures(rounds: dict[str, list[dict[str, Any]]],
             summary: dict[str, dict[str, Any]]) -> tuple[list[tuple[str, str]], list[str]]:
    """(the broken invariants as (name, why), the names of those that held)."""
    bad: list[tuple[str, str]] = []
    held: list[str] = []

    def check(name: str, ok: bool, why: str) -> None:
        if ok:
            held.append(name)
        else:
            bad.append((name, why))

    for key, rs in rounds.items():
        for n, r in enumerate(rs, 1):
            check(f"{key}: every process ran", not r["problems"], f"round {n}: {'; '.join(r['problems'])}")
        check(f"{key}: updates made", all(r["updates"] > 0 for r in rs), "a round made none")
        check(f"{key}: stored counts possible", not any(r["above"] for r in rs),
              "a stored count is above the updates made")
        if ROWS[key].atomic:
            check(f"{key}: no update lost", summary[key]["lost"] == 0, f"{summary[key]['lost']:,} lost")
        if summary[key]["scripts"]:
            continue  # the server also counts a script's own calls
        sent, calls = sum(r["sent"] for r in rs), sum(r["server_calls"] for r in rs)
        name, why = f"{key}: client and server count the same commands", f"client sent {sent:,}, server counted {calls:,}"
        if ROWS[key].discards is not None:  # an aborted EXEC never runs what was queued: the server misses it
            retries = summary[key]["retries"] or 0
            check(name, sent == calls + ROWS[key].discards * retries, f"{why}, {retries:,} retries")
        elif "exec" in summary[key]["calls_per_update"]:
            check(name, sent >= calls, why)
        else:
            check(name, sent == calls, why)
    return bad, held


def versions() -> str:
    found = []
    for dist in ("redis", "Flask", "Flask-Session", "Django", "django-redis-sessions", "orjson"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(found)


@contextlib.contextmanager
def quiet_stdout(on: bool) -> Iterator[None]:
    """With --json, what bench_http prints goes to stderr, so stdout is the JSON alone."""
    if not on:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run_http(ns: argparse.Namespace, port: int, tmp: Path, servers: list[Any]) -> tuple[int, dict[str, Any]]:
    """stress/bench_http.py's redis suite on our redis-server."""
    import bench_http as H

    args = ["--suite", "redis", "--seconds", str(ns.http_seconds), "--warmup", str(ns.http_warmup),
            "--rounds", str(ns.rounds), "--processes", str(ns.http_workers), "--threads", str(ns.http_threads),
            "--sessions", str(ns.http_sessions), "--inprocess", "0"]
    hns = H.parse_args(args)
    variants = [H.VARIANTS[k] for k in hns.only]
    env = H.base_env(port)
    (tmp / "http").mkdir()
    summary: dict[str, Any] = {}
    with quiet_stdout(ns.json):
        status = H.run_suite(hns, "redis", variants, tmp / "http", env, servers, summary=summary)
    summary["command"] = "bench_http.py " + " ".join(args)
    return status, summary


def run(ns: argparse.Namespace, tmp: Path, servers: list[Any], cleanups: list[Callable[[], None]]) -> int:
    with redis_server(str(tmp)) as port:
        url = f"redis://127.0.0.1:{port}/0"
        admin = redis.Redis.from_url(url, socket_timeout=30)
        cleanups.append(lambda: admin.shutdown(nosave=True))  # on --timeout: no redis-server left behind
        rows: list[Row] = []
        skipped: dict[str, str] = {}
        for key in ns.only:
            row = ROWS[key](url, ns.processes)
            if row.missing:
                skipped[key] = row.missing
            else:
                rows.append(row)
        rounds: dict[str, list[dict[str, Any]]] = {r.key: [] for r in rows}
        for rnd in range(ns.rounds):
            for row in rows[rnd % len(rows):] + rows[:rnd % len(rows)]:
                rounds[row.key].append(measure(row, ns, admin))
        summary = {k: summarise(rs) for k, rs in rounds.items()}
        bad, held = failures(rounds, summary)
        report: dict[str, Any] = {
            "config": {"processes": ns.processes, "seconds": ns.seconds, "rounds": ns.rounds, "lifetime": LIFETIME},
            "machine": machine(str(tmp)), "build": store_build(), "versions": versions(),
            "rounds": rounds, "summary": summary, "skipped": skipped,
            "targets": evaluate_targets(summary, rounds), "failures": bad, "checked": held,
        }
        status = 1 if report["failures"] else 0
        if not ns.json:
            status |= render(report).finish()
        if ns.http_seconds > 0:
            print(flush=True)
            http_status, report["http"] = run_http(ns, port, tmp, servers)
            status |= http_status
            report["targets"] += report["http"].get("targets", [])
        cleanups.clear()  # redis_server stops its server itself from here
    if ns.json:
        print(json.dumps(report, indent=2, default=str))
    elif "http" in report:
        print("\nbench_redis targets, all:\n\n" + targets_table(report["targets"]), flush=True)
    if ns.enforce_targets and not all(t["ok"] for t in report["targets"]):
        status = 1
    return status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=8, help="processes updating the one entry [8]")
    p.add_argument("--seconds", type=float, default=3, help="seconds each row runs, per round [3]")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians [3]")
    p.add_argument("--only", default="", help="comma-separated rows (the WATCH loops always run): "
                   + ",".join(ROWS))
    p.add_argument("--http-seconds", type=float, default=4,
                   help="seconds of HTTP load per measurement; 0 skips the HTTP part [4]")
    p.add_argument("--http-warmup", type=float, default=1, help="seconds of HTTP load before each [1]")
    p.add_argument("--http-workers", type=int, default=2, help="gunicorn workers of both HTTP apps [2]")
    p.add_argument("--http-threads", type=int, default=1,
                   help="threads per worker of both HTTP apps (1: sync workers) [1]")
    p.add_argument("--http-sessions", type=int, default=64, help="distinct session cookies of the HTTP load [64]")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--enforce-targets", action="store_true", help="exit 1 when a target is missed")
    C.add_common_args(p, timeout=900)
    ns = p.parse_args(argv)
    only = [k for k in ns.only.split(",") if k]
    unknown = set(only) - set(ROWS)
    if unknown:
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    wanted = set(only or ROWS) | {BASELINE[ROWS[k].kind.name] for k in only}
    ns.only = [k for k in ROWS if k in wanted]
    if ns.processes < 1 or ns.seconds <= 0 or ns.rounds < 1:
        p.error("--processes, --seconds and --rounds must be positive")
    if not shutil.which("redis-server"):
        p.error("redis-server is not installed (Debian: apt-get install redis-server)")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    servers: list[Any] = []
    cleanups: list[Callable[[], None]] = []

    def stop_all() -> None:
        for s in servers:
            s.stop()
        for cleanup in cleanups:
            with contextlib.suppress(Exception):
                cleanup()

    C.hard_timeout(ns.timeout, "bench_redis", cleanup=stop_all)
    try:
        with tempfile.TemporaryDirectory(prefix="stress-bench-redis-", dir=ns.dir) as tmp:
            return run(ns, Path(tmp), servers, cleanups)
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
