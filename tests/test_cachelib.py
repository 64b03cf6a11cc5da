"""prefork_sessions.cachelib.MmapCache: cachelib's own backend test mixins on a real file,
the semantics cachelib leaves to each backend (timeouts, inc and expiry, a value too
large for a page, key_prefix, the default file), counters exact across forked
processes, Flask-Caching in-process, and Flask-Caching under real gunicorn with
4 workers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _cachelib_tests import (
    ClearTests,
    CommonTests,
    DeleteManyWithPrefixTests,
    HasTests,
    SerializerTests,
    SillySerializer,
)
from _live import LiveGunicorn, request
from _procs import fork, wait_ok
from cachelib import BaseCache
from cachelib.serializers import BaseSerializer

import prefork_sessions.cachelib
from prefork_sessions import InvalidArgumentError, MmapStore, _pager, _store
from prefork_sessions._shared import shared_mmap
from prefork_sessions.cachelib import DEFAULT_FILE_NAME, MmapCache

TESTS = Path(__file__).resolve().parent
SIZES: dict[str, Any] = {"cache_size": 1 << 20, "page_size": 16 << 10}  # values up to ~15.7 KB


@pytest.fixture(autouse=True)
def _close_stores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close the stores this test's caches opened (each test has its own files), and
    only those: other modules' tests in this process may hold shared stores of their own."""
    opened: list[MmapStore] = []

    def recording(path: str, **options: Any) -> MmapStore:
        store = shared_mmap(path, **options)
        opened.append(store)
        return store

    monkeypatch.setattr(prefork_sessions.cachelib, "shared_mmap", recording)
    yield
    for store in opened:
        store.close()


class CustomCache(MmapCache):
    """cachelib's own way to change a backend's serializer: a subclass."""

    serializer = SillySerializer()


# cachelib's suites run each backend plain and with its test SillySerializer (and Redis
# with and without a key prefix).  Here: plain on the C pager, and the other three
# variations together on the pure-Python one, so each runs once and the module stays fast.
VARIANTS = [
    pytest.param((MmapCache, None, "c"), id="plain-c"),
    pytest.param((CustomCache, "test-key-prefix:", "python"), id="silly-prefix-python"),
]
if not _pager.ACCELERATED:  # PREFORK_SESSIONS_PURE=1 or no C extension: one pager only
    VARIANTS = [pytest.param((MmapCache, None, "python"), id="plain-python"), VARIANTS[1]]


