"""The Django engine (prefork_sessions.django): Django's own SessionTestsMixin on the
mmap store and on Redis, a real test-client round trip, the merge, and the store key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        SECRET_KEY="test-secret-key-for-prefork-sessions-django-tests",
        SESSION_ENGINE="prefork_sessions.django",
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
        INSTALLED_APPS=["django.contrib.sessions"],
        ALLOWED_HOSTS=["testserver"],
        USE_TZ=True,
    )
    django.setup()

from _django_session_mixin import SessionTestsMixin
from django.contrib.sessions.backends.base import CreateError, UpdateError
from django.core.management import call_command
from django.http import HttpRequest, JsonResponse
from django.test import Client, SimpleTestCase, override_settings
from django.urls import path
from test_outage import Server

from prefork_sessions import InvalidArgumentError, MmapStore, RedisStore
from prefork_sessions import django as engine

SMALL = 1 << 20  # bytes: a store file of 16 pages is plenty for these tests


@pytest.fixture
def mmap_settings(tmp_path: Path) -> Iterator[Path]:
    """PREFORK_SESSIONS naming a fresh store file in tmp_path."""
    file = tmp_path / "sessions"
    with override_settings(PREFORK_SESSIONS={"path": str(file), "cache_size": SMALL}):
        yield file
    engine.close_stores()


@pytest.fixture(params=["mmap", "redis"])
def either_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """PREFORK_SESSIONS naming a fresh store file, or the test process's redis-server."""
    if request.param == "mmap":
        conf: dict[str, Any] = {"path": str(tmp_path / "sessions"), "cache_size": SMALL}
    else:
        conf = {"redis_url": request.getfixturevalue("redis_url")}
    with override_settings(PREFORK_SESSIONS=conf):
        yield str(request.param)
        if request.param == "redis":
            engine.get_store().clear()
    engine.close_stores()


class TestMmapSessionContract(SessionTestsMixin, SimpleTestCase):  # type: ignore[misc]
    """Django's own backend contract, on the mmap store."""

    backend = engine.SessionStore

    @pytest.fixture(autouse=True)
    def _store(self, mmap_settings: Path) -> None:
        pass


class TestRedisSessionContract(SessionTestsMixin, SimpleTestCase):  # type: ignore[misc]
    """Django's own backend contract, on RedisStore."""

    backend = engine.SessionStore

    @pytest.fixture(autouse=True)
    def _store(self, redis_url: str) -> Iterator[None]:
        with override_settings(PREFORK_SESSIONS={"redis_url": redis_url}):
            yield
        engine.close_stores()


# -- a real app -----------------------------------------------------------------


def incr(request: HttpRequest) -> JsonResponse:
    request.session["n"] = request.session.get("n", 0) + 1
    return JsonResponse({"n": request.session["n"]})


def login(request: HttpRequest) -> JsonResponse:
    request.session.cycle_key()
    return JsonResponse({})


def logout(request: HttpRequest) -> JsonResponse:
    request.session.flush()
    return JsonResponse({})


_outage: list[Server] = []  # the server test_redis_going_away_* stops in a view


def incr_then_lose_redis(request: HttpRequest) -> JsonResponse:
    request.session["n"] = request.session.get("n", 0) + 1
    _outage[0].stop()  # gone between the view and the save
    return JsonResponse({"n": request.session["n"]})


urlpatterns = [path("incr", incr), path("login", login), path("logout", logout),
               path("incr-then-lose-redis", incr_then_lose_redis)]


def test_test_client_round_trip(mmap_settings: Path) -> None:
    client = Client()
    assert [client.get("/incr").json()["n"] for _ in range(3)] == [1, 2, 3]
    sid = client.cookies[settings.SESSION_COOKIE_NAME].value
    store = engine.get_store()
    assert isinstance(store, MmapStore) and store.path == str(mmap_settings)
    assert engine.SessionStore(sid).load() == {"n": 3}
    assert store.get(engine.store_key(sid)) is not None

    client.get("/login")
    rotated = client.cookies[settings.SESSION_COOKIE_NAME].value
    assert rotated != sid and not engine.SessionStore().exists(sid)
    assert client.get("/incr").json()["n"] == 4

    client.get("/logout")
    assert client.cookies[settings.SESSION_COOKIE_NAME].value == ""
    assert not engine.SessionStore().exists(rotated)
    replay = Client()
    replay.cookies[settings.SESSION_COOKIE_NAME] = rotated
    assert replay.get("/incr").json()["n"] == 1  # the logged-out id is not honoured
    assert replay.cookies[settings.SESSION_COOKIE_NAME].value not in ("", rotated)


def test_store_never_holds_the_session_key(mmap_settings: Path) -> None:
    s = engine.SessionStore()
    s["user"] = "alice"
    s.save()
    key = s.session_key
    store = engine.get_store()
    assert engine.store_key(key) in store
    assert all(key not in str(k) for k in store)
    assert key.encode() not in mmap_settings.read_bytes()
    # keyed by SECRET_KEY: another secret gives another store key, so the record is not found
    with override_settings(SECRET_KEY="another-secret-key-entirely-for-this-test-run"):
        assert engine.store_key(key) not in store
        assert engine.SessionStore(key).load() == {}


