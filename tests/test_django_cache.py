"""The Django cache backend (prefork_sessions.django.MmapCache): Django's own
BaseCacheTests and its cache-session tests on a real store file, the settings'
checks, Django's timeout rules, incr exact from 8 forked processes, one mapping
per process whatever the threads, and a real gunicorn with 4 workers sharing one
cached page and one counter."""

from __future__ import annotations

import asyncio
import json
import math
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    # The very settings of tests/test_django.py: whichever of the two modules pytest
    # imports first configures Django for the whole process.
    settings.configure(
        SECRET_KEY="test-secret-key-for-prefork-sessions-django-tests",
        SESSION_ENGINE="prefork_sessions.django",
        ROOT_URLCONF="test_django",
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
        INSTALLED_APPS=["django.contrib.sessions"],
        ALLOWED_HOSTS=["testserver"],
        USE_TZ=True,
    )
    django.setup()

import _django_cache_tests as vendored
from _live import LiveGunicorn, request
from _procs import fork, wait_ok
from django.core.cache import CacheKeyWarning, caches
from django.http import HttpRequest, JsonResponse
from django.test import Client, SimpleTestCase, override_settings
from django.urls import path

from prefork_sessions import InvalidArgumentError, ValueTooLargeError
from prefork_sessions._shared import close_shared, shared_mmap
from prefork_sessions.django import MmapCache

BACKEND = "prefork_sessions.django.MmapCache"
TESTS = Path(__file__).resolve().parent
SMALL = {"cache_size": 1 << 20, "page_size": 16 << 10}  # 64 pages: plenty here


def cache_settings(file: Path, **params: Any) -> dict[str, Any]:
    """A CACHES setting with one MmapCache, "default", on ``file``."""
    options = {**SMALL, **params.pop("OPTIONS", {})}
    return {"default": {"BACKEND": BACKEND, "LOCATION": str(file), "OPTIONS": options, **params}}


def raw_store(file: Path) -> Any:
    """The process's store on ``file``, as MmapCache opens it (the same object)."""
    return shared_mmap(str(file), serializer="raw")


@pytest.fixture
def cache_file(tmp_path: Path) -> Iterator[Path]:
    """CACHES["default"] = MmapCache on a fresh file in tmp_path."""
    file = tmp_path / "cache"
    with override_settings(CACHES=cache_settings(file)):
        yield file
    close_shared()


@pytest.fixture
def cache(cache_file: Path) -> MmapCache:
    backend = caches["default"]
    assert isinstance(backend, MmapCache)
    return backend


# -- Django's own suites --------------------------------------------------------


class TestDjangoBaseCacheTests(vendored.BaseCacheTests, SimpleTestCase):  # type: ignore[misc]
    """Django's BaseCacheTests, run as Django runs them for FileBasedCache and
    RedisCache: every alias of caches_setting_for_tests on the one store file."""

    @pytest.fixture(autouse=True)
    def _caches(self, tmp_path: Path) -> Iterator[None]:
        file = str(tmp_path / "cache")
        aliases = vendored.caches_setting_for_tests(BACKEND=BACKEND, LOCATION=file)
        for params in aliases.values():
            params["OPTIONS"] = {**SMALL, **params.get("OPTIONS", {})}
        with override_settings(CACHES=aliases):
            yield
        close_shared()

    # MAX_ENTRIES and CULL_FREQUENCY, which the "cull" aliases set, have no effect
    # (room is made per page, LRU by size): no key is culled.  Django's suite skips
    # these for Redis and memcached, which ignore them likewise.
    def test_cull(self) -> None:
        self._perform_cull_test("cull", 50, 49)

    def test_zero_cull(self) -> None:
        self._perform_cull_test("zero_cull", 50, 49)


class TestDjangoCacheSessionTests(vendored.CacheSessionTests):  # type: ignore[misc]
    """Django's SessionTestsMixin and CacheSessionTests: the cache session engine
    (django.contrib.sessions.backends.cache) over MmapCache."""

    @pytest.fixture(autouse=True)
    def _caches(self, cache_file: Path) -> None:
        pass


# -- settings ---------------------------------------------------------------------


