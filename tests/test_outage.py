"""A Redis that goes away: StoreUnavailableError from every call, 503 + Retry-After from
the WSGI layer, and service resuming by itself when the server is back (a real
redis-server, stopped and started again on the same port)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from prefork_sessions import (
    RedisStore,
    SessionMiddleware,
    SessionStoreError,
    StoreUnavailableError,
    with_session,
)
from prefork_sessions._redis import DEFAULT_SOCKET_TIMEOUT
from prefork_sessions._wsgi import ENVIRON_KEY, RETRY_AFTER


class Server:
    """A redis-server on a fixed loopback port that the test stops and starts."""

    def __init__(self, work: Path) -> None:
        self.work = work
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (apt-get install redis-server; .ci/run does)"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.work), "--logfile", str(self.work / "log")],
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                assert self.proc.poll() is None, f"redis-server exited: see {self.work / 'log'}"
                assert time.monotonic() < deadline, "redis-server did not answer within 20 s"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_every_call_raises_store_unavailable_when_redis_is_gone(server: Server) -> None:
    store = RedisStore(server.url, prefix="t:", socket_timeout=0.5)
    store.set("k", 1)
    server.stop()
    calls = {
        "get": lambda: store.get("k"),
        "set": lambda: store.set("k", 2),
        "delete": lambda: store.delete("k"),
        "contains": lambda: "k" in store,
        "get_and_set": lambda: store.get_and_set("k", lambda v: v),
        "add": lambda: store.add("n", 1),
        "touch": lambda: store.touch("k", 10),
        "ttl": lambda: store.ttl("k"),
        "keys": lambda: store.keys(),
        "len": lambda: len(store),
        "clear": lambda: store.clear(),
        "stats": lambda: store.stats(),
    }
    for name, call in calls.items():
        with pytest.raises(StoreUnavailableError) as err:
            call()
        e = err.value
        assert isinstance(e, ConnectionError) and isinstance(e, SessionStoreError), name
        assert isinstance(e.__cause__, redis.RedisError), name  # redis-py's, chained
        assert f"127.0.0.1:{server.port}" in str(e) and "redis-server is running" in str(e)
    assert store.check() and "unavailable" in store.check()[0]
    server.start()
    assert store.get("k") is None  # back, empty (no persistence): the store reconnected
    store.set("k", 3)
    assert store.get("k") == 3 and store.check() == []


def test_a_server_that_accepts_but_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as silent:  # the kernel completes connects; nobody ever reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        store = RedisStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=0.2)
        with pytest.raises(StoreUnavailableError, match="TimeoutError"):
            store.get("k")


def test_the_default_socket_timeout_is_bounded_and_the_password_is_never_shown() -> None:
    store = RedisStore("redis://:s3cret-pass@127.0.0.1:1/0")  # nothing listens on port 1
    assert store.socket_timeout == DEFAULT_SOCKET_TIMEOUT > 0
    with pytest.raises(StoreUnavailableError) as err:
        store.get("k")
    assert "s3cret-pass" not in str(err.value) and "127.0.0.1:1" in str(err.value)


def counter_app(store: RedisStore) -> Client:
    @with_session(store)
    def app(request: Request) -> Response:
        session = request.session  # type: ignore[attr-defined]
        session["n"] = session.get("n", 0) + 1
        return Response(orjson.dumps({"n": session["n"]}), mimetype="application/json")

    return Client(app)


def middleware_app(store: RedisStore) -> Client:
    def inner(environ: dict[str, object], start_response: object) -> list[bytes]:
        session = environ[ENVIRON_KEY]
        session["n"] = session.get("n", 0) + 1  # type: ignore[attr-defined]
        body = orjson.dumps({"n": session["n"]})  # type: ignore[index]
        start_response("200 OK", [("Content-Type", "application/json")])  # type: ignore[operator]
        return [body]

    return Client(SessionMiddleware(inner, store))  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [counter_app, middleware_app], ids=["with_session", "middleware"])
def test_the_wsgi_layer_answers_503_and_recovers(server: Server, make: object) -> None:
    store = RedisStore(server.url, prefix="s:", socket_timeout=0.5)
    client = make(store)  # type: ignore[operator]
    assert [client.get("/").json["n"] for _ in range(2)] == [1, 2]
    server.stop()
    down = client.get("/")
    assert down.status_code == 503 and down.headers["Retry-After"] == str(RETRY_AFTER)
    assert "Set-Cookie" not in down.headers  # the browser keeps its session cookie
    server.start()  # an empty server (no persistence): the old session is gone
    assert [client.get("/").json["n"] for _ in range(2)] == [1, 2]  # service resumed by itself


def test_a_save_that_cannot_reach_redis_answers_503(server: Server) -> None:
    store = RedisStore(server.url, prefix="s:", socket_timeout=0.5)

    @with_session(store)
    def app(request: Request) -> Response:
        request.session["n"] = 1  # type: ignore[attr-defined]
        server.stop()  # the load is done (a new session loads nothing); the save will fail
        return Response(b"ok")

    response = Client(app).get("/")
    assert response.status_code == 503 and response.headers["Retry-After"] == str(RETRY_AFTER)
    assert "Set-Cookie" not in response.headers


def test_flask_answers_503_and_recovers(server: Server) -> None:
    import flask

    from prefork_sessions.flask import init_app

    store = RedisStore(server.url, prefix="f:", socket_timeout=0.5)
    app = flask.Flask(__name__)
    app.config.update(SECRET_KEY="k" * 32)
    init_app(app, store)

    @app.get("/")
    def count() -> dict[str, int]:
        flask.session["n"] = flask.session.get("n", 0) + 1
        return {"n": flask.session["n"]}

    client = app.test_client()
    assert [client.get("/").json["n"] for _ in range(2)] == [1, 2]  # type: ignore[index]
    server.stop()
    for who in (client, app.test_client()):  # the load fails; a new session's save fails
        down = who.get("/")
        assert down.status_code == 503 and down.headers["Retry-After"] == str(RETRY_AFTER)
        assert "Set-Cookie" not in down.headers
    server.start()
    assert [client.get("/").json["n"] for _ in range(2)] == [1, 2]  # type: ignore[index]


def test_an_app_that_catches_the_failed_load_gets_its_own_response(server: Server) -> None:
    """A load that failed leaves the session unloaded: nothing to save, no half-made
    session (the save used to fail on it with AttributeError)."""
    store = RedisStore(server.url, prefix="c:", socket_timeout=0.5)

    @with_session(store)
    def app(request: Request) -> Response:
        session = request.session  # type: ignore[attr-defined]
        try:
            session["n"] = session.get("n", 0) + 1
        except StoreUnavailableError:
            return Response(b"degraded", status=200)
        return Response(b"ok")

    client = Client(app)
    assert client.get("/").text == "ok"
    server.stop()
    response = client.get("/")
    assert response.status_code == 200 and response.text == "degraded"
    assert "Set-Cookie" not in response.headers
