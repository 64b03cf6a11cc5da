"""Live tests: Flask and Django sessions under the real ``gunicorn -c gunicorn_conf.py``
with 4 workers, on a store file and on a real redis-server.

The demos count one session's visits exactly whichever worker answers (sync and
gthread workers, and with ``--preload``, where post_fork reopens the store the
master opened).  The test apps of tests/_framework_apps.py show the key-level
merge: many concurrent requests of one session, each changing its own key, all
keep their change; and a write that was under way when the session was logged
out does not bring the session back.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _live import Browser, LiveGunicorn, request

from prefork_sessions import MmapStore

TESTS = Path(__file__).resolve().parent
WAIT = 20.0  # seconds: the most any wait here takes before it fails the test


@dataclass(frozen=True)
class Framework:
    name: str
    demo: str  # PREFORK_SESSIONS_APP for its demo
    test_app: str  # PREFORK_SESSIONS_APP for its app in tests/_framework_apps.py
    cookie_name: str
    # Whether loading the demo opens its store (init_app does; Django's engine does when
    # the SessionMiddleware imports it), so a preloaded master hands it to post_fork.
    demo_opens_store: bool


FLASK = Framework("flask", "flask", "_framework_apps:flask_app()", "session", True)
DJANGO = Framework("django", "django", "_framework_apps:django_app()", "sessionid", True)
MAX_REQUESTS = 3  # each worker retires after this many requests (gunicorn --max-requests)
FRAMEWORKS = [pytest.param(FLASK, id="flask"), pytest.param(DJANGO, id="django")]


def counts_across_workers(server: LiveGunicorn, framework: Framework, visits: int) -> set[int]:
    """Visit the demo's / ``visits`` times with one browser; assert the count is exact;
    return the pids of the workers that answered."""
    browser = Browser(server, cookie_name=framework.cookie_name)
    seen = [browser.json("/") for _ in range(visits)]
    assert [d["visits"] for d in seen] == list(range(1, visits + 1)), seen
    assert not any(d["logged_in"] for d in seen)
    assert browser.cookie is not None
    workers = {d["worker"] for d in seen}
    assert len(workers) >= 2, seen  # --max-requests: no worker answers all of them
    return workers


CONFIGS = [
    pytest.param(1, False, id="sync"),
    pytest.param(4, False, id="gthread"),  # gunicorn_conf.py's default
    pytest.param(4, True, id="gthread-preload"),
]


@pytest.mark.parametrize("threads, preload", CONFIGS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_demo_counts_one_session_exactly_across_workers(
    tmp_path: Path, framework: Framework, threads: int, preload: bool
) -> None:
    # A client making one request at a time is handed to the same idle worker
    # nearly every time: --max-requests retires each worker after a few requests,
    # so the visits reach several processes, some freshly forked.
    with LiveGunicorn(tmp_path, workers=4, threads=threads, preload=preload, app=framework.demo,
                      args=("--max-requests", str(MAX_REQUESTS))) as server:
        workers = counts_across_workers(server, framework, 9)
    log = server.log_path.read_text()
    assert f"Using worker: {'gthread' if threads > 1 else 'sync'}" in log
    reopened = [line for line in log.splitlines() if "reopened the session store" in line]
    if preload and framework.demo_opens_store:  # each worker's own, from post_fork
        for pid in workers:
            assert any(f"worker {pid} reopened the session store {server.store_path}" in line
                       for line in reopened), (pid, log)
    elif not preload:  # each worker imported the app and opened the store itself
        assert reopened == []


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_demo_on_redis_counts_across_workers(
    tmp_path: Path, framework: Framework, redis_url: str
) -> None:
    with LiveGunicorn(tmp_path, workers=4, threads=4, app=framework.demo,
                      args=("--max-requests", str(MAX_REQUESTS)),
                      env={"PREFORK_SESSIONS_REDIS_URL": redis_url}) as server:
        counts_across_workers(server, framework, 9)
        assert not server.store_path.exists()  # nothing went to a file
    assert "session store: Redis at" in server.log_path.read_text()


# -- the merge, on the test apps -------------------------------------------------


class Session:
    """Requests of one session, on new connections: a fixed cookie, so that concurrent
    requests all send the same one."""

    def __init__(self, server: LiveGunicorn, framework: Framework, cookie: str) -> None:
        self.server, self.framework, self.cookie = server, framework, cookie

    def get(self, path: str) -> tuple[int, dict[str, Any], list[str]]:
        """(status, JSON body, Set-Cookie headers for the session cookie)."""
        name = self.framework.cookie_name
        status, headers, body = request(self.server.port, path,
                                        headers={"Cookie": f"{name}={self.cookie}"}, timeout=WAIT)
        cookies = [h.strip() for h in headers.get_all("Set-Cookie") or []]
        return status, json.loads(body) if status == 200 else {}, [
            c for c in cookies if c.startswith(f"{name}=")]


@pytest.fixture(scope="module", params=FRAMEWORKS)
def app_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[LiveGunicorn, Framework]]:
    """A framework's test app under gunicorn_conf.py's default gthread workers, shared by
    the tests below (each uses a session of its own).  One gthread worker may take
    every connection: each retires after 64 requests, so 200 reach several."""
    framework: Framework = request.param
    with LiveGunicorn(tmp_path_factory.mktemp(framework.name), workers=4, threads=4,
                      app=framework.test_app,
                      args=("--pythonpath", str(TESTS), "--max-requests", "64"),
                      env={"PREFORK_SESSIONS_SECRET": secrets.token_urlsafe(32)}) as server:
        yield server, framework


def new_session(server: LiveGunicorn, framework: Framework) -> Session:
    browser = Browser(server, cookie_name=framework.cookie_name)
    assert browser.json("/bump/seed")["value"] == 1
    assert browser.cookie is not None
    return Session(server, framework, browser.cookie)


def test_concurrent_requests_changing_different_keys_all_keep_their_change(
    app_server: tuple[LiveGunicorn, Framework],
) -> None:
    server, framework = app_server
    session = new_session(server, framework)
    threads, rounds = 8, 25
    values: dict[int, list[int]] = {}
    workers: set[int] = set()
    problems: list[object] = []
    start = threading.Barrier(threads, timeout=WAIT)

    def bump(n: int) -> None:
        try:
            start.wait()
            mine = values[n] = []
            for _ in range(rounds):
                status, data, cookies = session.get(f"/bump/k{n}")
                if status != 200:
                    problems.append((n, status))
                    return
                mine.append(data["value"])
                workers.add(data["worker"])
                # A response may re-send the cookie, never with another session id.
                problems.extend(c for c in cookies if not c.startswith(
                    f"{framework.cookie_name}={session.cookie};"))
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            problems.append(e)

    running = [threading.Thread(target=bump, args=(n,)) for n in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(timeout=2 * WAIT)
    assert not any(thread.is_alive() for thread in running)
    assert problems == []
    # Each key has one writer, so each sees its own count go up by one every time.
    assert values == {n: list(range(1, rounds + 1)) for n in range(threads)}
    assert len(workers) >= 2  # processes merged into one another's writes, not only threads
    status, data, _ = session.get("/read")
    assert status == 200
    assert data["session"] == {"seed": 1, **{f"k{n}": rounds for n in range(threads)}}


def test_a_write_under_way_at_logout_does_not_bring_the_session_back(
    app_server: tuple[LiveGunicorn, Framework], tmp_path: Path
) -> None:
    server, framework = app_server
    store = MmapStore(str(server.store_path))  # the very file the workers share
    try:
        keys_before = set(store.keys())
        session = new_session(server, framework)
        assert len(store.keys()) == len(keys_before) + 1
        gate = tmp_path / "gate"
        gate.mkdir()
        slow: list[tuple[int, dict[str, Any], list[str]]] = []
        writer = threading.Thread(target=lambda: slow.append(session.get(f"/slow-write?gate={gate}")))
        writer.start()
        try:
            deadline = time.monotonic() + WAIT
            while not (gate / "loaded").exists():  # the slow request holds the loaded session
                assert writer.is_alive() and time.monotonic() < deadline, slow
                time.sleep(0.005)
            status, _, cookies = session.get("/logout")
            assert status == 200
            assert [c for c in cookies if "max-age=0" in c.lower()], cookies  # the cookie expired
            assert set(store.keys()) == keys_before  # the session's record is gone
        finally:
            (gate / "go").touch()
            writer.join(timeout=WAIT)
        assert not writer.is_alive()
        [(status, _, cookies)] = slow
        assert status < 500, status  # Django answers 400 (SessionInterrupted), Flask 200
        assert not [c for c in cookies if session.cookie in c], cookies  # the old id not re-sent
        assert set(store.keys()) == keys_before  # nothing was written back
        status, data, _ = session.get("/read")  # the old cookie, replayed
        assert status == 200 and data["session"] == {}
        assert set(store.keys()) == keys_before
    finally:
        store.close()
