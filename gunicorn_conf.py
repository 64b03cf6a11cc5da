"""gunicorn settings for prefork_sessions: ``gunicorn -c gunicorn_conf.py``.

Serves the demo app (``prefork_sessions.demo:app``) on 127.0.0.1:8000 with every
worker sharing one session file.  Environment variables (defaults in brackets):

    PREFORK_SESSIONS_BIND      listen address                 [127.0.0.1:8000]
    PREFORK_SESSIONS_WORKERS   worker processes               [4]
    PREFORK_SESSIONS_THREADS   threads per worker; >1 means gthread workers [1]
    PREFORK_SESSIONS_PRELOAD   1: load the app in the master  [0]
    PREFORK_SESSIONS_APP       the WSGI app, module:name      [prefork_sessions.demo:app]
    PREFORK_SESSIONS_PATH      session file  [<tempdir>/prefork_sessions_demo_session_data]
    PREFORK_SESSIONS_SIZE      file size in bytes, used when it is created [16777216]
    PREFORK_SESSIONS_REDIS_URL keep sessions in Redis at this URL instead   [unset]
    PREFORK_SESSIONS_SECRET    secret for the session-id digest, >= 32 bytes, the same
                               for every worker                              [unset]

Command-line options override these (``gunicorn -c gunicorn_conf.py -w 8 --preload``).
The hooks come from ``prefork_sessions.gunicorn`` (see there): on_starting creates or
checks the store in the master, post_fork reopens inherited stores in each worker.
For your own app, set PREFORK_SESSIONS_APP and open your MmapStore at
PREFORK_SESSIONS_PATH, or write your own config that imports the same hooks.
"""

import os

from prefork_sessions.gunicorn import child_exit, on_starting, post_fork

__all__ = ["child_exit", "on_starting", "post_fork"]  # gunicorn reads the hooks by these names


def _env_int(name, default):
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


bind = os.environ.get("PREFORK_SESSIONS_BIND", "127.0.0.1:8000")
workers = _env_int("PREFORK_SESSIONS_WORKERS", 4)
threads = _env_int("PREFORK_SESSIONS_THREADS", 1)  # gunicorn runs gthread workers when > 1
preload_app = os.environ.get("PREFORK_SESSIONS_PRELOAD", "0").lower() in ("1", "true", "yes", "on")
wsgi_app = os.environ.get("PREFORK_SESSIONS_APP", "prefork_sessions.demo:app")
