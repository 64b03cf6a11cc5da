"""One contract, every store: MmapStore and RedisStore (on a real redis-server) behave alike."""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from _procs import fork, wait_ok

from prefork_sessions import (
    InvalidArgumentError,
    MmapStore,
    RedisStore,
    ReentrantCallError,
    SerializationError,
    SessionStoreError,
    StoreClosedError,
    ValueTooLargeError,
)
from prefork_sessions._args import MAX_LIFETIME, MAX_TIMEOUT, lifetime

Store = MmapStore | RedisStore


KINDS = ["mmap", "redis", "cluster"]


def make_kind(request: pytest.FixtureRequest, path: Path, **kw: Any) -> Store:
    """A store of kind ``request.param``: an mmap file at ``path``, RedisStore on the
    worker's redis-server, or RedisStore on its local 3-master Redis Cluster."""
    if request.param == "mmap":
        return MmapStore(path, cache_size=1 << 20, page_size=16 << 10, **kw)
    prefix = f"test:{uuid.uuid4().hex}:"
    if request.param == "redis":
        return RedisStore(request.getfixturevalue("redis_url"), prefix=prefix, **kw)
    return RedisStore(client=request.getfixturevalue("cluster_client")(), prefix=prefix, **kw)


@pytest.fixture(params=KINDS)
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store = make_kind(request, tmp_path / "s")
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


# ---------------------------------------------------------------- bad input, refused alike by both


