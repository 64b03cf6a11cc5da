"""Sessions on RedisStore, merged natively: a HASH per session, a save that sends only
what changed without reading first, and every rule of saving kept (no resurrection,
one expiry, new sessions whole), on a real redis-server, for the core, Flask and Django."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from prefork_sessions import NoSpaceError, RedisStore, SerializationError, _session
from prefork_sessions._session import Plan, SessionManager, SessionOptions

LIFETIME = 3600.0
_prefixes = itertools.count()


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    s = RedisStore(redis_url, prefix=f"t{next(_prefixes)}:")
    yield s
    s.clear()
    s.close()


@pytest.fixture
def manager(store: RedisStore) -> SessionManager:
    return SessionManager(store, SessionOptions(lifetime=LIFETIME))


class Sent(list[str]):
    """The commands a client sends (a script is one: EVALSHA), recorded in order."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        send = client.execute_command

        def recorded(*args: Any, **options: Any) -> Any:
            self.append(str(args[0]).upper())
            return send(*args, **options)

        monkeypatch.setattr(client, "execute_command", recorded)


def fields(store: RedisStore, manager: SessionManager, sid: str) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = store.client.hgetall(store.redis_key(manager.store_key(sid)))
    return found


def warm_up(manager: SessionManager) -> None:
    """A merge on a session of its own: the server has the scripts afterwards (a
    script's first use on a server adds NOSCRIPT and SCRIPT LOAD)."""
    warm = manager.open([new_session(manager, a=1)])
    warm["a"] = 2
    assert manager.finish(warm, 200).plan is Plan.MERGE


def new_session(manager: SessionManager, **data: Any) -> str:
    s = manager.open([])
    s.update(data)
    assert manager.finish(s, 200).plan is Plan.WHOLE
    return s.id


def test_a_session_is_a_hash_with_a_field_per_key(store: RedisStore, manager: SessionManager) -> None:
    sid = new_session(manager, a=1, b=[1, "x"])
    stored = fields(store, manager, sid)
    assert {k for k in stored if k.startswith(b"d:")} == {b"d:a", b"d:b"}
    assert orjson.loads(stored[b"d:b"]) == [1, "x"]
    assert float(stored[b"e"]) == pytest.approx(_session.now() + LIFETIME, abs=5)
    pttl = store.client.pttl(store.redis_key(manager.store_key(sid)))
    assert LIFETIME * 1000 - 5000 < pttl <= LIFETIME * 1000
    assert dict(manager.open([sid])) == {"a": 1, "b": [1, "x"]}


