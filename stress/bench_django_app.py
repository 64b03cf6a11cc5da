"""The Django project of stress/bench_http.py, in one module: one session engine per server.

``$BENCH_DJANGO_VARIANT`` picks the engine (``-read``: the measured view only
reads the session; otherwise it increments a counter in it):

    django-cookie  django.contrib.sessions.backends.signed_cookies
    django-ours    prefork_sessions.django on MmapStore (PREFORK_SESSIONS_PATH)
    django-cache   django.contrib.sessions.backends.cache on Django's default
                   cache, LocMemCache: one per process, so a session lives only
                   in the worker that made it
    django-file    django.contrib.sessions.backends.file in $BENCH_DJANGO_FILES
    django-db      django.contrib.sessions.backends.db on sqlite ($BENCH_DJANGO_DB),
                   persistent connections; its table made by ``migrate()`` first

Views as in bench_apps: ``/init``, ``/`` (measured, tallied) and ``/peek``.
Settings are Django's defaults otherwise (SessionMiddleware only, JSON serializer).
"""

from __future__ import annotations

import os
from typing import Any

import django
from bench_apps import KEY, Tally, answer, split
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path

ENGINES = {
    "django-cookie": "django.contrib.sessions.backends.signed_cookies",
    "django-ours": "prefork_sessions.django",
    "django-cache": "django.contrib.sessions.backends.cache",
    "django-file": "django.contrib.sessions.backends.file",
    "django-db": "django.contrib.sessions.backends.db",
}

VARIANT = os.environ["BENCH_DJANGO_VARIANT"]
ENGINE, WRITE = split(VARIANT)


def _settings() -> dict[str, Any]:
    tmp = os.path.dirname(os.environ["PREFORK_SESSIONS_PATH"])
    return {
        "SECRET_KEY": os.environ["BENCH_SECRET"],
        "ROOT_URLCONF": __name__,
        "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
        "INSTALLED_APPS": ["django.contrib.sessions"],
        "MIDDLEWARE": ["django.contrib.sessions.middleware.SessionMiddleware"],
        "SESSION_ENGINE": ENGINES[ENGINE],
        "PREFORK_SESSIONS": {"path": os.environ["PREFORK_SESSIONS_PATH"],
                             "cache_size": int(os.environ.get("PREFORK_SESSIONS_SIZE") or 16 << 20)},
        "SESSION_FILE_PATH": os.environ.get("BENCH_DJANGO_FILES") or tmp,
        "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3",
                                  "NAME": os.environ.get("BENCH_DJANGO_DB") or os.path.join(tmp, "db.sqlite3"),
                                  "CONN_MAX_AGE": None}},
        "USE_TZ": True,
    }


tally = Tally()


def init(request: HttpRequest) -> HttpResponse:
    request.session[KEY] = 1
    return HttpResponse(answer(1), content_type="application/json")


def peek(request: HttpRequest) -> HttpResponse:
    return HttpResponse(answer(request.session.get(KEY, 0)), content_type="application/json")


def visit(request: HttpRequest) -> HttpResponse:
    return HttpResponse(answer(tally.visit(request.session, WRITE)), content_type="application/json")


urlpatterns = [path("", visit), path("init", init), path("peek", peek)]

settings.configure(**_settings())
django.setup()

from django.core.wsgi import get_wsgi_application  # after settings, as Django asks

application = get_wsgi_application()


def migrate() -> None:
    """Create the sessions table (the db engine's), once, before gunicorn starts."""
    from django.core.management import call_command

    call_command("migrate", "sessions", verbosity=0, interactive=False)