@pytest.fixture(params=KINDS)
def make_any(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """A factory for stores of one kind with extra keyword arguments (closed at teardown)."""
    made: list[Store] = []

    def make(**kw: Any) -> Store:
        store = make_kind(request, tmp_path / f"s{len(made)}", **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


class Text(str):
    """A str subclass, as frameworks hand them out (markupsafe.Markup, Django's SafeString)."""


def test_keys_may_be_str_subclasses_and_any_bytes_like(any_store: Store) -> None:
    any_store.set(Text("sub"), 1)
    assert any_store.get("sub") == 1 and any_store.get(Text("sub")) == 1 and Text("sub") in any_store
    assert any_store.get_and_set(Text("sub"), lambda v: v + 1) == 2
    assert any_store.delete(Text("sub")) is True and "sub" not in any_store
    any_store.set(bytearray(b"ba"), 3)
    assert any_store.get(b"ba") == 3 and any_store.get(memoryview(b"ba")) == 3
    assert any_store.get("x" * 65535, "default") == "default"  # the longest key is a key
    assert any_store.get(b"x" * 65535, "default") == "default"


OPERATIONS: dict[str, Callable[[Store, Any], object]] = {
    "get": lambda s, k: s.get(k, "default"),
    "set": lambda s, k: s.set(k, "new"),
    "delete": lambda s, k: s.delete(k),
    "contains": lambda s, k: k in s,
    "get_and_set": lambda s, k: s.get_and_set(k, lambda v: "new"),
}
BAD_KEYS = [
    pytest.param("a\udc80b", InvalidArgumentError, id="lone-surrogate"),
    pytest.param(Text("\ud800"), InvalidArgumentError, id="str-subclass-surrogate"),
    pytest.param(5, InvalidArgumentError, id="int"),
    pytest.param(None, InvalidArgumentError, id="None"),
    pytest.param("x" * 65536, ValueTooLargeError, id="str-65536-bytes"),
    pytest.param("\u00e9" * 32768, ValueTooLargeError, id="str-65536-utf8-bytes"),
    pytest.param(b"x" * 65536, ValueTooLargeError, id="bytes-65536"),
    pytest.param(bytearray(70000), ValueTooLargeError, id="bytearray-70000"),
]


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize("key, error", BAD_KEYS)
def test_a_bad_key_is_refused_alike_by_every_operation(
    any_store: Store, op: str, key: object, error: type[Exception]
) -> None:
    any_store.set("other", "kept")
    with pytest.raises(error) as err:
        OPERATIONS[op](any_store, key)
    assert isinstance(err.value, SessionStoreError)
    assert isinstance(err.value, TypeError if key is None or isinstance(key, int) else ValueError)
    assert any_store.get("other") == "kept" and len(any_store) == 1


BAD_EXPIRES = [
    "10", b"10", True, False, math.nan, -1, -0.5, -math.inf, 10**400, Fraction(10**400), 1e300,
    MAX_LIFETIME * 1.01, [10], complex(1, 0),
]


@pytest.mark.parametrize("expire", BAD_EXPIRES, ids=repr)
def test_a_bad_expire_is_refused_and_changes_nothing(
    make_any: Callable[..., Store], expire: object
) -> None:
    store = make_any()
    store.set("k", "old")
    with pytest.raises(InvalidArgumentError, match="expire"):
        store.set("k", "new", expire=expire)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="expire"):
        store.get_and_set("k", lambda v: "new", expire=expire)  # type: ignore[arg-type]
    assert store.get("k") == "old"
    with pytest.raises(InvalidArgumentError, match="expire"):
        make_any(expire=expire)


@pytest.mark.parametrize("expire", [None, 0, math.inf, 0.5, 7, Fraction(3, 2), MAX_LIFETIME], ids=repr)
def test_every_sane_expire_is_taken(make_any: Callable[..., Store], expire: object) -> None:
    store = make_any(expire=expire)
    store.set("k", 1, expire=expire)  # type: ignore[arg-type]
    assert store.get_and_set("k", lambda v: v + 1, expire=expire) == 2  # type: ignore[arg-type]
    assert store.get("k") == 2


def test_lifetime_keeps_its_meaning() -> None:
    """The one lifetime() both stores use: 0.0 means never."""
    assert [lifetime(e) for e in (None, 0, 0.0, math.inf, 5, 2.5)] == [0.0, 0.0, 0.0, 0.0, 5.0, 2.5]
    assert type(lifetime(5)) is float


NOT_JSON = [math.nan, math.inf, -math.inf, [1, math.nan], {"a": {"b": (math.inf,)}}, {math.nan: 1}]


@pytest.mark.parametrize("value", NOT_JSON, ids=repr)
def test_json_refuses_nan_and_infinity_instead_of_storing_null(any_store: Store, value: object) -> None:
    any_store.set("k", {"kept": None})
    with pytest.raises(SerializationError, match="NaN and infinity"):
        any_store.set("k", value)
    with pytest.raises(SerializationError, match="NaN and infinity"):
        any_store.get_and_set("k", lambda v: value)
    assert any_store.get("k") == {"kept": None}


class Custom:
    """A custom serializer whose dumps() returns whatever it is told to."""

    def __init__(self, out: object) -> None:
        self.out = out

    def dumps(self, value: object) -> object:
        return self.out

    def loads(self, raw: bytes) -> object:
        return raw


@pytest.mark.parametrize("out", [5, [104, 105], None, 1.5, {"a": 1}], ids=repr)
def test_a_custom_dumps_returning_no_bytes_is_refused(make_any: Callable[..., Store], out: object) -> None:
    store = make_any(serializer=Custom(out))
    with pytest.raises(SerializationError, match=f"returned {type(out).__name__}; it must return bytes"):
        store.set("k", "anything")
    with pytest.raises(SerializationError):
        store.get_and_set("k", lambda v: "anything")
    assert "k" not in store


@pytest.mark.parametrize("out", [b"hi", bytearray(b"hi"), memoryview(b"hi"), "hi"],
                         ids=["bytes", "bytearray", "memoryview", "str"])
def test_a_custom_dumps_may_return_bytes_like_or_str(make_any: Callable[..., Store], out: object) -> None:
    store = make_any(serializer=Custom(out))
    store.set("k", "anything")
    assert store.get("k") == b"hi"


@pytest.mark.parametrize("spec", ["yaml", object(), 5], ids=["name", "object", "int"])
def test_an_unknown_serializer_is_refused(make_any: Callable[..., Store], spec: object) -> None:
    with pytest.raises(InvalidArgumentError, match="use 'json', 'raw', 'pickle' or an object"):
        make_any(serializer=spec)


# ---------------------------------------------------------------- constructor arguments


BAD_TIMEOUTS = [math.inf, math.nan, 0, -1, "1", True, 10**400, MAX_TIMEOUT * 2, None]


@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=repr)
def test_mmap_store_refuses_a_bad_lock_timeout(tmp_path: Path, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="lock_timeout"):
        MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10, lock_timeout=value)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["cache_size", "page_size"])
