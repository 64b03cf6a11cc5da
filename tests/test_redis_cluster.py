"""RedisStore on a real local 3-master Redis Cluster (and behind a real Sentinel): keys
spread over every master, keys()/clear()/len()/stats() covering all of them but only this
prefix, exact get_and_set from several processes, and every key of one store key (data,
lock, queue, wake list, receipt) on the data key's slot."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from _procs import fork, wait_ok

from prefork_sessions import RedisStore

ODD_KEYS = ["sid", "", "}", "}x", "\\", "{", "{}", "a}b", "a{b}c", b"\xff}", "k" * 300]


@pytest.fixture
def cluster_store(cluster_client: Callable[[], Any]) -> Iterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    def make(prefix: str | None = None, **kw: Any) -> RedisStore:
        store = RedisStore(client=cluster_client(), prefix=prefix or f"c:{uuid.uuid4().hex}:", **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def primary_of(store: RedisStore, key: str | bytes) -> str:
    return str(store.client.get_node_from_key(store.redis_key(key)).name)


def every_key(store: RedisStore, prefix: str) -> list[bytes]:
    """Every Redis key under ``prefix`` on every primary, asked of each node directly."""
    found: list[bytes] = []
    for node in store.client.get_primaries():
        # A client of its own per node: the cluster client's node objects may be
        # replaced under it (a refresh of the slot map) while a test polls.
        with redis.Redis(host=node.host, port=node.port, socket_timeout=5) as client:
            found += client.keys(prefix.encode() + b"*")
    return found


def test_keys_spread_over_every_master_and_keys_len_stats_see_them_all(
    cluster_store: Callable[..., RedisStore],
) -> None:
    store = cluster_store()
    for i in range(60):
        store.set(f"k{i}", i)
    assert len({primary_of(store, f"k{i}") for i in range(60)}) == 3  # all three masters hold some
    assert sorted(store.keys()) == sorted(f"k{i}" for i in range(60))  # type: ignore[type-var]
    assert len(store) == 60 and store.stats()["entries"] == 60
    assert store.stats()["bytes_used"] > 0
    assert store.check() == []
    assert store.url.startswith("Redis Cluster 127.0.0.1:")


def test_clear_empties_every_master_and_leaves_other_prefixes_alone(
    cluster_store: Callable[..., RedisStore],
) -> None:
    base = f"c:{uuid.uuid4().hex}"
    ours, longer, shorter = cluster_store(f"{base}:a:"), cluster_store(f"{base}:a:b:"), cluster_store(f"{base}:")
    for i in range(30):
        ours.get_and_set(f"k{i}", lambda v: 1)  # leaves lock receipts behind too
        longer.set(f"k{i}", i)
        shorter.set(f"a:k{i}", i)  # a store key that reads like ours with the prefix joined on
    ours.client.set(f"{base}:a:loose".encode(), b"not a store key of any prefix")
    assert len(ours) == 30 and len(longer) == 30 and len(shorter) == 30
    assert sorted(shorter.keys()) == sorted(f"a:k{i}" for i in range(30))  # type: ignore[type-var]
    ours.clear()
    assert len(ours) == 0 and ours.keys() == []
    assert [k for k in every_key(ours, f"{base}:a:{{")] == []  # no auxiliary key left either
    assert len(longer) == 30 and len(shorter) == 30
    assert ours.client.get(f"{base}:a:loose".encode()) == b"not a store key of any prefix"


def test_processes_update_keys_on_every_master_exactly(cluster_store: Callable[..., RedisStore]) -> None:
    store = cluster_store()
    keys = ["k0"]
    i = 1
    while len({primary_of(store, k) for k in keys}) < 3:  # one key per master
        if primary_of(store, f"k{i}") not in {primary_of(store, k) for k in keys}:
            keys.append(f"k{i}")
        i += 1

    def child() -> None:
        store.reopen()
        for _ in range(80):
            for key in keys:
                store.get_and_set(key, lambda v: (v or 0) + 1)

    wait_ok([fork(child) for _ in range(4)])
    assert [store.get(key) for key in keys] == [320, 320, 320]


@pytest.mark.parametrize("key", ODD_KEYS, ids=repr)
def test_every_key_of_a_store_key_is_on_its_slot(cluster_store: Callable[..., RedisStore], key: Any) -> None:
    prefix = f"c:{uuid.uuid4().hex}:"
    store = cluster_store(prefix, lock_lease=30)
    waiter_store = cluster_store(prefix, lock_lease=30)
    slot = store.client.keyslot(store.redis_key(key))
    for suffix in (b":lock", b":w:0123abcd", b":anything"):  # the documented rule for own keys
        assert store.client.keyslot(store.redis_key(key) + suffix) == slot
    entered, go = threading.Event(), threading.Event()
    seen: list[bytes] = []

    def hold(v: Any) -> Any:
        entered.set()
        go.wait()
        return 1

    holder = threading.Thread(target=lambda: store.get_and_set(key, hold))
    holder.start()
    entered.wait()
    waiting = threading.Thread(target=lambda: waiter_store.get_and_set(key, lambda v: v + 1))
    waiting.start()
    try:
        deadline = time.monotonic() + 30
        while len(seen) < 3:  # data absent yet: the lock, the queue and the set of waiters
            seen = every_key(store, prefix)
            assert time.monotonic() < deadline, f"the waiter never queued: {seen}"
            time.sleep(0.02)
    finally:
        go.set()
    holder.join()
    waiting.join()
    seen += every_key(store, prefix)  # data key, receipts, maybe the handed-over wake list
    assert {store.client.keyslot(k) for k in seen} == {slot}, seen
    assert store.get(key) == 2


# ---------------------------------------------------------------- Sentinel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[int]:
    """A redis-server and a real Sentinel (redis-server --sentinel) watching it as 'main':
    the Sentinel's port."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (apt-get install redis-server; .ci/run does)"
    master, watcher = _free_port(), _free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {watcher}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor main 127.0.0.1 {master} 1\n")
    procs = [
        subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(master), "--save", "",
                          "--appendonly", "no", "--dir", str(tmp_path), "--logfile", str(tmp_path / "m.log")]),
        subprocess.Popen([binary, str(conf), "--sentinel", "--logfile", str(tmp_path / "s.log")]),
    ]
    try:
        deadline = time.monotonic() + 20
        for port in (master, watcher):
            while True:
                try:
                    redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, f"nothing answered on {port}: see {tmp_path}"
                    time.sleep(0.05)
        yield watcher
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_a_store_through_sentinel(sentinel: int) -> None:
    from redis.sentinel import Sentinel

    client = Sentinel([("127.0.0.1", sentinel)], socket_timeout=1).master_for("main", socket_timeout=2)
    with RedisStore(client=client, prefix="s:") as store:
        assert store.url == "Sentinel service 'main'" and store.socket_timeout == 2
        store.set("k", 1)

        def child() -> None:
            store.reopen()
            for _ in range(50):
                store.get_and_set("k", lambda v: v + 1)

        wait_ok([fork(child) for _ in range(3)])
        assert store.get("k") == 151 and store.keys() == ["k"] and store.check() == []
    client.close()