@pytest.fixture(params=VARIANTS)
def cache_factory(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    cls, key_prefix, pager = request.param
    if pager == "python":
        monkeypatch.setattr(_store, "FastPager", _pager.Pager)
    path = tmp_path / "cache"

    def _factory(self: Any, *args: Any, **kwargs: Any) -> MmapCache:
        kwargs.setdefault("key_prefix", key_prefix)
        made: MmapCache = cls(path, *args, **SIZES, **kwargs)
        return made

    request.cls.cache_factory = _factory


@pytest.mark.usefixtures("cache_factory")
class TestCachelibSuite(CommonTests, ClearTests, HasTests, SerializerTests,
                        DeleteManyWithPrefixTests):
    """cachelib's mixins, as its own suites run them against each backend."""


@pytest.mark.usefixtures("cache_factory")
class TestCachelibSemantics:
    cache_factory: Any

    def test_is_a_cachelib_cache_that_implements_every_stub(self) -> None:
        cache = self.cache_factory()
        assert isinstance(cache, BaseCache)
        # BaseCache's own get/set/... do nothing (a NullCache): each must be ours
        for name in ("get", "set", "add", "delete", "has", "clear", "inc", "dec"):
            assert getattr(type(cache), name) is not getattr(BaseCache, name), name

    def test_delete_says_whether_the_key_was_there(self) -> None:
        cache = self.cache_factory()
        assert cache.delete("nothing") is False
        cache.set("k", 1)
        assert cache.delete("k") is True
        assert cache.has("k") is False

    def test_none_is_a_value_has_can_tell(self) -> None:
        cache = self.cache_factory()
        assert cache.set("none", None)
        assert cache.get("none") is None and cache.has("none")
        assert not cache.add("none", 1)

    def test_timeouts(self) -> None:
        cache = self.cache_factory(default_timeout=dt.timedelta(minutes=2))
        assert cache.default_timeout == 120
        store = cache.store
        k = cache.key_prefix
        cache.set("default", 1)
        cache.set("never", 1, timeout=0)
        cache.set("delta", 1, timeout=dt.timedelta(seconds=30))
        cache.add("added", 1, timeout=45)
        assert 119 < store.ttl(k + "default") <= 120
        assert store.ttl(k + "never") == float("inf")
        assert 29 < store.ttl(k + "delta") <= 30
        assert 44 < store.ttl(k + "added") <= 45
        with pytest.warns(DeprecationWarning, match="Float timeouts"):  # cachelib's own rule
            cache.set("float", 1, timeout=0.2)
        assert 0.9 < store.ttl(k + "float") <= 1

    def test_a_negative_timeout_has_expired_already(self) -> None:
        # as in SimpleCache and FileSystemCache: the value is set, expired
        cache = self.cache_factory()
        cache.set("k", "old")
        assert cache.set("k", "new", timeout=-1) is True
        assert cache.get("k") is None and not cache.has("k")
        assert cache.add("free", 1, timeout=-1) is True
        assert not cache.has("free")
        cache.set("taken", 1)
        assert cache.add("taken", 2, timeout=-1) is False
        assert cache.get("taken") == 1

    def test_odd_timeouts(self) -> None:
        cache = self.cache_factory()
        assert cache.set("long", 1, timeout=10**10)  # beyond the store's 100 years: never
        assert cache.store.ttl(cache.key_prefix + "long") == float("inf")
        cache.set("k", 1)
        with pytest.raises(TypeError, match="timeout must be an int"):
            cache.set("k", 2, timeout="60")
        assert cache.get("k") == 1
        with pytest.raises(InvalidArgumentError, match="default_timeout=-5"):
            self.cache_factory(default_timeout=-5)

    def test_expiry(self) -> None:
        cache = self.cache_factory()
        for key in ("got", "has", "add", "inc"):
            cache.set(key, 5, timeout=1)
        time.sleep(1.1)
        assert cache.get("got") is None
        assert cache.has("has") is False
        assert cache.add("add", "new") is True and cache.get("add") == "new"
        assert cache.inc("inc", 2) == 2  # an expired counter starts again

    def test_inc_keeps_the_lifetime_left_and_a_new_counter_gets_the_default(self) -> None:
        cache = self.cache_factory(default_timeout=300)
        store, k = cache.store, cache.key_prefix
        cache.set("n", 10, timeout=50)
        assert cache.inc("n") == 11 and cache.dec("n", 4) == 7
        assert 49 < store.ttl(k + "n") <= 50
        cache.set("forever", 1, timeout=0)
        assert cache.inc("forever") == 2
        assert store.ttl(k + "forever") == float("inf")
        assert cache.inc("fresh", 3) == 3
        assert 299 < store.ttl(k + "fresh") <= 300

    def test_inc_of_a_non_number_raises_and_changes_nothing(self) -> None:
        cache = self.cache_factory()
        cache.set("word", "spam", timeout=50)
        with pytest.raises(TypeError):
            cache.inc("word")
        assert cache.get("word") == "spam"
        assert 49 < cache.store.ttl(cache.key_prefix + "word") <= 50

    def test_a_value_too_large_for_a_page_is_refused_and_nothing_else_is_lost(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        cache = self.cache_factory()
        others = {f"other{i}": "x" * 1000 for i in range(40)}
        assert cache.set_many(others) == list(others)
        cache.set("k", "old")
        huge = "y" * SIZES["page_size"]
        with caplog.at_level(logging.WARNING, logger="prefork_sessions.cachelib"):
            assert cache.set("k", huge) is False
        assert "page_size" in caplog.text and str(cache.store.path) in caplog.text
        assert cache.add("new", huge) is False
        assert cache.set_many({"a": 1, "k": huge, "b": 2}) == ["a", "b"]
        assert cache.get("k") == "old" and not cache.has("new")
        assert cache.get_many(*others) == list(others.values())
        assert cache.store.stats()["evictions"] == 0

    def test_a_value_the_serializer_cannot_pickle_is_refused(self) -> None:
        cache = self.cache_factory()
        cache.serializer = BaseSerializer()  # pickle, returning None where it fails
        cache.set("k", "old")

        class Unpicklable:
            def __reduce__(self) -> Any:
                raise pickle.PicklingError("cannot pickle")

        assert cache.set("k", Unpicklable()) is False
        assert cache.add("new", Unpicklable()) is False
        assert cache.get("k") == "old" and not cache.has("new")

    def test_keys_are_str(self) -> None:
        cache = self.cache_factory()
        with pytest.raises(InvalidArgumentError, match="keys are str, not bytes"):
            cache.set(b"k", 1)
        with pytest.raises(TypeError):  # InvalidArgumentError is a TypeError too
            cache.get(5)

    def test_concurrent_add_has_one_winner(self) -> None:
        cache = self.cache_factory()
        barrier = threading.Barrier(20)

        def adder(_: int) -> bool:
            barrier.wait()
            return bool(cache.add("race-key", 1))

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(adder, range(20)))
        assert results.count(True) == 1

    def test_concurrent_inc_through_a_slow_serializer_loses_nothing(self) -> None:
        # cachelib's SimpleCache test: a serializer slow enough to widen any race
        cache = self.cache_factory()
        inner: BaseSerializer = type(cache).serializer

        class Slow(BaseSerializer):
            def dumps(self, value: Any, protocol: int = 5) -> bytes | None:
                time.sleep(0.0001)
                return inner.dumps(value)

            def loads(self, bvalue: bytes) -> Any:
                return inner.loads(bvalue)

        cache.serializer = Slow()
        cache.set("counter", 0)
        barrier = threading.Barrier(10)

        def incrementer(_: int) -> list[int]:
            barrier.wait()
            return [cache.inc("counter") for _ in range(50)]

        with ThreadPoolExecutor(10) as pool:
            seen = sorted(v for got in pool.map(incrementer, range(10)) for v in got)
        assert seen == list(range(1, 501))
        assert cache.get("counter") == 500

    def test_concurrent_readers_see_only_whole_values(self) -> None:
        cache = self.cache_factory()
        cache.set("shared", ("initial", -1))
        written = {(w, i) for w in range(4) for i in range(200)}
        stop = threading.Event()
        seen: list[Any] = []

        def writer(w: int) -> None:
            for i in range(200):
                cache.set("shared", (w, i))

        def reader() -> None:
            while not stop.is_set():
                seen.append(cache.get("shared"))

        readers = [threading.Thread(target=reader) for _ in range(3)]
        for t in readers:
            t.start()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(writer, range(4)))
        stop.set()
        for t in readers:
            t.join()
        assert seen and set(seen) <= written | {("initial", -1)}
        assert cache.get("shared") in written


