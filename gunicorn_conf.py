"""gunicorn settings for prefork_sessions: ``gunicorn -c gunicorn_conf.py``.

Serves a demo app on 127.0.0.1:8000 with every worker sharing one session file:
the werkzeug demo by default, its Flask or Django twin with
``PREFORK_SESSIONS_APP=flask`` or ``=django``, or your own app.  Environment
variables (defaults in brackets):

    PREFORK_SESSIONS_APP       werkzeug, flask, django, or module:name of any WSGI app [werkzeug]
    PREFORK_SESSIONS_BIND      listen address                 [127.0.0.1:8000]
    PREFORK_SESSIONS_WORKERS   worker processes               [4]
    PREFORK_SESSIONS_THREADS   threads per worker: >1 runs gthread workers, 1 sync workers [4]
    PREFORK_SESSIONS_PRELOAD   1: load the app in the master  [0]
    PREFORK_SESSIONS_PATH      session file  [<tempdir>/prefork_sessions_demo_session_data]
    PREFORK_SESSIONS_SIZE      file size in bytes, used when it is created [16777216]
    PREFORK_SESSIONS_REDIS_URL keep sessions in Redis at this URL instead   [unset]
    PREFORK_SESSIONS_SECRET    secret for the session-id digest (and the Flask and Django
                               demos' SECRET_KEY), >= 32 bytes, the same for every
                               worker; for those two demos a random one is made at each
                               start when it is unset, so their sessions end on restart [unset]

Threads by default, because a browser opens connections it may never use: a sync
worker serves one connection at a time, so a few idle browser connections pin
every sync worker and the next visitor waits until gunicorn kills them (30 s).
gthread workers park idle connections and serve whichever speaks.  Use sync workers
(``PREFORK_SESSIONS_THREADS=1``) only behind a buffering proxy such as nginx.

Command-line options override these (``gunicorn -c gunicorn_conf.py -w 8 --preload``).
The hooks come from ``prefork_sessions.gunicorn`` (see there): on_starting creates or
checks the store in the master, post_fork reopens inherited stores in each worker.
For your own app, set PREFORK_SESSIONS_APP and open your MmapStore at
PREFORK_SESSIONS_PATH, or write your own config that imports the same hooks.
"""

import os
import secrets

from prefork_sessions.gunicorn import SECRET_ENV, child_exit, on_starting, post_fork

__all__ = ["child_exit", "on_starting", "post_fork"]  # gunicorn reads the hooks by these names

DEMOS = {
    "werkzeug": "prefork_sessions.demo:app",
    "flask": "prefork_sessions.demo_flask:app",
    "django": "prefork_sessions.demo_django:application",
}


def _env_int(name, default):
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


_app = os.environ.get("PREFORK_SESSIONS_APP") or "werkzeug"
if _app in ("flask", "django") and not os.environ.get(SECRET_ENV):
    # Their SECRET_KEY must be the same in every worker: made here, inherited by all.
    os.environ[SECRET_ENV] = secrets.token_urlsafe(32)

bind = os.environ.get("PREFORK_SESSIONS_BIND", "127.0.0.1:8000")
workers = _env_int("PREFORK_SESSIONS_WORKERS", 4)
threads = _env_int("PREFORK_SESSIONS_THREADS", 4)  # gunicorn runs gthread workers when > 1
preload_app = os.environ.get("PREFORK_SESSIONS_PRELOAD", "0").lower() in ("1", "true", "yes", "on")
wsgi_app = DEMOS.get(_app, _app)
