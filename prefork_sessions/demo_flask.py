"""The demo as a Flask app: ``PREFORK_SESSIONS_APP=flask gunicorn -c gunicorn_conf.py``.

The same pages as ``prefork_sessions.demo`` (see ``_demo``), with Flask's own
``session`` on :class:`~prefork_sessions.flask.PreforkSessionInterface`, on the
store the environment names.  ``SECRET_KEY`` is ``PREFORK_SESSIONS_SECRET``;
gunicorn_conf.py makes up one per server start when it is unset, so sessions
last until gunicorn restarts; set it to keep them longer.
"""

from __future__ import annotations

import os

from flask import Flask, Response, request, session

from ._demo import open_store, page, session_secret
from .flask import PreforkSession, init_app

__all__ = ["app", "store"]

APP_NAME = "prefork_sessions_demo"

app = Flask(__name__)
app.config["SECRET_KEY"] = session_secret() or os.urandom(32)  # a random key: this process only
app.config["SESSION_COOKIE_SAMESITE"] = "Lax"  # Flask's default sends no SameSite at all
store = open_store(app_name=APP_NAME)
init_app(app, store)


def _answer(state: dict[str, object]) -> Response:
    body, content_type = page("Flask", request.path, state, request.environ.get("HTTP_ACCEPT"))
    response = Response(body, content_type=content_type)
    response.headers.add("Vary", "Accept")  # the interface adds Cookie (response.vary)
    return response


@app.get("/")
def visits() -> Response:
    """Count this session's visits."""
    session["visits"] = count = session.get("visits", 0) + 1
    session.permanent = True
    return _answer({"visits": count, "worker": os.getpid(),
                    "logged_in": bool(session.get("logged_in"))})


@app.get("/login")
def login() -> Response:
    """A fresh session id for the same data, marked logged in."""
    assert isinstance(session, PreforkSession)  # init_app above: always ours
    session.rotate()
    session["logged_in"] = True
    return _answer({"logged_in": True, "worker": os.getpid()})


@app.get("/logout")
def logout() -> Response:
    """End the session: deleted from the store, its cookie expired."""
    session.clear()
    return _answer({"logged_in": False, "worker": os.getpid()})


@app.get("/stats")
def stats() -> Response:
    """The store's counters."""
    return _answer(dict(store.stats()))