# -- options, the file, and the store under it


def test_options(tmp_path: Path) -> None:
    for bad in ({"serializer": "json"}, {"expire": 5}, {"app_name": "x"}, {"colour": 1}):
        with pytest.raises(InvalidArgumentError, match="unknown option"):
            MmapCache(tmp_path / "opts", **bad)
    with pytest.raises(InvalidArgumentError, match="key_prefix"):
        MmapCache(tmp_path / "opts", key_prefix=5)  # type: ignore[arg-type]
    assert MmapCache(tmp_path / "opts", key_prefix=None, **SIZES).key_prefix == ""
    cache = MmapCache(tmp_path / "opts", lock_timeout=2.0, ignore_delete_many_errors=False,
                      **SIZES)
    assert cache.ignore_delete_many_errors is False
    assert (cache.store.page_size, cache.store.num_pages) == (16 << 10, 64)


def test_one_store_per_file_per_process(tmp_path: Path) -> None:
    a = MmapCache(tmp_path / "one", **SIZES)
    b = MmapCache(str(tmp_path / "one"), key_prefix="b:", **SIZES)
    assert a.store is b.store
    a.set("k", 1)
    b.set("k", 2)
    assert (a.get("k"), b.get("k"), a.get("b:k")) == (1, 2, 2)


