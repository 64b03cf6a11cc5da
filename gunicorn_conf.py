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
For your own app, set PREFORK_SESSIONS_APP and open your MmapStore at
PREFORK_SESSIONS_PATH, or copy this file and change the names.
"""

import json
import os
import pwd
import stat
import sys

import gunicorn.util

from prefork_sessions import (
    InvalidArgumentError,
    MmapStore,
    RedisStore,
    SessionOptions,
    SessionStoreError,
)

PATH_ENV = "PREFORK_SESSIONS_PATH"  # also read by prefork_sessions.demo
SIZE_ENV = "PREFORK_SESSIONS_SIZE"  # also read by prefork_sessions.demo
APP_NAME = "prefork_sessions_demo"  # names the default path, as in prefork_sessions.demo
REDIS_ENV = "PREFORK_SESSIONS_REDIS_URL"  # also read by prefork_sessions.demo
SECRET_ENV = "PREFORK_SESSIONS_SECRET"  # also read by prefork_sessions.demo


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


def on_starting(server):
    """Master, once, before any worker exists: create the session file or check the
    existing one, so a bad path, owner or mode stops gunicorn here with a clear
    error instead of failing in every worker.  The resolved path is put in the
    environment the workers inherit, so they all open this very file.  With
    PREFORK_SESSIONS_REDIS_URL set, check that the Redis server answers instead.

    When the workers run as another user (``--user``/``--group``, the master as
    root) and open the file themselves (no ``preload_app``), the check runs in a
    child process that drops to the workers' user and group exactly as gunicorn
    does for a worker: the file is created owned by that user, and a directory it
    cannot reach or write stops gunicorn here.  With ``preload_app`` the master
    opens the file for the app it loads, and each worker reopens it in
    ``post_fork``, which gunicorn runs before the worker drops its privileges: the
    file is the master's."""
    if os.environ.get(SECRET_ENV):  # once here, rather than failing every worker's import
        try:
            SessionOptions(secret=os.fsencode(os.environ[SECRET_ENV]))
        except InvalidArgumentError as e:
            server.log.error("%s: %s", SECRET_ENV, e)
            sys.exit(1)
    if os.environ.get(REDIS_ENV):
        try:
            with RedisStore(os.environ[REDIS_ENV]) as redis_store:
                problems = redis_store.check()
        except Exception as e:  # noqa: BLE001 - redis-py raises its own ConnectionError and friends
            problems = [str(e)]
        if problems:
            server.log.error("cannot use the Redis session store: %s", "; ".join(problems))
            sys.exit(1)
        server.log.info("session store: Redis at %s", os.environ[REDIS_ENV])
        return
    cfg = server.cfg
    as_workers = (cfg.uid, cfg.gid) != (os.geteuid(), os.getegid()) and not cfg.preload_app
    found = _check_store_as_workers(cfg) if as_workers else _check_store()
    if "error" in found:
        server.log.error("cannot use the session store: %s", found["error"])
        sys.exit(1)
    server.log.info(
        "session store %s: %d pages of %d bytes, mode %04o, owned by %s",
        found["path"], found["pages"], found["page_size"], found["mode"], found["owner"],
    )
    os.environ[PATH_ENV] = found["path"]


def _check_store():
    """Create or check the store file as this process; what was found, or {"error": ...}."""
    try:
        store = MmapStore(
            os.environ.get(PATH_ENV) or None,
            app_name=APP_NAME,
            cache_size=_env_int(SIZE_ENV, 16 << 20),
        )
    except (SessionStoreError, OSError, ValueError) as e:
        return {"error": str(e)}
    try:  # the master never serves requests: workers open their own
        st = os.stat(store.path)
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = f"uid {st.st_uid}"
        return {"path": store.path, "pages": store.num_pages, "page_size": store.page_size,
                "mode": stat.S_IMODE(st.st_mode), "owner": owner}
    finally:
        store.close()


def _check_store_as_workers(cfg):
    """_check_store() in a child that has become the workers' user and group."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the master has no other threads yet: only this one is copied
        code = 1
        try:
            os.close(read_end)
            try:
                gunicorn.util.set_owner_process(cfg.uid, cfg.gid, initgroups=cfg.initgroups)
            except OSError as e:
                found = {"error": f"cannot become the workers' user (uid {cfg.uid}, gid {cfg.gid}): "
                                  f"{e}; only a master running as root can start workers as another user"}
            else:
                found = _check_store()
            os.write(write_end, json.dumps(found).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        raw = answer.read()
    status = os.waitpid(pid, 0)[1]
    if os.waitstatus_to_exitcode(status) != 0 or not raw:
        return {"error": f"the check as the workers' user (uid {cfg.uid}, gid {cfg.gid}) failed "
                         f"(exit status {os.waitstatus_to_exitcode(status)})"}
    return json.loads(raw)


def post_fork(server, worker):
    """Each worker, right after fork: with preload_app the app (and its store)
    were created in the master, so give this worker its own descriptor and
    mapping of the same file (gunicorn runs this hook before the worker drops to
    ``--user``, so the master's file opens).  Nothing is re-initialised or truncated.  Without
    preload_app the worker imports the app after this hook and opens the file
    itself.  (The store also detects a fork on its own; this makes it explicit
    and early.)"""
    app = getattr(server.app, "callable", None)  # set in the master only with preload_app
    store = getattr(app, "session_store", None)  # set by with_session / SessionMiddleware
    if store is not None:
        store.reopen()
        server.log.info("worker %s reopened the session store", worker.pid)


def child_exit(server, worker):
    """Master, after a worker exited, even after SIGKILL (worker_exit does not run
    then).  The store needs no clean-up: the kernel released the dead worker's
    page locks with its file descriptions, and a page it was writing is
    repaired by the next writer that locks it."""
    server.log.debug("worker %s exited; session store needs no clean-up", worker.pid)
