"""A demo app: a visit counter shared by every gunicorn worker.

Run it with ``gunicorn -c gunicorn_conf.py`` (the config's default app), then::

    curl -c jar -b jar http://127.0.0.1:8000/        # {"visits":1,"worker":4242,"logged_in":false}
    curl -c jar -b jar http://127.0.0.1:8000/login   # new session id, same data
    curl -c jar -b jar http://127.0.0.1:8000/logout  # session deleted, cookie expired
    curl http://127.0.0.1:8000/stats                 # the store's counters

A browser gets the same pages as HTML that explains them (see ``_demo``).
The store file's path and size come from the environment variables that
gunicorn_conf.py also reads (``PREFORK_SESSIONS_PATH``, ``PREFORK_SESSIONS_SIZE``);
``PREFORK_SESSIONS_REDIS_URL`` selects a RedisStore on that server instead.
``PREFORK_SESSIONS_SECRET`` (at least 32 bytes, the same for every worker) keys
the digest the store files sessions under; unset, a plain SHA-256 of the id.
"""

from __future__ import annotations

import os

from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Response

from ._demo import open_store, page, session_secret, store_size
from ._wsgi import SessionRequest, with_session
from .gunicorn import SECRET_ENV

__all__ = ["SECRET_ENV", "app", "open_store", "session_secret", "store", "store_size"]

store = open_store()


@with_session(store, secret=session_secret())
def app(request: SessionRequest) -> Response:
    """GET / counts visits; /login rotates the id; /logout ends the session; /stats."""
    session, path = request.session, request.path
    if path == "/":
        session["visits"] = visits = session.get("visits", 0) + 1
        state = {"visits": visits, "worker": os.getpid(), "logged_in": bool(session.get("logged_in"))}
    elif path == "/login":
        session.rotate()
        session["logged_in"] = True
        state = {"logged_in": True, "worker": os.getpid()}
    elif path == "/logout":
        session.invalidate()
        state = {"logged_in": False, "worker": os.getpid()}
    elif path == "/stats":
        state = dict(store.stats())
    else:
        raise NotFound()
    body, content_type = page("werkzeug", path, state, request.environ.get("HTTP_ACCEPT"))
    response = Response(body, content_type=content_type)
    response.headers.add("Vary", "Accept")  # the session layer merges Cookie into it
    return response
