"""Live tests: the real ``gunicorn -c gunicorn_conf.py`` serving the demo on loopback."""

from __future__ import annotations

import itertools
import os
import stat
import threading
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
