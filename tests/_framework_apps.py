"""A Flask app and a Django app for tests/test_live_frameworks.py, served by real gunicorn:
``PREFORK_SESSIONS_APP=_framework_apps:flask_app()`` (or ``django_app()``) with
``--pythonpath tests``.  Factories, so that gunicorn builds only the one it serves
(the Django one configures Django's settings).  Both use the store file
``PREFORK_SESSIONS_PATH`` names and ``PREFORK_SESSIONS_SECRET`` as their secret key.

    /bump/<key>          session[key] += 1      {"worker": pid, "value": n}
    /read                the session            {"worker": pid, "session": {...}}
    /slow-write?gate=D   loads the session, creates D/loaded, waits for D/go,
                         then sets session["late"] (a write racing whatever the
                         test does in between)
    /logout              ends the session
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

GATE_TIMEOUT = 20.0  # seconds /slow-write waits for the test to open its gate


def _store_settings() -> tuple[str, int, str]:
    return (os.environ["PREFORK_SESSIONS_PATH"], int(os.environ["PREFORK_SESSIONS_SIZE"]),
            os.environ["PREFORK_SESSIONS_SECRET"])


def _pass_gate(gate: str) -> None:
    """Say the session is loaded, then wait (bounded) until the test says go."""
    where = Path(gate)
    (where / "loaded").touch()
    deadline = time.monotonic() + GATE_TIMEOUT
    while not (where / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{where / 'go'} did not appear within {GATE_TIMEOUT} s")
        time.sleep(0.005)


def flask_app() -> Any:
    """The Flask app, on prefork_sessions.flask.init_app and Flask's own config keys."""
    from flask import Flask, jsonify, request, session

    from prefork_sessions.flask import init_app

    path, size, secret = _store_settings()
    app = Flask("framework_apps")
    app.config.update(SECRET_KEY=secret, PREFORK_SESSIONS_PATH=path,
                      PREFORK_SESSIONS_CACHE_SIZE=size)
    init_app(app)

    @app.get("/bump/<key>")
    def bump(key: str) -> Any:
        session[key] = value = session.get(key, 0) + 1
        return jsonify(worker=os.getpid(), value=value)

    @app.get("/read")
    def read() -> Any:
        return jsonify(worker=os.getpid(), session=dict(session))

    @app.get("/slow-write")
    def slow_write() -> Any:
        session.get("seed")  # loads the session
        _pass_gate(request.args["gate"])
        session["late"] = True
        return jsonify(worker=os.getpid())

    @app.get("/logout")
    def logout() -> Any:
        session.clear()
        return jsonify(worker=os.getpid())

    return app


def _django_views() -> list[Any]:
    from django.http import HttpRequest, JsonResponse
    from django.urls import path

    def bump(request: HttpRequest, key: str) -> JsonResponse:
        request.session[key] = value = request.session.get(key, 0) + 1
        return JsonResponse({"worker": os.getpid(), "value": value})

    def read(request: HttpRequest) -> JsonResponse:
        return JsonResponse({"worker": os.getpid(), "session": dict(request.session.items())})

    def slow_write(request: HttpRequest) -> JsonResponse:
        request.session.get("seed")  # loads the session
        _pass_gate(request.GET["gate"])
        request.session["late"] = True
        return JsonResponse({"worker": os.getpid()})

    def logout(request: HttpRequest) -> JsonResponse:
        request.session.flush()
        return JsonResponse({"worker": os.getpid()})

    return [path("bump/<str:key>", bump), path("read", read), path("slow-write", slow_write),
            path("logout", logout)]


urlpatterns: list[Any] = []  # ROOT_URLCONF; filled by django_app()


def django_app() -> Any:
    """The Django app: SessionMiddleware on SESSION_ENGINE = "prefork_sessions.django"."""
    import django
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    store_path, size, secret = _store_settings()
    settings.configure(
        SECRET_KEY=secret,
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["127.0.0.1"],
        INSTALLED_APPS=["django.contrib.sessions"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
        SESSION_ENGINE="prefork_sessions.django",
        PREFORK_SESSIONS={"path": store_path, "cache_size": size},
        USE_TZ=True,
    )
    django.setup()
    urlpatterns[:] = _django_views()
    return get_wsgi_application()
