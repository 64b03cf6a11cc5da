"""The WSGI apps stress/bench_http.py serves under gunicorn, one per variant.

Every app is built by ``make(variant)`` (gunicorn: ``-c gunicorn_conf.py`` with
``PREFORK_SESSIONS_APP='bench_apps:make("counter")'`` and stress/ on PYTHONPATH):

    hello        plain werkzeug hello-world, no session
    read         the session layer on MmapStore; the session is only read
    counter      the session layer on MmapStore; a counter written every request
    diskcache    the same counter, the session layer on a diskcache.Cache
    redis        the same counter, the session layer on the package's RedisStore
                 and a real redis-server

``GET /init`` writes the session (so a cookie exists); ``GET /`` is the measured
request.  diskcache gets a SessionStore adapter here, with the atomic
read-modify-write its documentation recommends (``Cache.transact()``); Redis uses
the package's own RedisStore (WATCH/MULTI).
The store settings come from the environment: PREFORK_SESSIONS_PATH and
PREFORK_SESSIONS_SIZE (as gunicorn_conf.py), BENCH_DISKCACHE_DIR, BENCH_REDIS_PORT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import orjson
from werkzeug.wrappers import Request, Response

from prefork_sessions import MmapStore, RedisStore, with_session

HELLO = b"Hello, World!"


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
                     app_name="prefork_sessions_bench",
                     cache_size=int(os.environ.get("PREFORK_SESSIONS_SIZE") or 16 << 20))


def hello_app() -> Any:
    @Request.application  # type: ignore[arg-type]
    def app(request: Request) -> Response:
        return Response(HELLO, mimetype="text/plain")

    return app


def session_app(store: Any, write: bool) -> Any:
    @with_session(store)
    def app(request: Any) -> Response:
        session = request.session
        if request.path == "/init" or write:
            session["visits"] = session.get("visits", 0) + 1
        return Response(orjson.dumps({"visits": session.get("visits", 0)}),
                        mimetype="application/json")

    return app


def make(variant: str) -> Any:
    """The WSGI app for ``variant`` (see the module docstring)."""
    if variant == "hello":
        return hello_app()
    if variant in ("read", "counter"):
        return session_app(_mmap_store(), write=variant == "counter")
    if variant == "diskcache":
        return session_app(DiskcacheStore(os.environ["BENCH_DISKCACHE_DIR"]), write=True)
    if variant == "redis":
        url = f"redis://127.0.0.1:{int(os.environ['BENCH_REDIS_PORT'])}/0"
        return session_app(RedisStore(url), write=True)
    raise ValueError(f"unknown variant {variant!r}")


def profiled(variant: str) -> Any:
    """``make(variant)`` with every request under cProfile; the stats go to
    $BENCH_PROFILE when the worker exits (bench_http.py --profile)."""
    import atexit
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