def test_a_load_and_a_merge_are_one_command_each(
    store: RedisStore, manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm_up(manager)
    sid = new_session(manager, a=1, b=2)
    sent = Sent(store.client, monkeypatch)
    s = manager.open([sid])
    s["a"] = 10
    assert sent == ["HGETALL"]  # the load
    del s["b"]
    s["c"] = "new"
    assert manager.finish(s, 200).plan is Plan.MERGE
    assert sent == ["HGETALL", "EVALSHA"]  # the merge: no GET, HGETALL, WATCH or MULTI
    assert dict(manager.open([sid])) == {"a": 10, "c": "new"}


def test_concurrent_requests_changing_different_keys_keep_both(
    store: RedisStore, manager: SessionManager
) -> None:
    sid = new_session(manager, a=1, b=2, keep="k")
    one, two = manager.open([sid]), manager.open([sid])
    one["a"], two["b"] = "one", "two"
    del two["keep"]
    for s in (one, two):
        s.get("a")  # both loaded before either saves
    assert manager.finish(one, 200).plan is Plan.MERGE
    assert manager.finish(two, 200).plan is Plan.MERGE
    assert dict(manager.open([sid])) == {"a": "one", "b": "two"}


def test_a_logout_is_never_undone_by_a_racing_save(store: RedisStore, manager: SessionManager) -> None:
    sid = new_session(manager, user="ann")
    writer, logout = manager.open([sid]), manager.open([sid])
    writer["cart"] = [1]
    logout.invalidate()
    assert manager.finish(logout, 200).plan is Plan.END
    assert manager.finish(writer, 200).plan is Plan.VANISHED
    assert not store.client.exists(store.redis_key(manager.store_key(sid)))
    assert manager.open([sid]).new


def test_a_session_expired_by_its_own_clock_is_not_written(
    store: RedisStore, manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = new_session(manager, a=1)
    s = manager.open([sid])
    s["a"] = 2
    later = _session.now() + LIFETIME + 1
    monkeypatch.setattr(_session, "_clock", lambda: later)
    assert manager.finish(s, 200).plan is Plan.VANISHED
    assert orjson.loads(fields(store, manager, sid)[b"d:a"]) == 1


def test_a_refresh_sets_only_the_expiry(store: RedisStore, manager: SessionManager,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sid = new_session(manager, a=1)
    key = store.redis_key(manager.store_key(sid))
    store.client.pexpire(key, 10_000)
    start = _session.now()
    monkeypatch.setattr(_session, "_clock", lambda: start + LIFETIME * 0.75)  # under the threshold
    s = manager.open([sid])
    assert s["a"] == 1
    assert manager.finish(s, 200).plan is Plan.REFRESH
    assert float(fields(store, manager, sid)[b"e"]) == pytest.approx(start + LIFETIME * 1.75, abs=5)
    assert store.client.pttl(key) > LIFETIME * 1000 - 5000  # one expiry for the whole HASH


def test_flashes_merge_by_id(store: RedisStore, manager: SessionManager) -> None:
    s = manager.open([])
    s.flash("first")
    s.flash("second", "warning")
    manager.finish(s, 200)
    sid = s.id
    reader, writer = manager.open([sid]), manager.open([sid])
    assert reader.get_flashed_messages(category_filter=["message"]) == ["first"]
    writer.flash("third")
    writer.get("x")
    manager.finish(reader, 200)
    manager.finish(writer, 200)
    assert manager.open([sid]).get_flashed_messages(with_categories=True) == [
        ("warning", "second"), ("message", "third")]


def test_a_session_stored_whole_converts_to_a_hash(store: RedisStore, manager: SessionManager) -> None:
    sid = _session.new_session_id()
    key = manager.store_key(sid)
    expires = _session.now() + 600
    store.set(key, {"d": {"a": 1}, "e": expires, "f": [["message", "hi"]]}, expire=600)
    s = manager.open([sid])
    assert dict(s) == {"a": 1}
    rkey = store.redis_key(key)
    assert store.client.type(rkey) == b"hash"
    assert 590_000 < store.client.pttl(rkey) <= 600_000  # it keeps its remaining lifetime
    assert s.get_flashed_messages() == ["hi"]
    s["b"] = 2
    assert manager.finish(s, 200).plan is Plan.MERGE
    again = manager.open([sid])
    assert dict(again) == {"a": 1, "b": 2} and again.get_flashed_messages() == []


@pytest.mark.parametrize("junk", [
    {b"d:a": b"1"},  # no expiry
    {b"e": b"nan", b"d:a": b"1"},
    {b"e": b"soon", b"d:a": b"1"},
    {b"e": b"1e300", b"d:a": b"1"},
    {b"e": b"5", b"d:a": b"1"},  # long past
])
def test_a_hash_of_another_shape_is_no_session(
    store: RedisStore, manager: SessionManager, junk: dict[bytes, bytes]
) -> None:
    sid = _session.new_session_id()
    store.client.hset(store.redis_key(manager.store_key(sid)), mapping=junk)
    s = manager.open([sid])
    assert s.new and dict(s) == {}


def test_an_undecodable_field_is_no_session_and_is_logged(
    store: RedisStore, manager: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    sid = _session.new_session_id()
    rkey = store.redis_key(manager.store_key(sid))
    store.client.hset(rkey, mapping={b"e": repr(_session.now() + 60).encode(), b"d:a": b"{not json"})
    with caplog.at_level(logging.WARNING, "prefork_sessions"):
        s = manager.open([sid])
        assert s.new
    assert "could not be read" in caplog.text and sid not in caplog.text


def test_a_failed_save_writes_nothing(store: RedisStore, manager: SessionManager) -> None:
    sid = new_session(manager, a=1)
    s = manager.open([sid])
    s["a"] = 2
    s["bad"] = {1, 2}  # a set: not JSON
    with pytest.raises(SerializationError):
        manager.finish(s, 200)
    assert dict(manager.open([sid])) == {"a": 1}


def test_many_keys_in_one_save(store: RedisStore, manager: SessionManager) -> None:
    # more fields than one Lua unpack() could take at once
    data = {f"k{i}": i for i in range(5000)}
    sid = new_session(manager, **data)
    s = manager.open([sid])
    for i in range(0, 5000, 2):
        s[f"k{i}"] = -i
    for i in range(1, 5000, 2):
        del s[f"k{i}"]
    assert manager.finish(s, 200).plan is Plan.MERGE
    assert dict(manager.open([sid])) == {f"k{i}": -i for i in range(0, 5000, 2)}


def test_flask_sessions_are_hashes_of_tagged_values(redis_url: str) -> None:
    flask = pytest.importorskip("flask")
    from prefork_sessions.flask import PreforkSessionInterface, init_app

    app = flask.Flask(__name__)
    app.secret_key = "k" * 40
    interface = PreforkSessionInterface(redis_url=redis_url, key_prefix=f"flask{next(_prefixes)}:")
    init_app(app)
    app.session_interface = interface

    @app.get("/set")
    def set_() -> str:
        flask.session["t"] = (1, b"\x00")
        flask.session["n"] = flask.session.get("n", 0) + 1
        return "ok"

    @app.get("/get")
    def get() -> Any:
        return {"t": repr(flask.session["t"]), "n": flask.session["n"]}

    client = app.test_client()
    client.get("/set")
    client.get("/set")
    assert client.get("/get").json == {"t": repr((1, b"\x00")), "n": 2}
    store = interface.store_for(app)
    assert isinstance(store, RedisStore)
    (key,) = [k for k in store if str(k).startswith(interface.key_prefix)]
    stored = store.client.hgetall(store.redis_key(key))
    assert orjson.loads(stored[b"d:n"]) == 2 and b" t" in stored[b"d:t"]  # Flask's tag


def test_sent_records_what_is_sent(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # the recorder above must see commands, or the one-command assertions prove nothing
    sent = Sent(store.client, monkeypatch)
    store.set("x", 1)
    store.get("x")
    assert sent == ["SET", "GET"]


def test_a_key_of_another_type_is_no_session(store: RedisStore, manager: SessionManager) -> None:
    sid = _session.new_session_id()
    store.client.rpush(store.redis_key(manager.store_key(sid)), b"x")
    s = manager.open([sid])
    assert s.new and dict(s) == {}
    s["a"] = 1
    assert manager.finish(s, 200).plan is Plan.WHOLE  # under a fresh id: the list is not touched
    assert s.id != sid and store.client.type(store.redis_key(manager.store_key(sid))) == b"list"


def test_sessions_use_the_client_of_a_reopened_store(
    store: RedisStore, manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm_up(manager)
    sid = new_session(manager, a=1)
    store.close()
    store.reopen()  # a store made from a URL gets a new client
    sent = Sent(store.client, monkeypatch)
    s = manager.open([sid])
    s["a"] = 2
    assert manager.finish(s, 200).plan is Plan.MERGE
    assert sent == ["HGETALL", "EVALSHA"]
    assert dict(manager.open([sid])) == {"a": 2}


def test_store_calls_on_a_session_hash_raise_our_error(store: RedisStore, manager: SessionManager) -> None:
    sid = new_session(manager, a=1)
    key = manager.store_key(sid)
    for call in (lambda: store.get(key), lambda: store.get_and_set(key, lambda v: v)):
        with pytest.raises(SerializationError, match="another Redis type"):
            call()
    assert dict(manager.open([sid])) == {"a": 1}  # nothing was changed


def test_a_full_redis_raises_no_space_and_keeps_the_session(
    store: RedisStore, manager: SessionManager
) -> None:
    sid = new_session(manager, a=1)
    client = store.client
    used = int(client.info("memory")["used_memory"])
    old = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", max(1, used // 2))  # noeviction (the default): writes refused
    try:
        s = manager.open([sid])
        s["big"] = "x" * 100_000
        with pytest.raises(NoSpaceError, match="maxmemory"):
            manager.finish(s, 200)
    finally:
        client.config_set("maxmemory", old)
    assert dict(manager.open([sid])) == {"a": 1}


@pytest.mark.parametrize("front", ["werkzeug", "flask"])
def test_sessions_moved_from_a_file_by_export_and_import_go_on_in_redis(
    redis_url: str, tmp_path: Any, front: str
) -> None:
    """The migration README describes: sessions made on a file, `prefork-sessions export |
    prefork-sessions import --redis-url`, the same cookies then served from Redis."""
    import subprocess
    import sys

    from werkzeug.test import Client
    from werkzeug.wrappers import Request, Response

    from prefork_sessions import MmapStore, with_session

    prefix = f"moved{next(_prefixes)}:"
    secret = "s" * 40

    def app_on(store: Any) -> Client:
        if front == "flask":
            import flask

            from prefork_sessions.flask import PreforkSessionInterface

            fapp = flask.Flask(__name__)
            fapp.secret_key = secret
            fapp.session_interface = PreforkSessionInterface(store)

            @fapp.get("/")
            def count() -> Any:
                flask.session["n"] = flask.session.get("n", 0) + 1
                flask.session["t"] = (1, 2)  # a tagged value
                return {"n": flask.session["n"]}

            return Client(fapp)

        @with_session(store, secret=secret)
        def app(request: Request) -> Response:
            session = request.session  # type: ignore[attr-defined]
            session["n"] = session.get("n", 0) + 1
            return Response(orjson.dumps({"n": session["n"]}), mimetype="application/json")

        return Client(app)

    path = tmp_path / "sessions"
    file_store = MmapStore(path, cache_size=1 << 20)
    before = app_on(file_store)
    clients = [Client(before.application) for _ in range(3)]
    for c in clients:
        for _ in range(2):
            c.get("/")
    file_store.close()

    def cli(*args: str, stdin: bytes = b"") -> bytes:
        done = subprocess.run([sys.executable, "-m", "prefork_sessions", *args], input=stdin,
                              capture_output=True, timeout=60, check=True)
        return done.stdout

    cli("import", "--redis-url", redis_url, "--prefix", prefix, stdin=cli("export", str(path)))
    store = RedisStore(redis_url, prefix=prefix)
    try:
        after = app_on(store)
        for c in clients:
            c.application = after.application
            assert orjson.loads(c.get("/").get_data()) == {"n": 3}  # the same session, in Redis
        assert {store.client.type(store.redis_key(k)) for k in store} == {b"hash"}
    finally:
        store.clear()
        store.close()