@pytest.mark.parametrize("options, named", [
    ({"cache_sise": 1 << 20}, "cache_sise"),
    ({"serializer": "json"}, "serializer"),  # values are always pickles
    ({"expire": 10}, "expire"),  # TIMEOUT is the default lifetime
])
def test_unknown_options_are_refused_by_name(tmp_path: Path, options: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"unknown keys \\['{named}'\\]"):
        MmapCache(str(tmp_path / "cache"), {"OPTIONS": options})
    assert not (tmp_path / "cache").exists()


def test_bad_location_and_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="LOCATION=''"):
        MmapCache("", {})  # what Django passes when LOCATION is left out
    with pytest.raises(InvalidArgumentError, match="OPTIONS must be a dict"):
        MmapCache(str(tmp_path / "cache"), {"OPTIONS": [("cache_size", 1)]})
    with pytest.raises(InvalidArgumentError, match="cache_size"):
        MmapCache(str(tmp_path / "cache"), {"OPTIONS": {"cache_size": "big"}})
    assert list(tmp_path.iterdir()) == []


def test_the_session_store_file_is_refused(tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    with (override_settings(SESSION_ENGINE="prefork_sessions.django",
                            PREFORK_SESSIONS={"path": str(sessions)}),
          pytest.raises(InvalidArgumentError, match="session store's file")):
        MmapCache(str(tmp_path / "." / "sessions"), {})
    assert not sessions.exists()


def test_the_default_session_store_file_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    default = tmp_path / "mysite_django_session_data"  # PREFORK_SESSIONS without a path
    with (override_settings(SESSION_ENGINE="prefork_sessions.django", PREFORK_SESSIONS={},
                            ROOT_URLCONF="mysite.urls"),
          pytest.raises(InvalidArgumentError, match="session store's file")):
        MmapCache(str(default), {})
    assert not default.exists()


def test_store_options_shape_the_file_and_django_culling_options_have_no_effect(tmp_path: Path) -> None:
    file = tmp_path / "cache"
    backend = MmapCache(str(file), {"OPTIONS": {"cache_size": 256 << 10, "page_size": 8 << 10,
                                                "lock_timeout": 2.5, "MAX_ENTRIES": 2,
                                                "CULL_FREQUENCY": 0}})
    try:
        stats = backend.stats()
        assert (stats["path"], stats["pages"], stats["page_size"]) == (str(file), 32, 8 << 10)
        backend.set_many({f"k{i}": i for i in range(10)})
        assert backend.get_many([f"k{i}" for i in range(10)]) == {f"k{i}": i for i in range(10)}
    finally:
        close_shared()


# -- timeouts ------------------------------------------------------------------------


def ttl(cache: MmapCache, file: Path, key: str) -> float | None:
    seconds: float | None = raw_store(file).ttl(cache.make_key(key))
    return seconds


def test_timeouts_default_none_forever_and_more_than_the_store_allows(cache: MmapCache,
                                                                      cache_file: Path) -> None:
    cache.set("default", 1)
    assert 299 < ttl(cache, cache_file, "default") <= 300  # type: ignore[operator]  # TIMEOUT
    cache.set("forever", 1, timeout=None)
    cache.set("centuries", 1, timeout=10**10)  # past the store's 100 years: never
    cache.set("float", 1, timeout=12.5)
    assert ttl(cache, cache_file, "forever") == ttl(cache, cache_file, "centuries") == math.inf
    assert 12 < ttl(cache, cache_file, "float") <= 12.5  # type: ignore[operator]
    assert cache.touch("float", timeout=None) and ttl(cache, cache_file, "float") == math.inf
    assert cache.touch("float", timeout=30) and 29 < ttl(cache, cache_file, "float") <= 30  # type: ignore[operator]
    for bad in ("5", True, math.nan):
        with pytest.raises(InvalidArgumentError, match="timeout="):
            cache.set("bad", 1, timeout=bad)
    assert cache.get("bad") is None


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_a_timeout_of_zero_or_less_keeps_nothing(cache: MmapCache, timeout: float) -> None:
    # As LocMemCache, FileBasedCache and RedisCache: set removes the old value,
    # add stores nothing and says whether the key was absent, touch removes the key.
    cache.set("k", "old")
    cache.set("k", "new", timeout=timeout)
    assert not cache.has_key("k")
    assert cache.add("k", "v", timeout=timeout) is True
    assert not cache.has_key("k")
    cache.set("k", "kept")
    assert cache.add("k", "v", timeout=timeout) is False
    assert cache.get("k") == "kept"
    assert cache.touch("k", timeout=timeout) is True
    assert not cache.has_key("k")
    assert cache.touch("k", timeout=timeout) is False
    cache.set_many({"a": 1, "b": 2}, timeout=None)
    assert cache.set_many({"a": 3, "b": 4}, timeout=timeout) == []
    assert cache.get_many(["a", "b"]) == {}


def test_a_default_timeout_of_none_means_forever(tmp_path: Path) -> None:
    file = tmp_path / "cache"
    with override_settings(CACHES=cache_settings(file, TIMEOUT=None)):
        backend = caches["default"]
        backend.set("k", 1)
        assert backend.add("a", 1)
        assert ttl(backend, file, "k") == ttl(backend, file, "a") == math.inf
    close_shared()


# -- incr, add, big values -------------------------------------------------------------


def test_incr_keeps_the_remaining_lifetime(cache: MmapCache, cache_file: Path) -> None:
    cache.set("n", 1, timeout=100)
    assert cache.incr("n", 5) == 6 and cache.decr("n") == 5
    assert 99 < ttl(cache, cache_file, "n") <= 100  # type: ignore[operator]  # not TIMEOUT (300)
    cache.set("forever", 1, timeout=None)
    assert cache.incr("forever") == 2 and ttl(cache, cache_file, "forever") == math.inf


def test_incr_of_a_missing_key_raises_and_creates_nothing(cache: MmapCache, cache_file: Path) -> None:
    with pytest.raises(ValueError, match="'n' not found") as info:
        cache.incr("n")
    assert type(info.value) is ValueError  # Django's contract: a ValueError, as every backend's
    with pytest.raises(ValueError, match="not found"):
        cache.decr("n", version=2)
    assert len(raw_store(cache_file)) == 0
    cache.set("text", "abc")
    with pytest.raises(TypeError):
        cache.incr("text")
    assert cache.get("text") == "abc"


def test_values_are_django_pickles(cache: MmapCache, cache_file: Path) -> None:
    value = {"a": [1, 2.5, None], "b": b"\x00"}
    cache.set("v", value)
    stored = raw_store(cache_file).get(cache.make_key("v"))
    assert stored == pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    cache.set("n", 41)
    cache.incr("n")
    assert raw_store(cache_file).get(cache.make_key("n")) == pickle.dumps(42, pickle.HIGHEST_PROTOCOL)


def test_a_value_too_large_for_a_page_raises_and_loses_nothing(cache: MmapCache) -> None:
    big = "x" * (SMALL["page_size"] * 2)
    cache.set("k", "old")
    with pytest.raises(ValueTooLargeError, match="cannot fit in a page"):
        cache.set("k", big)
    with pytest.raises(ValueTooLargeError):
        cache.add("new", big)
    with pytest.raises(ValueTooLargeError):
        cache.add("k", big)  # refused as too large, not answered False
    assert cache.get("k") == "old" and not cache.has_key("new")
    # set_many stores what fits and returns the keys that did not, as memcached's backend.
    assert cache.set_many({"k": big, "a": 1, "b": big}) == ["k", "b"]
    assert cache.get_many(["k", "a", "b"]) == {"k": "old", "a": 1}


def test_set_many_pickles_everything_before_storing_anything(cache: MmapCache) -> None:
    with pytest.raises(pickle.PickleError):
        cache.set_many({"a": 1, "bad": vendored.Unpicklable()})
    assert not cache.has_key("a")


def test_keys_not_portable_to_memcached_warn(cache: MmapCache) -> None:
    with pytest.warns(CacheKeyWarning, match="characters that will cause errors"):
        cache.set("with space", 1)
    with pytest.warns(CacheKeyWarning, match="longer than 250"):
        assert cache.get("k" * 300) is None


def test_clear_empties_the_whole_file(cache: MmapCache, cache_file: Path) -> None:
    store = raw_store(cache_file)
    store.set("not-django", b"x")
    cache.set("a", 1)
    cache.set("a", 2, version=2)
    with override_settings(CACHES={**cache_settings(cache_file),
                                   "other": {**cache_settings(cache_file)["default"],
                                             "KEY_PREFIX": "other"}}):
        caches["other"].set("a", 3)
        caches["default"].clear()
        assert caches["other"].get("a") is None
    assert len(store) == 0


def test_eviction_is_lru_by_size_and_counted(tmp_path: Path) -> None:
    file = tmp_path / "cache"
    with override_settings(CACHES=cache_settings(file, OPTIONS={"cache_size": 64 << 10,
                                                               "page_size": 16 << 10})):
        backend = caches["default"]
        for i in range(400):  # about 4 times the file
            backend.set(f"k{i}", os.urandom(600), timeout=None)
        stats = backend.stats()
        assert stats["evictions"] > 0 and stats["entries"] < 400
        assert backend.has_key("k399")  # the newest stays; the oldest went
        assert not all(backend.has_key(f"k{i}") for i in range(50))
    close_shared()


# -- processes and threads --------------------------------------------------------------


def test_incr_is_exact_from_8_forked_processes(cache: MmapCache, tmp_path: Path) -> None:
    processes, rounds = 8, 300
    cache.set("n", 0, timeout=None)
    out = tmp_path / "seen"
    out.mkdir()

    def work(i: int) -> None:
        # Each child uses the store it inherited (it reopens itself after the fork).
        seen = [caches["default"].incr("n") for _ in range(rounds)]
        (out / str(i)).write_text(json.dumps(seen))

    wait_ok([fork(lambda i=i: work(i)) for i in range(processes)])
    seen = [n for f in out.iterdir() for n in json.loads(f.read_text())]
    assert sorted(seen) == list(range(1, processes * rounds + 1))  # no increment lost or repeated
    assert cache.get("n") == processes * rounds


def mappings_of(file: Path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip("\n").endswith(str(file)) for line in maps)


def test_one_mapping_per_process_whatever_the_threads_and_close_keeps_it(cache_file: Path) -> None:
    made: list[MmapCache] = []

    def request_in_a_thread(n: int) -> None:
        backend = caches["default"]  # Django makes one cache object per thread
        backend.set(f"t{n}", n)
        made.append(backend)
        backend.close()  # as Django does after every request

    threads = [threading.Thread(target=request_in_a_thread, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(b) for b in made}) == 4
    assert mappings_of(cache_file) == 1
    mine = caches["default"]
    assert mine.get_many([f"t{n}" for n in range(4)]) == {f"t{n}": n for n in range(4)}
    mine.close()
    assert made[0].get("t1") == 1  # a closed cache object is used again: nothing was unmapped
    assert mappings_of(cache_file) == 1


def test_async_methods(cache: MmapCache) -> None:
    async def run() -> None:
        await cache.aset("a", 1)
        assert await cache.aadd("a", 2) is False and await cache.aget("a") == 1
        assert await cache.aincr("a", 10) == 11 and await cache.adecr("a") == 10
        assert await cache.aget_or_set("b", lambda: [2]) == [2]
        assert await cache.aset_many({"c": 3, "d": 4}, timeout=60) == []
        assert await cache.aget_many(["a", "b", "c", "x"]) == {"a": 10, "b": [2], "c": 3}
        assert await cache.atouch("c", None) is True and await cache.ahas_key("c") is True
        assert await cache.adelete("c") is True and await cache.ahas_key("c") is False
        await cache.adelete_many(["a", "b"])
        assert await cache.aincr_version("d") == 2 and await cache.aget("d", version=2) == 4
        await cache.aclear()
        assert await cache.aget("d", "gone", version=2) == "gone"
        await cache.aclose()

    asyncio.run(run())
    assert cache.get("d", version=2) is None


# -- sessions over the cache, through Django's test client ---------------------------------


def incr_view(request: HttpRequest) -> JsonResponse:
    request.session["n"] = request.session.get("n", 0) + 1
    return JsonResponse({"n": request.session["n"]})


def login_view(request: HttpRequest) -> JsonResponse:
    request.session.cycle_key()
    return JsonResponse({})


def logout_view(request: HttpRequest) -> JsonResponse:
    request.session.flush()
    return JsonResponse({})


urlpatterns = [path("incr", incr_view), path("login", login_view), path("logout", logout_view)]


def test_cache_session_engine_through_the_test_client(cache: MmapCache, cache_file: Path) -> None:
    with override_settings(SESSION_ENGINE="django.contrib.sessions.backends.cache",
                           ROOT_URLCONF=__name__):
        client = Client()
        assert [client.get("/incr").json()["n"] for _ in range(3)] == [1, 2, 3]
        sid = client.cookies[settings.SESSION_COOKIE_NAME].value
        key = "django.contrib.sessions.cache" + sid
        assert cache.get(key) == {"n": 3}
        assert 0 < ttl(cache, cache_file, key) <= settings.SESSION_COOKIE_AGE  # type: ignore[operator]
        client.get("/login")
        rotated = client.cookies[settings.SESSION_COOKIE_NAME].value
        assert rotated != sid and not cache.has_key(key)
        assert client.get("/incr").json()["n"] == 4
        client.get("/logout")
        assert not cache.has_key("django.contrib.sessions.cache" + rotated)
        replay = Client()
        replay.cookies[settings.SESSION_COOKIE_NAME] = rotated
        assert replay.get("/incr").json()["n"] == 1


# -- real gunicorn ---------------------------------------------------------------------------

WORKERS = 4


def concurrently(calls: int, fn: Any) -> list[Any]:
    """``fn()`` from ``calls`` threads at once; their results."""
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(fn())) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == calls
    return results