def test_concurrent_saves_merge_keys(either_store: str) -> None:
    s = engine.SessionStore()
    s.update({"a": 0, "b": 0, "gone": 1})
    s.save()
    one, two = engine.SessionStore(s.session_key), engine.SessionStore(s.session_key)
    one["a"] = 1
    two["b"] = 2
    del two["gone"]
    one.save()
    two.save()
    assert engine.SessionStore(s.session_key).load() == {"a": 1, "b": 2}
    # A second save of the same object merges what changed since its first.
    one["c"] = 3
    one.save()
    assert engine.SessionStore(s.session_key).load() == {"a": 1, "b": 2, "c": 3}


def test_save_of_deleted_session_raises_and_writes_nothing(either_store: str) -> None:
    s = engine.SessionStore()
    s["x"] = 1
    s.save()
    key = s.session_key
    engine.SessionStore(key).delete()
    s["x"] = 2
    with pytest.raises(UpdateError):
        s.save()
    s.set_expiry(-5)  # the expired-at-once path keeps the contract too
    with pytest.raises(UpdateError):
        s.save()
    assert not s.exists(key)


def test_negative_expiry_removes_a_stored_session(either_store: str) -> None:
    s = engine.SessionStore()
    s["x"] = 1
    s.save()
    key = s.session_key
    s.set_expiry(-1)
    s.save()
    assert s.exists(key) is False


def test_only_one_of_racing_creators_wins(either_store: str) -> None:
    key = "k" * 32
    barrier = threading.Barrier(8)
    outcome: dict[int, str] = {}

    def create(i: int) -> None:
        s = engine.SessionStore(key)  # not loaded: a load of the unknown key would drop it
        barrier.wait()
        try:
            s.save(must_create=True)
            outcome[i] = "won"
        except CreateError:
            outcome[i] = "lost"

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcome.items() if o == "won"]
    assert len(outcome) == 8 and len(winners) == 1
    assert engine.SessionStore().exists(key)


def test_clearsessions_purges_expired_records(mmap_settings: Path) -> None:
    s = engine.SessionStore()
    s.set_expiry(1)
    s.save()
    keep = engine.SessionStore()
    keep.save()
    store = engine.get_store()
    assert isinstance(store, MmapStore)
    before = store.stats()["expirations"]
    time.sleep(1.2)
    call_command("clearsessions")
    assert store.stats()["expirations"] == before + 1
    assert keep.exists(keep.session_key) and not s.exists(s.session_key)


def test_forked_child_shares_the_store(mmap_settings: Path) -> None:
    s = engine.SessionStore()
    s["from"] = "parent"
    s.save()
    pid = os.fork()
    if pid == 0:
        try:
            child = engine.SessionStore(s.session_key)
            ok = child.load() == {"from": "parent"}
            child["child"] = os.getpid()
            child.save()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert engine.SessionStore(s.session_key).load() == {"from": "parent", "child": pid}


def test_redis_url_selects_redis(redis_url: str) -> None:
    with override_settings(PREFORK_SESSIONS={"redis_url": redis_url}):
        client = Client()
        assert [client.get("/incr").json()["n"] for _ in range(2)] == [1, 2]
        store = engine.get_store()
        assert isinstance(store, RedisStore)
        sid = client.cookies[settings.SESSION_COOKIE_NAME].value
        assert engine.store_key(sid) in store
        fields = store.client.hgetall(store.redis_key(engine.store_key(sid)))  # natively a HASH
        assert json.loads(fields[b"d:n"]) == 2 and float(fields[b"e"]) > time.time()
        assert all(sid not in str(k) for k in store)
    engine.close_stores()


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        with override_settings(PREFORK_SESSIONS={"cache_size": SMALL}, ROOT_URLCONF="mysite.urls"):
            store = engine.get_store()
            assert isinstance(store, MmapStore)
            assert store.path == str(tmp_path / "mysite_django_session_data")
    finally:
        engine.close_stores()


@pytest.mark.parametrize(
    "conf",
    [{"pth": "/tmp/x"}, {"path": "/tmp/x", "redis_url": "redis://127.0.0.1:1/0"}, ["path"]],
)
def test_bad_settings_raise(conf: Any) -> None:
    with override_settings(PREFORK_SESSIONS=conf), pytest.raises(InvalidArgumentError):
        engine.SessionStore()


def test_importing_the_package_does_not_import_django() -> None:
    code = "import sys, prefork_sessions; sys.exit('django' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- SECRET_KEY rotation -------------------------------------------------------------

OLD_SECRET = "the-old-secret-key-that-was-rotated-out-of-settings"


