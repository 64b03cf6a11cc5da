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


def _free_port_pair() -> int:
    """A port P with P and P + 10000 (its Cluster bus) both free on 127.0.0.1."""
    import random
    import socket

    while True:
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, int]]]:
    """A real local Redis Cluster of 3 masters (no replicas, no persistence) for this test
    process: the masters' (host, port).  Build a client with ``cluster_client``."""
    import shutil
    import subprocess
    import time

    import redis

    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert binary and cli, "redis-server/redis-cli are not installed (apt-get install redis-server; .ci/run does)"
    work = tmp_path_factory.mktemp("cluster")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports: list[int] = []
        for _ in range(3):
            for _attempt in range(5):  # another test process may take a port between check and bind
                port = _free_port_pair()
                proc = subprocess.Popen(
                    [binary, "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
                     "--cluster-config-file", str(work / f"nodes-{port}.conf"), "--cluster-node-timeout", "5000",
                     "--save", "", "--appendonly", "no", "--dir", str(work),
                     "--logfile", str(work / f"redis-{port}.log")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                if _answers(redis, port, proc):
                    procs.append(proc)
                    ports.append(port)
                    break
                proc.wait(10)
            else:
                raise AssertionError(f"no cluster node would start: see the logs in {work}")
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )
        deadline = time.monotonic() + 30
        for port in ports:
            node = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
            while node.execute_command("CLUSTER INFO").get("cluster_state") != "ok":  # parsed to a dict
                assert time.monotonic() < deadline, f"the cluster on {ports} never reached cluster_state:ok"
                time.sleep(0.05)
            node.close()
        yield [("127.0.0.1", p) for p in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _answers(redis: Any, port: int, proc: Any) -> bool:
    """Whether the redis-server just started on ``port`` answers PING (False: it exited)."""
    import time

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                if proc.poll() is not None:
                    return False
                assert time.monotonic() < deadline, f"redis-server on {port} did not answer within 20 s"
                time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture
def cluster_client(redis_cluster: list[tuple[str, int]]) -> Iterator[Callable[[], Any]]:
    """Factory for RedisCluster clients on the test cluster, as README builds them
    (bounded socket timeouts, one retry), closed at teardown."""
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    made: list[Any] = []

    def make() -> Any:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster],
            socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1),
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
