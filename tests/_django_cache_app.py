"""A Django project on ``prefork_sessions.django.MmapCache``, for the live test in
tests/test_django_cache.py: ``PREFORK_SESSIONS_APP=_django_cache_app:application()``
with ``--pythonpath tests``.  The cache file is ``PREFORK_SESSIONS_CACHE_PATH``
(its own, not the session file gunicorn_conf.py's hooks check).

    /page          a @cache_page view: counts its computations in the cache
                   ("computations") and answers who computed it, with a random token
    /computations  {"computations": n} (not cached)
    /count         atomically increments "hits" in the cache: {"worker": pid, "n": n}
    /hits          {"hits": n}

Every response carries ``X-Worker: <pid>`` of the worker that served it, added
outside the page cache, so a cached page tells which worker served it.  A request
with ``X-Gate: D`` and ``X-Gate-Workers: n`` first waits (bounded) until n
distinct workers have come to the gate directory D: with sync workers, n
concurrent gated requests are then served by n different workers.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_PATH_ENV = "PREFORK_SESSIONS_CACHE_PATH"
PAGE_TIMEOUT = 300  # seconds /page stays cached
GATE_TIMEOUT = 20.0  # seconds a gated request waits for the other workers


def _pass_gate(gate: str, workers: int) -> None:
    where = Path(gate)
    (where / str(os.getpid())).touch()
    deadline = time.monotonic() + GATE_TIMEOUT
    while len(os.listdir(where)) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{workers} workers did not reach {where} within {GATE_TIMEOUT} s")
        time.sleep(0.005)


def worker_header(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Middleware: the gate, and the serving worker's pid on every response, cached or not."""

    def middleware(request: Any) -> Any:
        if "X-Gate" in request.headers:
            _pass_gate(request.headers["X-Gate"], int(request.headers["X-Gate-Workers"]))
        response = get_response(request)
        response["X-Worker"] = str(os.getpid())
        return response

    return middleware


def _views() -> list[Any]:
    from django.core.cache import cache
    from django.http import HttpRequest, JsonResponse
    from django.urls import path
    from django.views.decorators.cache import cache_page

    def bump(key: str) -> int:
        cache.add(key, 0, timeout=None)
        n: int = cache.incr(key)
        return n

    @cache_page(PAGE_TIMEOUT)
    def page(request: HttpRequest) -> JsonResponse:
        return JsonResponse({"computed_by": os.getpid(), "computation": bump("computations"),
                             "token": secrets.token_hex(16)})

    def computations(request: HttpRequest) -> JsonResponse:
        return JsonResponse({"computations": cache.get("computations")})

    def count(request: HttpRequest) -> JsonResponse:
        return JsonResponse({"worker": os.getpid(), "n": bump("hits")})

    def hits(request: HttpRequest) -> JsonResponse:
        return JsonResponse({"hits": cache.get("hits")})

    return [path("page", page), path("computations", computations), path("count", count),
            path("hits", hits)]


urlpatterns: list[Any] = []  # ROOT_URLCONF; filled by application()


def application() -> Any:
    """The WSGI app.  Opens the cache at once, so that a ``--preload`` master holds
    the store its workers inherit (each reopens it after the fork)."""
    import django
    from django.conf import settings
    from django.core.cache import caches
    from django.core.wsgi import get_wsgi_application

    settings.configure(
        SECRET_KEY=secrets.token_urlsafe(32),  # nothing here is signed across workers
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["127.0.0.1"],
        MIDDLEWARE=[f"{__name__}.worker_header"],
        CACHES={"default": {"BACKEND": "prefork_sessions.django.MmapCache",
                            "LOCATION": os.environ[CACHE_PATH_ENV],
                            "OPTIONS": {"cache_size": 1 << 20, "page_size": 16 << 10}}},
        USE_TZ=True,
    )
    django.setup()
    urlpatterns[:] = _views()
    caches["default"]  # makes this thread's MmapCache, which opens the store
    return get_wsgi_application()