@pytest.mark.parametrize("value", [True, "65536", 65536.0, Fraction(65536), None, -65536, 0], ids=repr)
def test_mmap_store_refuses_a_size_that_is_no_positive_int(tmp_path: Path, name: str, value: object) -> None:
    kw: dict[str, Any] = {"cache_size": 1 << 20, "page_size": 16 << 10, name: value}
    with pytest.raises(InvalidArgumentError, match=name):
        MmapStore(tmp_path / "s", **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [t for t in BAD_TIMEOUTS if t is not None], ids=repr)
def test_redis_store_refuses_a_bad_socket_timeout(redis_url: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="socket_timeout"):
        RedisStore(redis_url, socket_timeout=value)  # type: ignore[arg-type]


def test_redis_store_socket_timeout_reaches_the_client(redis_url: str) -> None:
    with RedisStore(redis_url, prefix=f"test:{uuid.uuid4().hex}:", socket_timeout=2.5) as store:
        store.set("k", 1)
        assert store.get("k") == 1
        kwargs = store.client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (2.5, 2.5)
        store.reopen()  # a new client, same timeout
        assert store.client.connection_pool.connection_kwargs["socket_timeout"] == 2.5
    import redis

    with pytest.raises(InvalidArgumentError, match="set it on the client"):
        RedisStore(client=redis.Redis.from_url(redis_url), socket_timeout=1)


@pytest.mark.parametrize("prefix", ["", b"", 5, None, "a\udc80"], ids=repr)
def test_redis_store_refuses_a_bad_prefix(redis_url: str, prefix: object) -> None:
    with pytest.raises(InvalidArgumentError):
        RedisStore(redis_url, prefix=prefix)  # type: ignore[arg-type]


