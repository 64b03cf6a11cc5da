"""What the three demo apps (werkzeug, Flask, Django) share: their settings and their pages.

Each demo serves the same four pages, and answers a browser with HTML that says
what it shows and links the others, anything else (curl, ``Accept:
application/json``) with JSON::

    /        {"visits": 3, "worker": 4242, "logged_in": false}   counts this session's visits
    /login   {"logged_in": true, "worker": 4242}                 new session id, same data
    /logout  {"logged_in": false, "worker": 4242}                session deleted, cookie expired
    /stats   the store's stats()

The page never shows the session id: the cookie is HttpOnly so that scripts on
the page cannot read it, and printing it would undo that.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from typing import Any

import orjson
from werkzeug.http import parse_accept_header

from ._base import StoreBase
from ._errors import InvalidArgumentError
from ._redis import RedisStore
from ._session import MIN_SECRET_BYTES
from ._store import MmapStore
from .gunicorn import APP_NAME, DEFAULT_SIZE, PATH_ENV, REDIS_ENV, SECRET_ENV, SIZE_ENV

__all__ = ["JSON", "PAGES", "open_store", "page", "session_secret", "store_size", "wants_html"]

JSON = "application/json"
HTML = "text/html; charset=utf-8"
PAGES = ("/", "/login", "/logout", "/stats")


def store_size(environ: Mapping[str, str] = os.environ) -> int:
    """The store size in bytes from ``PREFORK_SESSIONS_SIZE``; ValueError if not an integer."""
    raw = environ.get(SIZE_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_SIZE
    except ValueError:
        raise ValueError(
            f"{SIZE_ENV}={raw!r}: give the store size in bytes, e.g. {DEFAULT_SIZE}"
        ) from None


def session_secret(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The secret from ``PREFORK_SESSIONS_SECRET`` (its bytes), or None when unset or empty.

    Raises InvalidArgumentError, naming the variable but never its value, when it
    is shorter than MIN_SECRET_BYTES.
    """
    raw = environ.get(SECRET_ENV)
    if not raw:
        return None
    secret = os.fsencode(raw)  # the variable's own bytes, even if they are not UTF-8
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidArgumentError(
            f"{SECRET_ENV} is {len(secret)} bytes, shorter than {MIN_SECRET_BYTES}: set it to a "
            "random string, the same for every worker, e.g. the output of "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


def open_store(environ: Mapping[str, str] = os.environ, *, app_name: str = APP_NAME,
               serializer: str = "json") -> StoreBase:
    """Open (or create) a demo's store as configured by the environment: a RedisStore
    at ``PREFORK_SESSIONS_REDIS_URL``, else the MmapStore at ``PREFORK_SESSIONS_PATH``
    (default: the file ``app_name`` names in the temporary directory)."""
    if environ.get(REDIS_ENV):
        return RedisStore(environ[REDIS_ENV], prefix=f"{app_name}:", serializer=serializer)
    return MmapStore(
        environ.get(PATH_ENV) or None,
        app_name=app_name,
        cache_size=store_size(environ),
        serializer=serializer,
    )


def wants_html(accept: str | None) -> bool:
    """True if a client with this ``Accept`` header prefers HTML to JSON (a browser);
    no header, ``*/*`` (curl) and ``application/json`` get JSON."""
    if not accept or "html" not in accept:
        return False
    return parse_accept_header(accept).best_match((JSON, "text/html")) == "text/html"


def page(framework: str, path: str, state: Mapping[str, Any], accept: str | None) -> tuple[bytes, str]:
    """The body and content type answering ``path`` with ``state`` (the JSON object);
    the response varies by ``Accept`` (say so in ``Vary``)."""
    if not wants_html(accept):
        return orjson.dumps(state), JSON
    return _html(framework, path, state).encode(), HTML


_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:42em;margin:2em auto;padding:0 1em}"
    "nav a{margin-right:1em}output{font-weight:bold;font-size:1.4em}"
    "table{border-collapse:collapse}td{padding:.1em .8em;border-bottom:1px solid #ddd}"
    "code{background:#f4f4f4;padding:0 .2em}"
)


def _html(framework: str, path: str, state: Mapping[str, Any]) -> str:
    e = html.escape
    worker = e(str(state.get("worker", os.getpid())))
    if path == "/stats":
        rows = "".join(
            f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in state.items()
        )
        body = (
            "<h2>The store's counters</h2>"
            "<p>What <code>store.stats()</code> reports for the file (or Redis) that holds "
            "every session. Every worker reads and writes the same store.</p>"
            f"<table>{rows}</table>"
        )
    elif path == "/login":
        body = (
            "<h2>Logged in</h2>"
            "<p>The session got a new id (its data kept) and is marked logged in: a session "
            "id an attacker planted before the login is worthless now.</p>"
        )
    elif path == "/logout":
        body = (
            "<h2>Logged out</h2>"
            "<p>The session was deleted from the store and its cookie expired. The old id, "
            "replayed, starts a fresh session: it is not honoured.</p>"
        )
    else:
        visits = e(str(state.get("visits")))
        logged = "logged in" if state.get("logged_in") else "not logged in"
        body = (
            f"<h2>Visits in this session: <output id=visits>{visits}</output></h2>"
            f"<p>You are <b id=login>{logged}</b>. Reload the page: the count goes up by one "
            "each time, whichever worker process answers. The count lives in a server-side "
            "session that every gunicorn worker shares; your browser holds only an opaque, "
            "HttpOnly session cookie, which scripts on this page cannot read.</p>"
            "<p>Another browser, or a private window, gets a session of its own.</p>"
        )
    nav = "".join(f'<a href="{p}">{e(p)}</a>' for p in PAGES)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>prefork_sessions {e(framework)} demo</title><style>{_STYLE}</style></head>"
        f"<body><h1>prefork_sessions: {e(framework)} demo</h1>"
        f"<nav>{nav}</nav>{body}"
        f"<p><small>Answered by worker <span id=worker>{worker}</span>. "
        "Ask for JSON with <code>Accept: application/json</code>.</small></p>"
        "</body></html>"
    )
