"""The demo as a Django project in one module:
``PREFORK_SESSIONS_APP=django gunicorn -c gunicorn_conf.py``.

The same pages as ``prefork_sessions.demo`` (see ``_demo``), with Django's
``SessionMiddleware`` (ours: Django's plus a 503 while Redis is unreachable) and
``request.session`` on ``SESSION_ENGINE =
"prefork_sessions.django"``, on the store the environment names
(``PREFORK_SESSIONS = {"path": ..., "redis_url": ...}`` from the same variables as
the other demos).  ``SECRET_KEY`` is ``PREFORK_SESSIONS_SECRET``; gunicorn_conf.py
makes up one per server start when it is unset.  When Django's settings are
already configured (``DJANGO_SETTINGS_MODULE``), they are used as they are.
"""

from __future__ import annotations

import os
from typing import Any

import django  # type: ignore[import-untyped]  # Django ships no type hints
from django.conf import settings  # type: ignore[import-untyped]
from django.http import HttpRequest, HttpResponse  # type: ignore[import-untyped]
from django.urls import path  # type: ignore[import-untyped]

from ._demo import page, session_secret, store_size
from .gunicorn import APP_NAME, PATH_ENV, REDIS_ENV

__all__ = ["application", "urlpatterns"]


def _settings() -> dict[str, Any]:
    redis_url = os.environ.get(REDIS_ENV) or None
    store: dict[str, Any] = {"redis_url": redis_url} if redis_url else {
        "path": os.environ.get(PATH_ENV) or None, "cache_size": store_size()}
    if not redis_url and store["path"] is None:
        from ._store import default_path

        store["path"] = default_path(APP_NAME)  # the file the other demos and the hooks use
    return {
        "SECRET_KEY": (session_secret() or os.urandom(32)).hex(),  # random: this process only
        "ROOT_URLCONF": __name__,
        "ALLOWED_HOSTS": ["127.0.0.1", "localhost", "[::1]"],
        "INSTALLED_APPS": ["django.contrib.sessions"],
        "MIDDLEWARE": ["prefork_sessions.django.SessionMiddleware"],  # Django's, 503 on outages
        "SESSION_ENGINE": "prefork_sessions.django",
        "PREFORK_SESSIONS": store,
        "USE_TZ": True,
    }


def _answer(request: HttpRequest, state: dict[str, object]) -> HttpResponse:
    body, content_type = page("Django", request.path, state, request.headers.get("Accept"))
    response = HttpResponse(body, content_type=content_type)
    response["Vary"] = "Accept"  # SessionMiddleware adds Cookie
    return response


def visits(request: HttpRequest) -> HttpResponse:
    """Count this session's visits."""
    request.session["visits"] = count = request.session.get("visits", 0) + 1
    return _answer(request, {"visits": count, "worker": os.getpid(),
                             "logged_in": bool(request.session.get("logged_in"))})


def login(request: HttpRequest) -> HttpResponse:
    """A fresh session key for the same data, marked logged in."""
    request.session.cycle_key()
    request.session["logged_in"] = True
    return _answer(request, {"logged_in": True, "worker": os.getpid()})


def logout(request: HttpRequest) -> HttpResponse:
    """End the session: deleted from the store, its cookie expired."""
    request.session.flush()
    return _answer(request, {"logged_in": False, "worker": os.getpid()})


def stats(request: HttpRequest) -> HttpResponse:
    """The store's counters."""
    from .django import get_store

    return _answer(request, dict(get_store().stats()))


urlpatterns = [path("", visits), path("login", login), path("logout", logout), path("stats", stats)]

if not settings.configured:
    settings.configure(**_settings())
django.setup()

from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]  # after settings, as Django asks

application = get_wsgi_application()
