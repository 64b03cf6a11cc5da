"""A demo app: a visit counter shared by every gunicorn worker.

Run it with ``gunicorn -c gunicorn_conf.py`` (the config's default app), then::

    curl -c jar -b jar http://127.0.0.1:8000/        # {"visits": 1, "worker": 4242}
    curl -c jar -b jar http://127.0.0.1:8000/login   # new session id, same data
    curl -c jar -b jar http://127.0.0.1:8000/logout  # session deleted, cookie expired
    curl http://127.0.0.1:8000/stats                 # the store's counters

The store file's path and size come from the environment variables that
gunicorn_conf.py also reads (``PREFORK_SESSIONS_PATH``, ``PREFORK_SESSIONS_SIZE``);
``PREFORK_SESSIONS_REDIS_URL`` selects a RedisStore on that server instead.
``PREFORK_SESSIONS_SECRET`` (at least 32 bytes, the same for every worker) keys
the digest the store files sessions under; unset, a plain SHA-256 of the id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import orjson
from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Response

from ._errors import InvalidArgumentError
from ._redis import RedisStore
from ._session import MIN_SECRET_BYTES
from ._store import MmapStore
from ._wsgi import SessionRequest, with_session
from .gunicorn import APP_NAME, DEFAULT_SIZE, PATH_ENV, REDIS_ENV, SECRET_ENV, SIZE_ENV

# the settings the gunicorn hooks read too: one definition, in prefork_sessions.gunicorn


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


def open_store(environ: Mapping[str, str] = os.environ) -> MmapStore | RedisStore:
    """Open (or create) the demo's store as configured by the environment."""
    if environ.get(REDIS_ENV):
        return RedisStore(environ[REDIS_ENV], prefix=f"{APP_NAME}:")
    return MmapStore(
        environ.get(PATH_ENV) or None, app_name=APP_NAME, cache_size=store_size(environ)
    )


store = open_store()


def _json(value: object, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status=status, mimetype="application/json")


@with_session(store, secret=session_secret())
def app(request: SessionRequest) -> Response:
    """GET / counts visits; /login rotates the id; /logout ends the session; /stats."""
    session = request.session
    if request.path == "/":
        session["visits"] = session.get("visits", 0) + 1
        return _json({"visits": session["visits"], "worker": os.getpid()})
    if request.path == "/login":
        session.rotate()
        session["logged_in"] = True
        return _json({"logged_in": True, "worker": os.getpid()})
    if request.path == "/logout":
        session.invalidate()
        return _json({"logged_in": False, "worker": os.getpid()})
    if request.path == "/stats":
        return _json(store.stats())
    raise NotFound()