def test_clear_with_a_prefix_clears_only_its_keys(tmp_path: Path) -> None:
    plain = MmapCache(tmp_path / "shared", **SIZES)
    mine = MmapCache(tmp_path / "shared", key_prefix="mine:", **SIZES)
    theirs = MmapCache(tmp_path / "shared", key_prefix="theirs:", **SIZES)
    for c in (plain, mine, theirs):
        c.set_many({"a": 1, "b": 2})
    assert mine.clear()
    assert mine.get_many("a", "b") == [None, None]
    assert theirs.get_many("a", "b") == [1, 2] and plain.get("a") == 1
    assert plain.clear()  # no prefix: the whole file
    assert len(plain.store) == 0


def test_default_path_is_the_caches_own_never_a_sessions_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sessions = MmapStore(**SIZES)  # the session store's own default file
    named = MmapStore(app_name="prefork_cachelib", **SIZES)
    try:
        sessions.set("sid", {"user": 1})
        named.set("sid", {"user": 2})
        cache = MmapCache(**SIZES)
        assert cache.store.path == str(tmp_path / DEFAULT_FILE_NAME)
        assert cache.store.path not in (sessions.path, named.path)
        cache.set("k", 1)
        assert cache.clear()
        assert cache.get("k") is None
        assert sessions.get("sid") == {"user": 1} and named.get("sid") == {"user": 2}
    finally:
        sessions.close()
        named.close()



def test_the_session_file_of_the_gunicorn_hooks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFORK_SESSIONS_PATH", str(tmp_path / "sessions"))
    with pytest.raises(InvalidArgumentError, match="session store's file"):
        MmapCache(str(tmp_path / "." / "sessions"), **SIZES)
    assert not (tmp_path / "sessions").exists()
    MmapCache(tmp_path / "cache", **SIZES)


def test_importing_the_package_does_not_import_cachelib() -> None:
    code = "import sys, prefork_sessions; print('cachelib' in sys.modules, 'flask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- processes


def test_inc_is_exact_from_8_forked_processes(tmp_path: Path) -> None:
    cache = MmapCache(tmp_path / "counts", **SIZES)  # opened before the fork: inherited
    cache.set("hits", 0)
    results = tmp_path / "results"
    results.mkdir()
    per_child = 300

    def child(n: int) -> None:
        seen = [cache.inc("hits") for _ in range(per_child)]
        cache.dec("down", 2)
        (results / str(n)).write_text(json.dumps(seen))

    pids = [fork(lambda n=n: child(n)) for n in range(8)]  # type: ignore[misc]
    wait_ok(pids)
    seen = sorted(v for f in results.iterdir() for v in json.loads(f.read_text()))
    assert seen == list(range(1, 8 * per_child + 1))  # each value handed out once
    assert cache.get("hits") == 8 * per_child
    assert cache.get("down") == -16


# -- Flask-Caching


def _flask_app(**config: Any) -> Any:
    from flask import Flask
    from flask_caching import Cache

    app = Flask(__name__)
    app.config.update(CACHE_TYPE="prefork_sessions.cachelib.MmapCache", **config)
    cache = Cache(app)
    calls: list[int] = []  # the view's computations
    squared: list[int] = []

    @app.get("/view")
    @cache.cached(timeout=60)
    def view() -> str:
        calls.append(1)
        return f"computed {len(calls)}"

    @cache.memoize(60)
    def square(n: int) -> int:
        squared.append(n)
        return n * n

    app.config.update(calls=calls, squared=squared, square=square)
    return app, cache