def test_a_session_under_a_fallback_key_loads_and_moves_to_the_current_key(
    either_store: str,
) -> None:
    with override_settings(SECRET_KEY=OLD_SECRET):
        s = engine.SessionStore()
        s["user"] = 7
        s.save()
        key, old_skey = s.session_key, engine.store_key(s.session_key)
    store = engine.get_store()
    with override_settings(SECRET_KEY_FALLBACKS=[OLD_SECRET]):
        assert engine.store_key(key) != old_skey
        again = engine.SessionStore(key)
        assert again.exists(key) and again.load() == {"user": 7}
        again["seen"] = True
        again.save()
        assert old_skey not in store and engine.store_key(key) in store
        assert engine.SessionStore(key).load() == {"user": 7, "seen": True}
    # Without the fallback the moved session still loads: it is under the current key now.
    assert engine.SessionStore(key).load() == {"user": 7, "seen": True}


def test_without_the_fallback_a_rotated_secret_ends_the_session(either_store: str) -> None:
    with override_settings(SECRET_KEY=OLD_SECRET):
        s = engine.SessionStore()
        s["user"] = 7
        s.save()
        key = s.session_key
    fresh = engine.SessionStore(key)
    assert not fresh.exists(key) and fresh.load() == {} and fresh.session_key is None


def test_a_logout_under_the_fallback_key_is_never_undone_by_the_move(either_store: str) -> None:
    with override_settings(SECRET_KEY=OLD_SECRET):
        s = engine.SessionStore()
        s["user"] = 7
        s.save()
        key = s.session_key
    with override_settings(SECRET_KEY_FALLBACKS=[OLD_SECRET]):
        writer = engine.SessionStore(key)
        assert writer["user"] == 7  # loaded (from the fallback key), as a request would
        engine.SessionStore(key).delete()  # a concurrent logout
        writer["late"] = 1
        with pytest.raises(UpdateError):
            writer.save()
        assert not engine.SessionStore(key).exists(key)


def test_on_redis_a_save_sends_only_what_changed(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with override_settings(PREFORK_SESSIONS={"redis_url": redis_url}):
        warm = engine.SessionStore()
        warm["a"] = 1
        warm.save()
        warm["a"] = 2
        warm.save()  # the server has the merge script now (a first use adds SCRIPT LOAD)
        s = engine.SessionStore()
        s.update({"a": 1, "big": "x" * 10_000, "gone": 1})
        s.save()
        again = engine.SessionStore(s.session_key)
        assert again["a"] == 1
        store = engine.get_store()
        assert isinstance(store, RedisStore)
        sent: list[tuple[Any, ...]] = []
        send = store.client.execute_command
        monkeypatch.setattr(store.client, "execute_command",
                            lambda *a, **k: sent.append(a) or send(*a, **k))
        again["a"] = 2
        del again["gone"]
        again.save()
        assert [a[0] for a in sent] == ["EVALSHA"]  # one script, no read first
        assert sum(len(x) for x in sent[0] if isinstance(x, bytes)) < 1000  # not the 10 kB value
        monkeypatch.undo()
        assert engine.SessionStore(s.session_key).load() == {"a": 2, "big": "x" * 10_000}
        store.clear()
    engine.close_stores()


def test_on_redis_a_record_stored_whole_converts_as_it_loads(redis_url: str) -> None:
    with override_settings(PREFORK_SESSIONS={"redis_url": redis_url}):
        s = engine.SessionStore()
        key = "w" * 32
        store = engine.get_store()
        assert isinstance(store, RedisStore)
        # What `prefork-sessions import` writes from a session file: the record, whole.
        store.set(engine.store_key(key), s.encode({"user": 5}).encode(), expire=900)
        loaded = engine.SessionStore(key)
        assert loaded.load() == {"user": 5}
        rkey = store.redis_key(engine.store_key(key))
        assert store.client.type(rkey) == b"hash" and 890_000 < store.client.pttl(rkey) <= 900_000
        loaded["more"] = 1
        loaded.save()
        assert engine.SessionStore(key).load() == {"user": 5, "more": 1}
        store.clear()
    engine.close_stores()


def test_redis_going_away_answers_503_and_service_resumes(tmp_path: Path) -> None:
    server = Server(tmp_path)
    server.start()
    _outage[:] = [server]
    try:
        with override_settings(PREFORK_SESSIONS={"redis_url": server.url},
                               MIDDLEWARE=["prefork_sessions.django.SessionMiddleware"]):
            client = Client(raise_request_exception=False)
            assert client.get("/incr").json() == {"n": 1}
            server.stop()
            for url in ("/incr", "/incr"):  # the view's load fails, every time
                down = client.get(url)
                assert down.status_code == 503 and down["Retry-After"] == "5"
                assert settings.SESSION_COOKIE_NAME not in down.cookies
            server.start()
            assert client.get("/incr").json() == {"n": 1}  # back (this server keeps nothing)
            lost = client.get("/incr-then-lose-redis")  # the save fails
            assert lost.status_code == 503 and lost["Retry-After"] == "5"
            assert settings.SESSION_COOKIE_NAME not in lost.cookies
            server.start()
            assert client.get("/incr").json() == {"n": 1}
    finally:
        server.stop()
        engine.close_stores()
