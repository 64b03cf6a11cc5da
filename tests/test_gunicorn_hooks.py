"""prefork_sessions.gunicorn: the hooks a user's own gunicorn config imports.

Real gunicorn (its own port, no control socket, through tests/_live.py) runs a
config file written here that only imports the hooks and sets its own options;
a later ``-c`` replaces the gunicorn_conf.py that LiveGunicorn names first.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _live import REPO, Browser, LiveGunicorn
from gunicorn.config import Config

from prefork_sessions.gunicorn import child_exit, on_starting, post_fork

USER_CONF = """\
from prefork_sessions.gunicorn import on_starting, post_fork, child_exit

workers = 4
wsgi_app = {app!r}
"""


def user_conf(where: Path, app: str = "prefork_sessions.demo:app") -> tuple[str, ...]:
    """Write a user's gunicorn.conf.py into ``where``; the gunicorn options that select it."""
    conf = where / "gunicorn.conf.py"
    conf.write_text(USER_CONF.format(app=app))
    return ("-c", str(conf))


def test_gunicorn_takes_the_hooks_with_the_arity_it_checks() -> None:
    cfg = Config()
    for name, hook in [("on_starting", on_starting), ("post_fork", post_fork),
                       ("child_exit", child_exit)]:
        cfg.set(name, hook)
        assert getattr(cfg, name) is hook
    with pytest.raises(TypeError, match="arity of: 2"):  # the check is live: a 1-arg hook fails it
        cfg.set("post_fork", on_starting)


def test_importing_the_package_leaves_the_hooks_out_and_the_hooks_leave_gunicorn_out() -> None:
    script = textwrap.dedent("""
        import sys
        import prefork_sessions
        assert "prefork_sessions.gunicorn" not in sys.modules, "imported by prefork_sessions"
        import prefork_sessions.gunicorn
        assert "gunicorn" not in sys.modules, "imported by prefork_sessions.gunicorn"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


FORKED = """\
import os, pwd, sys
from prefork_sessions import MmapStore, StoreClosedError
from prefork_sessions.gunicorn import reopen_stores

where = sys.argv[1]
store = MmapStore(os.path.join(where, "open.store"), cache_size=1 << 20)
closed = MmapStore(os.path.join(where, "closed.store"), cache_size=1 << 20)
closed.close()
nobody = pwd.getpwnam("nobody")


def child(reopen):
    code = 1
    try:
        if reopen:
            assert reopen_stores() == [store]  # the closed one is not among them
        os.setgid(nobody.pw_gid)  # as gunicorn drops a worker to --user after post_fork
        os.setuid(nobody.pw_uid)
        try:
            store.set("from", os.getpid())
        except PermissionError:
            code = 13  # nobody cannot reach the file: it was not opened before the drop
        else:
            try:
                closed.get("x")
            except StoreClosedError:
                code = 0
    finally:
        os._exit(code)


for reopen in (True, False):
    pid = os.fork()
    if pid == 0:
        child(reopen)
    print(reopen, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), store.get("from") == pid)
"""


def test_reopen_stores_opens_the_inherited_stores_before_privileges_drop(tmp_path: Path) -> None:
    # A fresh interpreter: the test process's own stores from other tests stay out of it.
    assert os.geteuid() == 0, "drops a forked child to user nobody (CI runs as root)"
    os.chmod(tmp_path, 0o700)  # nobody cannot reach the files
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    # reopened first: the child writes as nobody; without it the lazy reopen as nobody fails
    assert done.stdout.split("\n") == ["True 0 True", "False 13 False", ""], done.stderr


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_a_user_config_of_only_the_hooks_shares_sessions_across_four_workers(
    tmp_path: Path, preload: bool
) -> None:
    args = (*user_conf(tmp_path), "--max-requests", "2", *(("--preload",) if preload else ()))
    with LiveGunicorn(tmp_path, args=args) as server:
        # --max-requests 2 retires each worker after two requests: consecutive
        # requests reach different processes, some freshly forked.
        browser = Browser(server)
        data = [browser.json("/") for _ in range(16)]
        assert [d["visits"] for d in data] == list(range(1, 17))
        pids = [d["worker"] for d in data]
        assert len(set(pids)) >= 4
        assert sum(a != b for a, b in itertools.pairwise(pids)) >= 4

        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                own = Browser(server)
                results[n] = [own.json("/")["visits"] for _ in range(10)]
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=60)
        assert not errors
        assert results == {n: list(range(1, 11)) for n in range(4)}
    log = server.log_path.read_text()
    assert f"session store {server.store_path}: " in log  # on_starting, in the master
    assert log.count("Booting worker with pid") >= 4
    # post_fork: with preload each worker reopens the store the master's app opened
    assert (f"reopened the session store {server.store_path}" in log) == preload
    assert "Value must have an arity" not in log


WRAPPED_APP = """\
from prefork_sessions.demo import app as demo


def app(environ, start_response):  # a middleware: the store is not an attribute of this app
    return demo(environ, start_response)
"""


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A 0700 directory of user nobody that only nobody (and root) can reach."""
    assert os.geteuid() == 0, "starts gunicorn as root with --user nobody (CI runs as root)"
    where = Path(tempfile.mkdtemp(prefix="prefork-sessions-hooks-", dir="/tmp"))
    nobody = pwd.getpwnam("nobody")
    os.chown(where, nobody.pw_uid, nobody.pw_gid)
    yield where
    shutil.rmtree(where)


def test_preloaded_stores_out_of_the_hooks_reach_are_reopened_before_the_user_drops(
    tmp_path: Path, nobodys_dir: Path
) -> None:
    """The master (root) preloads an app whose store no hook can find on it; the
    file is root's, 0640.  Workers run as nobody and can only use it through the
    descriptor post_fork opened before gunicorn dropped them to nobody."""
    (tmp_path / "wrapped_app.py").write_text(WRAPPED_APP)
    store = nobodys_dir / "sessions.store"
    args = (*user_conf(tmp_path, "wrapped_app:app"), "--pythonpath", str(tmp_path), "--preload",
            "--user", "nobody", "--group", "nogroup", "--max-requests", "2")
    with LiveGunicorn(tmp_path, store_path=store, args=args) as server:
        browser = Browser(server)
        data = [browser.json("/") for _ in range(12)]
        assert [d["visits"] for d in data] == list(range(1, 13))
        assert len({d["worker"] for d in data}) >= 4
    assert os.stat(store).st_uid == 0
    assert f"reopened the session store {store}" in server.log_path.read_text()
