"""Shared fixtures: stores on real files in tmp_path, with either hot-path implementation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prefork_sessions import MmapStore, _pager, _store

# PREFORK_SESSIONS_PURE=1 chose the reference for the whole run: there is no C variant to test.
PAGERS = ["c", "python"] if _pager.ACCELERATED or _pager.PURE_ENV not in os.environ else ["python"]


@pytest.fixture(params=PAGERS)
def pager_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C hot path and again with the pure-Python reference."""
    if request.param == "c":
        assert _pager.FastPager is not _pager.Pager, "the C extension _speedups was not built"
    else:
        monkeypatch.setattr(_store, "FastPager", _pager.Pager)
    return str(request.param)


@pytest.fixture
def make_store(tmp_path: Any, pager_impl: str) -> Iterator[Callable[..., MmapStore]]:
    """Factory for stores in tmp_path (closed at teardown)."""
    made: list[MmapStore] = []

    def make(name: str = "store", **kw: Any) -> MmapStore:
        kw.setdefault("cache_size", 1 << 20)
        kw.setdefault("page_size", 16 << 10)
        store = MmapStore(os.path.join(tmp_path, name), **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., MmapStore]) -> MmapStore:
    return make_store()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free 127.0.0.1 port, no persistence, for this test process."""
    import shutil
    import socket
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (apt-get install redis-server; .ci/run does)"
    work = tmp_path_factory.mktemp("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(work), "--logfile", str(work / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, f"redis-server exited: see {work / 'redis.log'}"
                assert time.monotonic() < deadline, "redis-server did not answer within 20 s"
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