@pytest.mark.parametrize("threads, preload", [
    # Sync workers each serve one request at a time: WORKERS concurrent requests held
    # at the app's gate until WORKERS distinct workers hold one are served by all of them.
    pytest.param(1, False, id="sync"),
    # gthread workers forked from a master that opened the store (they reopen it);
    # one of them may take every connection, so --max-requests retires each after a few.
    pytest.param(4, True, id="gthread-preload"),
])
def test_gunicorn_workers_share_one_cached_page_and_one_exact_counter(
    tmp_path: Path, threads: int, preload: bool
) -> None:
    gated = threads == 1
    args = ("--pythonpath", str(TESTS), *(() if gated else ("--max-requests", "4")))
    with LiveGunicorn(tmp_path / "server", workers=WORKERS, threads=threads, preload=preload,
                      app="_django_cache_app:application()", args=args,
                      env={"PREFORK_SESSIONS_CACHE_PATH": str(tmp_path / "cache")}) as server:

        def get(url: str, gate: Path | None = None) -> tuple[int, dict[str, Any]]:
            headers = {"X-Gate": str(gate), "X-Gate-Workers": str(WORKERS)} if gate else {}
            status, response_headers, body = request(server.port, url, headers=headers, timeout=30)
            assert status == 200, (url, status, body[:300], server.log_tail())
            return int(response_headers["X-Worker"]), json.loads(body)

        def gate(name: str) -> Path | None:
            if not gated:
                return None
            (tmp_path / name).mkdir()
            return tmp_path / name

        first = get("/page")
        if gated:
            page_gate = gate("pages")
            pages = concurrently(WORKERS, lambda: get("/page", page_gate))
        else:
            pages = [get("/page") for _ in range(8)]
        computations = get("/computations")[1]["computations"]
        rounds = 6

        count_gate = gate("count")  # each client's first request: every worker counts

        def count() -> list[tuple[int, dict[str, Any]]]:
            return [get("/count", None if i else count_gate) for i in range(rounds)]

        counted = [hit for batch in concurrently(WORKERS, count) for hit in batch]
        hits = get("/hits")[1]["hits"]
    bodies = [body for _, body in [first, *pages]]
    assert bodies == [first[1]] * len(bodies)  # the same page, token and all
    assert first[1]["computation"] == 1 and computations == 1  # computed once
    servers = {worker for worker, _ in pages}
    assert len(servers) == WORKERS if gated else len(servers) >= 2
    assert servers - {first[1]["computed_by"]}  # served by workers that never computed it
    assert sorted(body["n"] for _, body in counted) == list(range(1, WORKERS * rounds + 1))
    assert hits == WORKERS * rounds
    counters = {worker for worker, _ in counted}
    assert len(counters) == WORKERS if gated else len(counters) >= 2
