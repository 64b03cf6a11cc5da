"""Live tests: the real ``gunicorn -c gunicorn_conf.py`` serving the demo on loopback."""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _live import Browser, LiveGunicorn

CONFIGS = [
    pytest.param(1, False, id="sync"),
    pytest.param(1, True, id="sync-preload"),
    pytest.param(4, False, id="gthread"),
    pytest.param(4, True, id="gthread-preload"),
]


@pytest.mark.parametrize("threads, preload", CONFIGS)
def test_one_session_counts_without_gaps_across_workers(
    tmp_path: Path, threads: int, preload: bool
) -> None:
    # A client making one request at a time is handed to the same idle worker
    # nearly every time.  --max-requests 2 retires every worker after two
    # requests, so consecutive requests must reach different processes, some of
    # them freshly forked (with preload, their store comes through post_fork).
    with LiveGunicorn(
        tmp_path, workers=4, threads=threads, preload=preload, args=("--max-requests", "2")
    ) as server:
        browser = Browser(server)
        visits, workers = [], []
        for _ in range(16):
            data = browser.json("/")
            visits.append(data["visits"])
            workers.append(data["worker"])
        assert visits == list(range(1, 17))
        assert len(set(workers)) >= 4
        assert sum(a != b for a, b in itertools.pairwise(workers)) >= 4

        st = os.stat(server.store_path)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_uid == os.geteuid()
        header = browser.set_cookie_headers[0]
        for part in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="):
            assert part in header

        old = browser.cookie
        assert browser.json("/login")["logged_in"] is True
        assert browser.cookie not in (None, old)
        assert browser.json("/")["visits"] == 17  # the data moved to the new id
        assert browser.json("/logout")["logged_in"] is False
        assert browser.cookie is None
        assert browser.json("/")["visits"] == 1
        assert browser.json("/stats")["entries"] >= 1
    log = server.log_path.read_text()
    assert f"Using worker: {'gthread' if threads > 1 else 'sync'}" in log
    assert "session store" in log  # on_starting checked the file in the master
    assert ("reopened the session store" in log) == preload  # post_fork, for a preloaded app


def test_concurrent_clients_keep_their_own_counts(tmp_path: Path) -> None:
    with LiveGunicorn(tmp_path, workers=4, threads=1) as server:
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                browser = Browser(server)
                results[n] = [browser.json("/")["visits"] for _ in range(10)]
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert results == {n: list(range(1, 11)) for n in range(4)}
        assert server.proc is not None and server.proc.poll() is None
    assert server.proc.returncode == 0


def test_an_unsafe_store_file_stops_gunicorn_in_the_master(tmp_path: Path) -> None:
    path = tmp_path / "sessions.store"
    path.write_bytes(b"not a store")
    path.chmod(0o666)
    server = LiveGunicorn(tmp_path, store_path=path, ready_timeout=30)
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        server.start()
    log = server.log_path.read_text()
    assert "cannot use the session store" in log and "writable by group or others" in log
    assert "Booting worker" not in log
    assert path.read_bytes() == b"not a store"  # left untouched


def test_a_short_secret_stops_gunicorn_in_the_master_without_showing_it(tmp_path: Path) -> None:
    secret = "too-short-to-key-a-digest"
    server = LiveGunicorn(tmp_path, ready_timeout=30, env={"PREFORK_SESSIONS_SECRET": secret})
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        server.start()
    log = server.log_path.read_text()
    assert "PREFORK_SESSIONS_SECRET:" in log and "32" in log, log
    assert secret not in log
    assert "Booting worker" not in log


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A directory of user nobody, 0700, that nobody can reach (pytest's tmp_path lies
    under a 0700 directory of root): like a systemd RuntimeDirectory= for User=nobody."""
    assert os.geteuid() == 0, "these tests start gunicorn as root with --user nobody (CI runs as root)"
    where = Path(tempfile.mkdtemp(prefix="prefork-sessions-gunicorn-", dir="/tmp"))
    nobody = pwd.getpwnam("nobody")
    os.chown(where, nobody.pw_uid, nobody.pw_gid)
    yield where
    shutil.rmtree(where)


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_workers_running_as_another_user_boot_and_share_sessions(
    tmp_path: Path, nobodys_dir: Path, preload: bool
) -> None:
    """The master runs as root, the workers as nobody (``--user``/``--group``).  Without
    preload the workers open the file themselves, so on_starting creates it as
    nobody; with preload the master opens it and the workers inherit it."""
    store = nobodys_dir / "sessions.store"
    with LiveGunicorn(
        tmp_path, workers=2, preload=preload, store_path=store,
        args=("--user", "nobody", "--group", "nogroup", "--max-requests", "2"),
    ) as server:
        browser = Browser(server)
        data = [browser.json("/") for _ in range(8)]
        assert [d["visits"] for d in data] == list(range(1, 9))
        workers = {d["worker"] for d in data}
        assert len(workers) >= 2
        for pid in workers:
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
            except FileNotFoundError:
                continue  # retired (--max-requests) since it answered
            assert uid == pwd.getpwnam("nobody").pw_uid
    st = os.stat(store)
    assert stat.S_IMODE(st.st_mode) == 0o640
    owner = "root" if preload else "nobody"
    assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name) == (
        (owner, "root") if preload else (owner, "nogroup")
    )
    assert f"mode 0640, owned by {owner}" in server.log_path.read_text()


def test_workers_of_another_user_that_cannot_reach_the_file_stop_gunicorn_in_the_master(
    tmp_path: Path,
) -> None:
    assert os.geteuid() == 0
    store = tmp_path / "sessions.store"  # under pytest's 0700 directory: nobody cannot reach it
    server = LiveGunicorn(tmp_path, store_path=store, args=("--user", "nobody"), ready_timeout=30)
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        server.start()
    log = server.log_path.read_text()
    assert "cannot use the session store" in log and "cannot be reached by nobody (uid 65534)" in log
    assert "Booting worker" not in log
    assert not store.exists()


def test_the_demo_on_a_redis_store_counts_across_workers(tmp_path: Path, redis_url: str) -> None:
    """PREFORK_SESSIONS_REDIS_URL selects RedisStore: same behaviour, another server."""
    with LiveGunicorn(
        tmp_path, workers=4, args=("--max-requests", "2"), env={"PREFORK_SESSIONS_REDIS_URL": redis_url}
    ) as server:
        browser = Browser(server)
        data = [browser.json("/") for _ in range(10)]
        assert [d["visits"] for d in data] == list(range(1, 11))
        assert len({d["worker"] for d in data}) >= 3
        assert not server.store_path.exists()  # nothing went to the file
    assert "session store: Redis at" in server.log_path.read_text()
