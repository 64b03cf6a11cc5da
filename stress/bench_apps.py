"""The WSGI apps stress/bench_http.py serves under gunicorn, one per variant.

Every app is built by ``make(variant)`` (gunicorn: ``-c gunicorn_conf.py`` with
``PREFORK_SESSIONS_APP='bench_apps:make("counter")'`` and stress/ on PYTHONPATH).
A variant ending in ``-read`` only reads its session; the others write a
counter on every request.

    hello            plain werkzeug hello-world, no session
    demo             prefork_sessions.demo, the werkzeug demo (its own pages)
    read, counter    the werkzeug session layer on MmapStore
    diskcache        the counter, the session layer on a diskcache.Cache
    redis            the counter, the session layer on the package's RedisStore
    flask-cookie     Flask's default signed-cookie session (SECRET_KEY: BENCH_SECRET)
    flask-ours       Flask with prefork_sessions.flask.init_app on MmapStore
    flask-redis      Flask-Session, SESSION_TYPE="redis" (BENCH_REDIS_PORT)
    flask-cachelib   Flask-Session, SESSION_TYPE="cachelib", a FileSystemCache
    django-*         the Django project of bench_django_app.py

Every session app but the demo answers ``GET /init`` (writes ``visits = 1``, so a cookie
exists), ``GET /`` (the measured request: ``{"visits": n}``, incremented first
unless read-only) and ``GET /peek`` (reads the count, changes nothing).  Each
worker tallies the measured requests and those that found no session, and
writes the tally to ``$BENCH_TALLY_DIR/tally-<pid>.json`` when it exits: a
benchmark of a session that does not work (every request a new session) shows.

diskcache gets a SessionStore adapter here, with the atomic read-modify-write
its documentation recommends (``Cache.transact()``).  Settings come from the
environment: PREFORK_SESSIONS_PATH and PREFORK_SESSIONS_SIZE (as
gunicorn_conf.py), BENCH_DISKCACHE_DIR, BENCH_REDIS_PORT, BENCH_CACHELIB_DIR,
BENCH_SECRET, and bench_django_app's variables.

``python3 stress/bench_apps.py N VARIANT...`` prints, as JSON, the microseconds one
request to ``GET /`` costs each app called in-process (no HTTP, no gunicorn; at
most one Django variant per process, as Django is configured once).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
import timeit
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Request, Response

from prefork_sessions import MmapStore, RedisStore, with_session

HELLO = b"Hello, World!"
KEY = "visits"


class Tally:
    """This worker's measured requests and how many of them found no session."""

    def __init__(self) -> None:
        self.served = self.lost = 0
        self._lock = threading.Lock()  # gthread workers count from several threads
        directory = os.environ.get("BENCH_TALLY_DIR")
        if directory:
            atexit.register(self._dump, directory)

    def visit(self, session: MutableMapping[str, Any], write: bool) -> int:
        """Count this request; increment the session's counter when ``write``."""
        n = session.get(KEY)
        with self._lock:
            self.served += 1
            self.lost += n is None
        if write:
            session[KEY] = n = (n or 0) + 1
        return n or 0

    def _dump(self, directory: str) -> None:
        with open(os.path.join(directory, f"tally-{os.getpid()}.json"), "w") as f:
            json.dump({"served": self.served, "lost": self.lost}, f)


def answer(n: int) -> bytes:
    return orjson.dumps({KEY: n})


def split(variant: str) -> tuple[str, bool]:
    """(engine variant, writes?): ``flask-ours-read`` -> (``flask-ours``, False)."""
    if variant == "read":
        return "counter", False
    base = variant.removesuffix("-read")
    return base, base == variant


class DiskcacheStore:
    """SessionStore on diskcache (sqlite): get_and_set in a transaction."""

    def __init__(self, directory: str) -> None:
        import diskcache

        self.cache = diskcache.Cache(directory)

    def get(self, key: str, default: Any = None) -> Any:
        return self.cache.get(key, default)

    def set(self, key: str, value: Any, expire: float | None = None) -> None:
        self.cache.set(key, value, expire=expire or None)

    def delete(self, key: str) -> bool:
        return bool(self.cache.delete(key))

    def get_and_set(self, key: str, fn: Callable[[Any], Any], expire: float | None = None) -> Any:
        with self.cache.transact():
            value = fn(self.cache.get(key))
            self.cache.set(key, value, expire=expire or None)
        return value


def _mmap_store() -> MmapStore:
    return MmapStore(os.environ.get("PREFORK_SESSIONS_PATH") or None,
                     app_name="prefork_sessions_bench", cache_size=_store_size())


def _store_size() -> int:
    return int(os.environ.get("PREFORK_SESSIONS_SIZE") or 16 << 20)


def _redis_url() -> str:
    return f"redis://127.0.0.1:{int(os.environ['BENCH_REDIS_PORT'])}/0"


def hello_app() -> Any:
    @Request.application  # type: ignore[arg-type]
    def app(request: Request) -> Response:
        return Response(HELLO, mimetype="text/plain")

    return app