def test_redis_store_takes_a_bytes_prefix(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:".encode()
    with RedisStore(redis_url, prefix=prefix) as store:
        store.set("k", 1)
        assert store.keys() == ["k"] and store.redis_key("k") == prefix + b"{k}"
        assert store.client.get(prefix + b"{k}") == b"1"


@pytest.mark.parametrize("prefix", ["a{", "}", "x{y}:", b"{}"], ids=repr)
def test_redis_store_refuses_a_prefix_with_a_brace(redis_url: str, prefix: str | bytes) -> None:
    with pytest.raises(InvalidArgumentError, match="brace"):
        RedisStore(redis_url, prefix=prefix)


# Keys whose hash tag needs the escape (empty, or starting with "}" or a backslash) and
# keys holding braces: each stays itself through keys(), on a slot of its own tag.
ODD_KEYS = ["", "}", "}x", "\\", "\\}", "{", "{}", "a}b", "a{b}c", "x}", b"\xff}", b"\\\xfe"]


def test_odd_keys_round_trip_and_stay_apart(any_store: Store) -> None:
    for i, key in enumerate(ODD_KEYS):
        any_store.set(key, i)
    assert sorted(map(repr, any_store.keys())) == sorted(map(repr, ODD_KEYS))
    assert [any_store.get(key) for key in ODD_KEYS] == list(range(len(ODD_KEYS)))
    assert [any_store.get_and_set(key, lambda v: v + 100) for key in ODD_KEYS] == [
        i + 100 for i in range(len(ODD_KEYS))]
    assert len(any_store) == len(ODD_KEYS)
    any_store.clear()
    assert len(any_store) == 0 and any_store.keys() == []


def test_redis_keys_are_hash_tagged_and_escaped(redis_url: str) -> None:
    with RedisStore(redis_url, prefix="p:") as store:
        assert store.redis_key("sid") == b"p:{sid}" and store.redis_key(b"a}b") == b"p:{a}b}"
        assert store.redis_key("") == b"p:{\\}" and store.redis_key("}x") == b"p:{\\}x}"
        assert store.redis_key("\\") == b"p:{\\\\}"
        with pytest.raises(InvalidArgumentError):
            store.redis_key(5)  # type: ignore[arg-type]
        with pytest.raises(ValueTooLargeError):
            store.redis_key("x" * 65536)
        store.close()
        with pytest.raises(StoreClosedError):
            store.redis_key("sid")


# -- what caches need: add-if-absent, touch, remaining lifetime, missing vs None ----------

ABSENT = object()


def test_add_stores_only_when_absent(any_store: Store) -> None:
    assert any_store.add("k", {"v": 1}) is True
    assert any_store.add("k", {"v": 2}) is False
    assert any_store.get("k") == {"v": 1}
    any_store.set("short", 1, expire=0.2)
    time.sleep(0.35)
    assert any_store.add("short", 2) is True  # an expired entry counts as absent
    assert any_store.get("short") == 2
    assert any_store.add("life", 1, expire=50)
    remaining = any_store.ttl("life")
    assert remaining is not None and 45 < remaining <= 50
    with pytest.raises(SerializationError):
        any_store.add("bad", object())
    assert "bad" not in any_store


def test_add_is_atomic_across_processes(any_store: Store) -> None:
    winners = []
    for _ in range(6):
        # A child exits 0 if its add won, 1 if it lost (fork() exits 1 when fn raises).
        pids = [fork(lambda i=i: any_store.add("race", i) or _lost()) for i in range(4)]
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        winners.append(codes.count(0))
        assert any_store.get("race") in range(4)
        any_store.delete("race")
    assert winners == [1] * 6


def _lost() -> None:
    raise RuntimeError("add lost the race")


def test_touch_changes_only_the_expiry(any_store: Store) -> None:
    assert any_store.touch("absent", 10) is False
    assert "absent" not in any_store
    any_store.set("k", [1, 2], expire=0.3)
    assert any_store.touch("k", 100) is True
    time.sleep(0.45)
    assert any_store.get("k") == [1, 2]
    remaining = any_store.ttl("k")
    assert remaining is not None and 95 < remaining <= 100
    assert any_store.touch("k", 0) is True
    assert any_store.ttl("k") == math.inf and any_store.get("k") == [1, 2]
    any_store.set("gone", 1, expire=0.2)
    time.sleep(0.35)
    assert any_store.touch("gone", 100) is False and "gone" not in any_store


def test_ttl(any_store: Store) -> None:
    assert any_store.ttl("absent") is None
    any_store.set("never", 1, expire=0)
    any_store.set("later", 1, expire=30)
    assert any_store.ttl("never") == math.inf
    later = any_store.ttl("later")
    assert later is not None and 25 < later <= 30
    any_store.delete("later")
    assert any_store.ttl("later") is None


def test_get_and_set_tells_missing_from_a_stored_none(any_store: Store) -> None:
    seen: list[Any] = []

    def record(current: Any) -> Any:
        seen.append(current)
        return None

    any_store.get_and_set("k", record, missing=ABSENT)
    any_store.get_and_set("k", record, missing=ABSENT)
    assert seen[0] is ABSENT and seen[1] is None  # the first stored a None
    assert "k" in any_store


def test_get_and_set_can_keep_the_remaining_lifetime(any_store: Store) -> None:
    any_store.set("n", 1, expire=40)
    time.sleep(0.3)
    assert any_store.get_and_set("n", lambda n: n + 1, expire=1000, keep_expiry=True) == 2
    remaining = any_store.ttl("n")
    assert remaining is not None and 35 < remaining <= 39.8  # kept, not renewed to 1000
    any_store.get_and_set("n", lambda n: n + 1, expire=1000)
    remaining = any_store.ttl("n")
    assert remaining is not None and remaining > 990  # without keep_expiry: renewed
    any_store.set("forever", 1, expire=0)
    any_store.get_and_set("forever", lambda n: n + 1, expire=5, keep_expiry=True)
    assert any_store.ttl("forever") == math.inf
    # A new entry gets expire even with keep_expiry.
    any_store.get_and_set("new", lambda n: 1 if n is ABSENT else n, expire=20, keep_expiry=True,
                          missing=ABSENT)
    remaining = any_store.ttl("new")
    assert remaining is not None and 15 < remaining <= 20


def test_a_refused_callback_leaves_the_entry_and_its_expiry(any_store: Store) -> None:
    any_store.set("n", 1, expire=30)

    def refuse(current: Any) -> Any:
        raise ValueError("no")

    with pytest.raises(ValueError):
        any_store.get_and_set("n", refuse, expire=1000, missing=ABSENT)
    remaining = any_store.ttl("n")
    assert any_store.get("n") == 1 and remaining is not None and remaining <= 30
