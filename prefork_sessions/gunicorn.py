"""gunicorn server hooks for a session store shared by every worker.

Import them in your own gunicorn config file (gunicorn takes any module-level
name that matches one of its hooks)::

    # gunicorn.conf.py
    from prefork_sessions.gunicorn import child_exit, on_starting, post_fork

- ``on_starting(server)``, master, once: creates or checks the store the
  environment names (``PREFORK_SESSIONS_PATH``, ``PREFORK_SESSIONS_SIZE``, or
  ``PREFORK_SESSIONS_REDIS_URL``; ``PREFORK_SESSIONS_SECRET`` is checked too) and
  stops gunicorn with one clear error if it cannot be used.
- ``post_fork(server, worker)``, each new worker: reopens every ``MmapStore``
  the process inherited (``--preload``: the app's stores, whichever front end
  opened them), before gunicorn drops the worker to ``--user``.
- ``child_exit(server, worker)``, master: nothing to clean up, said in the log.

gunicorn itself is imported only when ``on_starting`` must check the store as
the workers' user.
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import stat
import sys
from collections.abc import Mapping
from typing import Protocol

from ._errors import InvalidArgumentError, SessionStoreError
from ._redis import RedisStore
from ._session import SessionOptions
from ._store import MmapStore, reopen_inherited

__all__ = [
    "APP_NAME",
    "DEFAULT_SIZE",
    "PATH_ENV",
    "REDIS_ENV",
    "SECRET_ENV",
    "SIZE_ENV",
    "child_exit",
    "on_starting",
    "post_fork",
    "reopen_stores",
]

PATH_ENV = "PREFORK_SESSIONS_PATH"
"""The store file; unset or empty means ``<tempdir>/prefork_sessions_demo_session_data``."""
SIZE_ENV = "PREFORK_SESSIONS_SIZE"
"""The store size in bytes, used when the file is created."""
REDIS_ENV = "PREFORK_SESSIONS_REDIS_URL"
"""A redis:// URL: the sessions live in Redis; no file is made."""
SECRET_ENV = "PREFORK_SESSIONS_SECRET"
"""The secret for the session-id digest, at least 32 bytes, the same in every worker."""
APP_NAME = "prefork_sessions_demo"
"""The ``app_name`` that names the default file, as in ``prefork_sessions.demo``."""
DEFAULT_SIZE = 16 << 20


class _Log(Protocol):
    def info(self, msg: str, *args: object) -> None: ...
    def error(self, msg: str, *args: object) -> None: ...
    def debug(self, msg: str, *args: object) -> None: ...


class _Config(Protocol):
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def initgroups(self) -> bool: ...
    @property
    def preload_app(self) -> bool: ...


class Server(Protocol):
    """What the hooks use of gunicorn's ``Arbiter``."""

    @property
    def log(self) -> _Log: ...
    @property
    def cfg(self) -> _Config: ...


class Worker(Protocol):
    """What the hooks use of a gunicorn worker."""

    @property
    def pid(self) -> int: ...


def on_starting(server: Server) -> None:
    """Master, once, before any worker exists: create the store file or check the
    existing one, so a bad path, owner or mode stops gunicorn here with one error
    instead of failing in every worker; the resolved path goes into the
    environment the workers inherit, so they all open this very file.  With
    ``PREFORK_SESSIONS_REDIS_URL`` set, check that the Redis server answers instead.

    When the workers run as another user (``--user``/``--group``, the master as
    root) and open the file themselves (no ``preload_app``), the check runs in a
    child that drops to the workers' user and group as gunicorn does for a
    worker: the file is created owned by that user, and a directory it cannot
    reach or write stops gunicorn here.  With ``preload_app`` the master opens
    the file for the app it loads and each worker reopens it in ``post_fork``,
    before it drops its privileges: the file is the master's."""
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
    found = _check_store_as_workers(cfg) if as_workers else _check_store(os.environ)
    if "error" in found:
        server.log.error("cannot use the session store: %s", found["error"])
        sys.exit(1)
    server.log.info(
        "session store %s: %d pages of %d bytes, mode %04o, owned by %s",
        found["path"], found["pages"], found["page_size"], found["mode"], found["owner"],
    )
    os.environ[PATH_ENV] = str(found["path"])


def post_fork(server: Server, worker: Worker) -> None:
    """Each worker, right after fork: give it its own descriptor and mapping of
    every store it inherited from the master (with ``preload_app`` the app opened
    them there).  gunicorn runs this hook before the worker drops to ``--user``,
    so the master's files still open.  Nothing is re-initialised or truncated.
    Without ``preload_app`` there is nothing yet: the worker imports the app after
    this hook and opens its stores itself.  (A store also notices a fork on its
    own and reopens lazily, but then as the worker's user, too late for a file
    only the master's user may open.)"""
    for store in reopen_stores():
        server.log.info("worker %s reopened the session store %s", worker.pid, store.path)


def child_exit(server: Server, worker: Worker) -> None:
    """Master, after a worker exited, even after SIGKILL (``worker_exit`` does not
    run then).  The store needs no clean-up: the kernel released the dead worker's
    page locks with its file descriptions, and a page it was writing is repaired
    by the next writer that locks it."""
    server.log.debug("worker %s exited; session store needs no clean-up", worker.pid)


def reopen_stores() -> list[MmapStore]:
    """Open now, in a forked process, every ``MmapStore`` that was open when it forked;
    the stores now open.

    Each of them would reopen on its first use anyway (it notices the fork and lets
    go of the parent's descriptor and mapping); doing it here opens the files while
    the process still has the parent's privileges.  A store closed before the fork
    stays closed; one opened since is left as it is."""
    return reopen_inherited()


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise InvalidArgumentError(f"{name}={raw!r}: give a whole number of bytes, e.g. {default}") from None


def _check_store(environ: Mapping[str, str]) -> dict[str, str | int]:
    """Create or check the store file as this process; what was found, or {"error": ...}."""
    try:
        store = MmapStore(
            environ.get(PATH_ENV) or None,
            app_name=APP_NAME,
            cache_size=_env_int(environ, SIZE_ENV, DEFAULT_SIZE),
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


def _check_store_as_workers(cfg: _Config) -> dict[str, str | int]:
    """_check_store() in a child that has become the workers' user and group."""
    util = importlib.import_module("gunicorn.util")  # gunicorn ships no type hints
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the master has no other threads yet: only this one is copied
        code = 1
        try:
            os.close(read_end)
            found: dict[str, str | int]
            try:
                util.set_owner_process(cfg.uid, cfg.gid, initgroups=cfg.initgroups)
            except OSError as e:
                found = {"error": f"cannot become the workers' user (uid {cfg.uid}, gid {cfg.gid}): "
                                  f"{e}; only a master running as root can start workers as another user"}
            else:
                found = _check_store(os.environ)
            os.write(write_end, json.dumps(found).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        raw = answer.read()
    exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if exit_code != 0 or not raw:
        return {"error": f"the check as the workers' user (uid {cfg.uid}, gid {cfg.gid}) failed "
                         f"(exit status {exit_code})"}
    answer_found: dict[str, str | int] = json.loads(raw)
    return answer_found