def session_app(store: Any, write: bool) -> Any:
    tally = Tally()

    @with_session(store)
    def app(request: Any) -> Response:
        session = request.session
        if request.path == "/":
            n = tally.visit(session, write)
        elif request.path == "/init":
            session[KEY] = n = 1
        elif request.path == "/peek":
            n = session.get(KEY, 0)
        else:
            raise NotFound()
        return Response(answer(n), mimetype="application/json")

    return app


def flask_app(engine: str, write: bool) -> Any:
    """Flask with the session interface ``engine`` names (see the module docstring)."""
    from flask import Flask, session

    app = Flask("bench_flask")
    app.config["SECRET_KEY"] = os.environ["BENCH_SECRET"]
    if engine == "flask-ours":
        from prefork_sessions.flask import init_app

        app.config.update(PREFORK_SESSIONS_PATH=os.environ["PREFORK_SESSIONS_PATH"],
                          PREFORK_SESSIONS_CACHE_SIZE=_store_size())
        init_app(app)
    elif engine in ("flask-redis", "flask-cachelib"):
        from flask_session import Session

        if engine == "flask-redis":
            import redis

            # JSON, as ours stores (Flask-Session's default is msgpack): like for like
            app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(_redis_url()),
                              SESSION_SERIALIZATION_FORMAT="json")
        else:
            from cachelib import FileSystemCache

            app.config.update(SESSION_TYPE="cachelib",
                              SESSION_CACHELIB=FileSystemCache(os.environ["BENCH_CACHELIB_DIR"]))
        Session(app)
    elif engine != "flask-cookie":
        raise ValueError(f"unknown Flask variant {engine!r}")
    tally = Tally()

    @app.get("/init")
    def init() -> bytes:
        session[KEY] = 1
        return answer(1)

    @app.get("/peek")
    def peek() -> bytes:
        return answer(session.get(KEY, 0))

    @app.get("/")
    def visit() -> bytes:
        return answer(tally.visit(session, write))

    return app


def make(variant: str) -> Any:
    """The WSGI app for ``variant`` (see the module docstring)."""
    engine, write = split(variant)
    if variant == "hello":
        return hello_app()
    if engine == "counter":
        return session_app(_mmap_store(), write)
    if variant == "demo":
        from prefork_sessions.demo import app

        return app
    if variant == "diskcache":
        return session_app(DiskcacheStore(os.environ["BENCH_DISKCACHE_DIR"]), write=True)
    if variant == "redis":
        return session_app(RedisStore(_redis_url()), write=True)
    if engine.startswith("flask-"):
        return flask_app(engine, write)
    if engine.startswith("django-"):
        os.environ["BENCH_DJANGO_VARIANT"] = variant
        import bench_django_app

        return bench_django_app.application
    raise ValueError(f"unknown variant {variant!r}")


def profiled(variant: str) -> Any:
    """``make(variant)`` with every request under cProfile; the stats go to
    $BENCH_PROFILE when the worker exits (bench_http.py --profile)."""
    import cProfile

    app = make(variant)
    prof = cProfile.Profile()

    def wrapped(environ: Any, start_response: Any) -> Any:
        prof.enable()
        try:
            return list(app(environ, start_response))
        finally:
            prof.disable()

    atexit.register(lambda: prof.dump_stats(os.environ["BENCH_PROFILE"]))
    wrapped.session_store = getattr(app, "session_store", None)  # type: ignore[attr-defined]
    return wrapped


def inprocess_cost(variant: str, calls: int, budget: float = 0.5) -> float:
    """CPU microseconds per ``GET /`` of ``variant``'s app called directly, best of 3 runs
    of at most ``calls`` calls (fewer when ``calls`` would take over ``budget`` s)."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    app = make(variant)
    headers = {}
    if variant != "hello":  # the demo's own page starts a session
        init = EnvironBuilder(path="/" if variant == "demo" else "/init").get_environ()
        _, _, h = run_wsgi_app(app, init)
        headers["Cookie"] = h["Set-Cookie"].split(";", 1)[0]
    environ = EnvironBuilder(path="/", headers=headers).get_environ()

    def call() -> None:
        body, _, _ = run_wsgi_app(app, dict(environ))
        b"".join(body)

    # CPU time of this process, not the wall clock: other load on the machine
    # (descheduling) would otherwise land inside the figure.
    estimate = timeit.timeit(call, number=20, timer=time.process_time) / 20
    number = max(20, min(calls, int(budget / max(estimate, 1e-9))))
    return min(timeit.repeat(call, number=number, repeat=3, timer=time.process_time)) / number * 1e6


def main(calls: int, variants: list[str]) -> dict[str, float]:
    """In-process costs of ``variants``, each on its own store file in $BENCH_INPROCESS_DIR."""
    cost = {}
    for v in variants:
        os.environ["PREFORK_SESSIONS_PATH"] = os.path.join(os.environ["BENCH_INPROCESS_DIR"], f"{v}.store")
        cost[v] = inprocess_cost(v, calls)
    return cost


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2:])))