def test_flask_caching_builds_it_from_cache_options(tmp_path: Path) -> None:
    app, cache = _flask_app(CACHE_DEFAULT_TIMEOUT=dt.timedelta(minutes=5),
                            CACHE_OPTIONS={"path": str(tmp_path / "flask"), **SIZES})
    backend = cache.cache
    assert isinstance(backend, MmapCache)
    assert backend.store.path == str(tmp_path / "flask")
    assert backend.default_timeout == 300
    client = app.test_client()
    assert [client.get("/view").text for _ in range(3)] == ["computed 1"] * 3
    assert app.config["calls"] == [1]

    def other_worker() -> None:  # another process on the file is served the same page
        app2, _ = _flask_app(CACHE_OPTIONS={"path": str(tmp_path / "flask"), **SIZES})
        assert app2.test_client().get("/view").text == "computed 1"
        assert app2.config["calls"] == []
    wait_ok([fork(other_worker)])
    with app.app_context():
        assert app.config["square"](7) == 49 and app.config["square"](7) == 49
        assert app.config["squared"] == [7]
        assert cache.get("view//view") is not None
        cache.clear()
        assert cache.get("view//view") is None
    assert client.get("/view").text == "computed 2"


def test_flask_caching_passes_cache_args_positionally(tmp_path: Path) -> None:
    _, cache = _flask_app(CACHE_ARGS=[str(tmp_path / "args")], CACHE_OPTIONS=SIZES,
                          CACHE_IGNORE_ERRORS=True)
    assert cache.cache.store.path == str(tmp_path / "args")
    assert cache.cache.ignore_delete_many_errors is True


# -- real gunicorn, 4 workers


def test_flask_caching_under_gunicorn_is_shared_by_every_worker(tmp_path: Path) -> None:
    path = tmp_path / "flask-cache"
    with LiveGunicorn(tmp_path, workers=4, threads=1, app="_cachelib_app:create_app()",
                      args=("--pythonpath", str(TESTS)),
                      env={"PREFORK_CACHELIB_TEST_PATH": str(path)}) as server:

        def get(target: str) -> tuple[int, dict[str, Any]]:
            status, headers, body = request(server.port, target, timeout=20)
            assert status == 200, body
            return int(headers["X-Worker"]), json.loads(body)

        first_worker, first = get("/cached")  # computes it, alone

        def until_two_workers(target: str) -> list[tuple[int, dict[str, Any]]]:
            """Rounds of 48 concurrent requests until two workers have answered: the
            others may still be importing Flask when the first one serves."""
            got: list[tuple[int, dict[str, Any]]] = []
            deadline = time.monotonic() + 20
            with ThreadPoolExecutor(8) as pool:
                while len({worker for worker, _ in got}) < 2 and time.monotonic() < deadline:
                    got += pool.map(lambda _: get(target), range(48))
            return got

        assert first == {"computed_by": first_worker, "computation": 1}
        cached = until_two_workers("/cached")
        assert {json.dumps(body) for _, body in cached} == {json.dumps(first)}
        assert len({worker for worker, _ in cached}) > 1  # served by other workers too
        counted = until_two_workers("/inc")
        assert sorted(body["value"] for _, body in counted) == list(range(1, len(counted) + 1))
        assert len({worker for worker, _ in counted}) > 1
        assert get("/get/hits")[1] == {"value": len(counted)}
        assert get("/get/computations")[1] == {"value": 1}


def test_flask_session_keeps_sessions_in_it(tmp_path: Path) -> None:
    from flask import Flask, session
    from flask_session import Session

    cache = MmapCache(tmp_path / "sessions-cache", **SIZES)
    app = Flask(__name__)
    app.config.update(SECRET_KEY="x" * 32, SESSION_TYPE="cachelib", SESSION_CACHELIB=cache,
                      SESSION_PERMANENT=True, PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=1))
    Session(app)

    @app.get("/bump")
    def bump() -> str:
        session["n"] = session.get("n", 0) + 1
        return str(session["n"])

    client = app.test_client()
    assert [client.get("/bump").text for _ in range(3)] == ["1", "2", "3"]
    (key,) = cache.store.keys()  # Flask-Session's "session:<id>", pickled by our serializer
    assert str(key).startswith("session:")
    assert cache.get(str(key)) == {"_permanent": True, "n": 3}
    assert 3599 < cache.store.ttl(key) <= 3600


