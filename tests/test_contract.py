"""One contract, every store: MmapStore and RedisStore (on a real redis-server) behave alike."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _procs import fork, wait_ok

from prefork_sessions import (
    MmapStore,
    RedisStore,
    ReentrantCallError,
    SerializationError,
    StoreClosedError,
)

Store = MmapStore | RedisStore


@pytest.fixture(params=["mmap", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "mmap":
        store: Store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)
    else:
        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, prefix=f"test:{uuid.uuid4().hex}:")
    yield store
    store.close()


def test_roundtrip_and_delete(any_store: Store) -> None:
    assert any_store.get("k") is None and any_store.get("k", 1) == 1
    any_store.set("k", {"a": [1, "b"]})
    assert any_store.get("k") == {"a": [1, "b"]}
    assert "k" in any_store and "other" not in any_store
    assert any_store.delete("k") is True and any_store.delete("k") is False
    assert any_store.get("k") is None


def test_expiry_and_never(any_store: Store) -> None:
    any_store.set("short", 1, expire=0.2)
    any_store.set("never", 2, expire=0)
    assert any_store.get("short") == 1
    time.sleep(0.35)
    assert any_store.get("short") is None
    assert any_store.get("never") == 2
    with pytest.raises(ValueError):
        any_store.set("bad", 1, expire=-5)


def test_get_and_set_atomic_and_failure_stores_nothing(any_store: Store) -> None:
    assert any_store.get_and_set("n", lambda v: (v or 0) + 1) == 1
    with pytest.raises(ZeroDivisionError):
        any_store.get_and_set("n", lambda v: v / 0)
    assert any_store.get("n") == 1
    with pytest.raises(ReentrantCallError):
        any_store.get_and_set("n", lambda v: any_store.get("n"))
    with pytest.raises(SerializationError):
        any_store.get_and_set("n", lambda v: object())
    assert any_store.get("n") == 1


def test_threads_increment_exactly(any_store: Store) -> None:
    def work() -> None:
        for _ in range(200):
            any_store.get_and_set("c", lambda v: (v or 0) + 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any_store.get("c") == 800


def test_forked_processes_increment_exactly(any_store: Store) -> None:
    def child() -> None:
        any_store.reopen()
        for _ in range(200):
            any_store.get_and_set("c", lambda v: (v or 0) + 1)

    wait_ok([fork(child) for _ in range(3)])
    assert any_store.get("c") == 600


def test_keys_len_clear(any_store: Store) -> None:
    for i in range(30):
        any_store.set(f"k{i}", i)
    assert sorted(any_store.keys()) == sorted(f"k{i}" for i in range(30))  # type: ignore[type-var]
    assert len(any_store) == 30
    any_store.clear()
    assert len(any_store) == 0 and any_store.get("k1") is None


def test_stats_and_check(any_store: Store) -> None:
    any_store.set("a", 1)
    any_store.get("a")
    any_store.get("missing")
    st = any_store.stats()
    assert st["hits"] == 1 and st["misses"] == 1 and st["entries"] == 1
    assert any_store.check() == []


def test_closed_store_raises_and_reopen_revives(any_store: Store) -> None:
    any_store.set("k", 1)
    any_store.close()
    with pytest.raises(StoreClosedError):
        any_store.get("k")
    any_store.reopen()
    assert any_store.get("k") == 1


def test_redis_store_refuses_an_empty_prefix(redis_url: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(redis_url, prefix="")
