"""The Flask adapter through Flask's own test client, on a real MmapStore file and a
real redis-server: Flask's own session tests (ported from Flask 3.1's
tests/test_basic.py, test_testing.py, test_reqctx.py and test_helpers.py, BSD-3-Clause,
marked "Flask:"), then what the adapter promises beyond them."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import flask
import pytest
from flask.globals import request_ctx
from flask.sessions import SecureCookieSessionInterface
from flask.testing import FlaskClient
from markupsafe import Markup
from werkzeug.http import parse_date

from prefork_sessions import InvalidArgumentError, MmapStore, RedisStore, _session
from prefork_sessions.flask import (
    EXTENSION_KEY,
    REFRESH_INTERVAL,
    PreforkSession,
    PreforkSessionInterface,
    default_store_path,
    init_app,
)

HERE = os.path.dirname(__file__)


class Recording:
    """A real store that also records which of its methods the session layer called."""

    def __init__(self, store: Any) -> None:
        self.store, self.calls = store, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name in ("get", "set", "delete", "get_and_set"):
            self.calls.append(name)
        return attr


class Clock:
    """Session time, moved by hand (the store's own clock is left alone)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["mmap", "redis"])
def real_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    if request.param == "mmap":
        store: Any = MmapStore(tmp_path / "sessions", cache_size=1 << 20, page_size=16 << 10)
        yield store
        store.close()
    else:
        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, prefix=f"test-flask-{uuid.uuid4().hex}:")
        yield store
        store.clear()
        store.close()


@pytest.fixture
def store(real_store: Any) -> Recording:
    return Recording(real_store)


@pytest.fixture
def app(store: Recording) -> flask.Flask:
    app = flask.Flask("flask_test", root_path=HERE)
    app.config.update(TESTING=True, SECRET_KEY="test key")
    app.session_interface = PreforkSessionInterface(store)  # type: ignore[arg-type]
    return app


@pytest.fixture
def client(app: flask.Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(1_800_000_000.0)
    monkeypatch.setattr(_session, "_clock", c)
    return c


def cookie_of(client: FlaskClient, name: str = "session") -> str | None:
    cookie = client.get_cookie(name)
    return None if cookie is None else cookie.value


def sid_of(client: FlaskClient) -> str:
    value = cookie_of(client)
    assert value is not None
    return value[:43]


def store_key(sid: str) -> str:
    return "session:" + hashlib.sha256(sid.encode()).hexdigest()


# -- Flask's own session tests ---------------------------------------------------------


def test_session_accessed(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: accessed and modified as the request context sees them; Vary only when used."""

    @app.post("/")
    def do_set() -> str:
        flask.session["value"] = flask.request.form["value"]
        return "value set"

    @app.get("/")
    def do_get() -> str:
        return str(flask.session.get("value", "None"))

    @app.get("/nothing")
    def do_nothing() -> str:
        return ""

    with client:
        rv = client.get("/nothing")
        assert "cookie" not in rv.vary
        assert not request_ctx._session.accessed
        assert not request_ctx._session.modified

    with client:
        rv = client.post(data={"value": "42"})
        assert rv.text == "value set"
        assert "cookie" in rv.vary
        assert request_ctx._session.accessed
        assert request_ctx._session.modified

    with client:
        rv = client.get()
        assert rv.text == "42"
        assert "cookie" in rv.vary
        assert request_ctx._session.accessed
        assert not request_ctx._session.modified

    with client:
        rv = client.get("/nothing")
        assert rv.text == ""
        assert "cookie" not in rv.vary
        assert not request_ctx._session.accessed
        assert not request_ctx._session.modified


def test_session_path(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: the cookie's path falls back to APPLICATION_ROOT."""
    app.config.update(APPLICATION_ROOT="/foo")

    @app.route("/")
    def index() -> str:
        flask.session["testing"] = 42
        return "Hello World"

    rv = client.get("/", "http://example.com:8080/foo")
    assert "path=/foo" in rv.headers["set-cookie"].lower()


def test_session_using_application_root(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: APPLICATION_ROOT behind a prefix middleware."""

    class PrefixPathMiddleware:
        def __init__(self, app: Any, prefix: str) -> None:
            self.app, self.prefix = app, prefix

        def __call__(self, environ: Any, start_response: Any) -> Any:
            environ["SCRIPT_NAME"] = self.prefix
            return self.app(environ, start_response)

    app.wsgi_app = PrefixPathMiddleware(app.wsgi_app, "/bar")  # type: ignore[method-assign]
    app.config.update(APPLICATION_ROOT="/bar")

    @app.route("/")
    def index() -> str:
        flask.session["testing"] = 42
        return "Hello World"

    rv = client.get("/", "http://example.com:8080/")
    assert "path=/bar" in rv.headers["set-cookie"].lower()


def test_session_using_session_settings(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: every SESSION_COOKIE_* setting, on setting and on deleting the cookie."""
    app.config.update(
        SERVER_NAME="www.example.com:8080",
        APPLICATION_ROOT="/test",
        SESSION_COOKIE_DOMAIN=".example.com",
        SESSION_COOKIE_HTTPONLY=False,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_PARTITIONED=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/",
    )

    @app.route("/")
    def index() -> str:
        flask.session["testing"] = 42
        return "Hello World"

    @app.route("/clear")
    def clear() -> str:
        flask.session.pop("testing", None)
        return "Goodbye World"

    rv = client.get("/", "http://www.example.com:8080/test/")
    cookie = rv.headers["set-cookie"].lower()
    assert "domain=example.com" in cookie or "domain=.example.com" in cookie
    assert "path=/" in cookie
    assert "secure" in cookie
    assert "httponly" not in cookie
    assert "samesite" in cookie
    assert "partitioned" in cookie

    rv = client.get("/clear", "http://www.example.com:8080/test/")
    cookie = rv.headers["set-cookie"].lower()
    assert "session=;" in cookie
    assert "domain=example.com" in cookie or "domain=.example.com" in cookie
    assert "path=/" in cookie
    assert "secure" in cookie
    assert "samesite" in cookie
    assert "partitioned" in cookie


def test_session_using_samesite_attribute(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: SESSION_COOKIE_SAMESITE, and a ValueError for a bad one."""

    @app.route("/")
    def index() -> str:
        flask.session["testing"] = 42
        return "Hello World"

    app.config.update(SESSION_COOKIE_SAMESITE="invalid")
    with pytest.raises(ValueError):
        client.get("/")

    app.config.update(SESSION_COOKIE_SAMESITE=None)
    rv = client.get("/")
    assert "samesite" not in rv.headers["set-cookie"].lower()

    app.config.update(SESSION_COOKIE_SAMESITE="Strict")
    rv = client.get("/")
    assert "samesite=strict" in rv.headers["set-cookie"].lower()

    app.config.update(SESSION_COOKIE_SAMESITE="Lax")
    rv = client.get("/")
    assert "samesite=lax" in rv.headers["set-cookie"].lower()


def test_missing_session(app: flask.Flask, store: Recording) -> None:
    """Flask: without a secret key the session is a NullSession that refuses writes."""
    app.secret_key = None

    def expect_exception(f: Callable[..., Any], *args: Any) -> None:
        e = pytest.raises(RuntimeError, f, *args)
        assert e.value.args and "session is unavailable" in e.value.args[0]

    with app.test_request_context():
        assert flask.session.get("missing_key") is None
        expect_exception(flask.session.__setitem__, "foo", 42)
        expect_exception(flask.session.pop, "foo")
    assert store.calls == []


def test_session_secret_key_fallbacks(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: a new SECRET_KEY ends sessions; SECRET_KEY_FALLBACKS keeps them valid."""

    @app.post("/")
    def set_session() -> str:
        flask.session["a"] = 1
        return ""

    @app.get("/")
    def get_session() -> dict[str, Any]:
        return dict(flask.session)

    app.secret_key, app.config["SECRET_KEY_FALLBACKS"] = ("0 key", ["-1 key", "-2 key"])
    client.post()
    assert client.get().json == {"a": 1}
    app.secret_key = "? key"
    assert client.get().json == {}
    app.secret_key, app.config["SECRET_KEY_FALLBACKS"] = ("+1 key", ["0 key", "-1 key"])
    assert client.get().json == {"a": 1}


def test_session_expiration(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: a permanent session's cookie expires after PERMANENT_SESSION_LIFETIME;
    a non-permanent one's is a browser-session cookie."""
    permanent = True

    @app.route("/")
    def index() -> str:
        flask.session["test"] = 42
        flask.session.permanent = permanent
        return ""

    @app.route("/test")
    def test() -> str:
        return str(flask.session.permanent)

    rv = client.get("/")
    assert "set-cookie" in rv.headers
    match = re.search(r"(?i)\bexpires=([^;]+)", rv.headers["set-cookie"])
    assert match is not None
    expires = parse_date(match.group())
    assert expires is not None
    expected = datetime.now(UTC) + app.permanent_session_lifetime
    assert (expires.year, expires.month, expires.day) == (
        expected.year, expected.month, expected.day
    )

    rv = client.get("/test")
    assert rv.data == b"True"

    permanent = False
    rv = client.get("/")
    assert "set-cookie" in rv.headers
    assert re.search(r"(?i)\bexpires=([^;]+)", rv.headers["set-cookie"]) is None
    assert "max-age" not in rv.headers["set-cookie"].lower()


def test_session_stored_last(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: changes made in after_request are saved."""

    @app.after_request
    def modify_session(response: flask.Response) -> flask.Response:
        flask.session["foo"] = 42
        return response

    @app.route("/")
    def dump_session_contents() -> str:
        return repr(flask.session.get("foo"))

    assert client.get("/").data == b"None"
    assert client.get("/").data == b"42"


SPECIAL_NOW = datetime.now(UTC).replace(microsecond=0)
SPECIAL_UUID = uuid.uuid4()
SPECIAL = {
    "t": (1, 2, 3),
    "b": b"\xff",
    "m": Markup("<html>"),
    "u": SPECIAL_UUID,
    "d": SPECIAL_NOW,
    "t_tag": {" t": "not-a-tuple"},
    "di_t_tag": {" t__": "not-a-tuple"},
    "di_tag": {" di": "not-a-dict"},
    "nested": {"list": [(1, b"x"), {"u": SPECIAL_UUID}], "n": None},
}


def test_session_special_types(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: tagged types; here also read back by a later request, from the store."""

    @app.route("/")
    def dump_session_contents() -> Any:
        for key, value in SPECIAL.items():
            flask.session[key] = value
        return "", 204

    @app.route("/read")
    def read() -> Any:
        got = {key: flask.session[key] for key in SPECIAL}
        assert got == SPECIAL
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in SPECIAL.items()}
        assert type(got["nested"]["list"][0]) is tuple
        return "", 204

    with client:
        client.get("/")
        s = flask.session
        assert s["t"] == (1, 2, 3)
        assert type(s["b"]) is bytes
        assert type(s["m"]) is Markup
        assert s["u"] == SPECIAL_UUID
        assert s["d"] == SPECIAL_NOW
    assert client.get("/read").status_code == 204


def test_session_cookie_setting(app: flask.Flask) -> None:
    """Flask: which responses carry the cookie, by permanence and SESSION_REFRESH_EACH_REQUEST."""
    is_permanent = True

    @app.route("/bump")
    def bump() -> str:
        rv = flask.session["foo"] = flask.session.get("foo", 0) + 1
        flask.session.permanent = is_permanent
        return str(rv)

    @app.route("/read")
    def read() -> str:
        return str(flask.session.get("foo", 0))

    def run_test(expect_header: bool) -> None:
        with app.test_client() as c:
            assert c.get("/bump").data == b"1"
            assert c.get("/bump").data == b"2"
            assert c.get("/bump").data == b"3"
            rv = c.get("/read")
            assert (rv.headers.get("set-cookie") is not None) == expect_header
            assert rv.data == b"3"

    for is_permanent, refresh, expect in [
        (True, True, True), (True, False, False), (False, True, False), (False, False, False)
    ]:
        app.config["SESSION_REFRESH_EACH_REQUEST"] = refresh
        run_test(expect_header=expect)


def test_session_vary_cookie(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: one Vary header, merged with the app's own."""

    @app.route("/set")
    def set_session() -> str:
        flask.session["test"] = "test"
        return ""

    @app.route("/get")
    def get() -> Any:
        return flask.session.get("test")

    @app.route("/getitem")
    def getitem() -> Any:
        return flask.session["test"]

    @app.route("/setdefault")
    def setdefault() -> Any:
        return flask.session.setdefault("test", "default")

    @app.route("/clear")
    def clear() -> str:
        flask.session.clear()
        return ""

    @app.route("/vary-cookie-header-set")
    def vary_cookie_header_set() -> flask.Response:
        response = flask.Response()
        response.vary.add("Cookie")
        flask.session["test"] = "test"
        return response

    @app.route("/vary-header-set")
    def vary_header_set() -> flask.Response:
        response = flask.Response()
        response.vary.update(("Accept-Encoding", "Accept-Language"))
        flask.session["test"] = "test"
        return response

    @app.route("/no-vary-header")
    def no_vary_header() -> str:
        return ""

    def expect(path: str, header_value: str | None = "Cookie") -> None:
        rv = client.get(path)
        if header_value:
            assert len(rv.headers.get_all("Vary")) == 1
            assert rv.headers["Vary"] == header_value
        else:
            assert "Vary" not in rv.headers

    expect("/set")
    expect("/get")
    expect("/getitem")
    expect("/setdefault")
    expect("/clear")
    expect("/vary-cookie-header-set")
    expect("/vary-header-set", "Accept-Encoding, Accept-Language, Cookie")
    expect("/no-vary-header", None)


def test_session_refresh_vary(app: flask.Flask, client: FlaskClient, store: Recording) -> None:
    """Flask: a permanent, refreshed session varies by cookie even where unused (here
    without a store access or a cookie: see rule 4 of prefork_sessions.flask)."""

    @app.get("/login")
    def login() -> str:
        flask.session["user_id"] = 1
        flask.session.permanent = True
        return ""

    @app.get("/ignored")
    def ignored() -> str:
        return ""

    rv = client.get("/login")
    assert rv.headers["Vary"] == "Cookie"
    del store.calls[:]
    rv = client.get("/ignored")
    assert rv.headers["Vary"] == "Cookie"
    assert "set-cookie" not in rv.headers
    assert store.calls == []


def test_flashes(app: flask.Flask) -> None:
    """Flask: flashing marks the session modified."""
    with app.test_request_context():
        assert not flask.session.modified
        flask.flash("Zap")
        flask.session.modified = False
        flask.flash("Zip")
        assert flask.session.modified
        assert list(flask.get_flashed_messages()) == ["Zap", "Zip"]


def test_extended_flashing(app: flask.Flask) -> None:
    """Flask: categories and filters of flashed messages, across requests."""

    @app.route("/")
    def index() -> str:
        flask.flash("Hello World")
        flask.flash("Hello World", "error")
        flask.flash(Markup("<em>Testing</em>"), "warning")
        return ""

    @app.route("/test/")
    def test() -> str:
        messages = flask.get_flashed_messages()
        assert list(messages) == ["Hello World", "Hello World", Markup("<em>Testing</em>")]
        return ""

    @app.route("/test_with_categories/")
    def test_with_categories() -> str:
        messages = flask.get_flashed_messages(with_categories=True)
        assert list(messages) == [
            ("message", "Hello World"),
            ("error", "Hello World"),
            ("warning", Markup("<em>Testing</em>")),
        ]
        return ""

    @app.route("/test_filter/")
    def test_filter() -> str:
        messages = flask.get_flashed_messages(category_filter=["message"], with_categories=True)
        assert list(messages) == [("message", "Hello World")]
        return ""

    @app.route("/test_filters/")
    def test_filters() -> str:
        messages = flask.get_flashed_messages(
            category_filter=["message", "warning"], with_categories=True
        )
        assert list(messages) == [("message", "Hello World"), ("warning", Markup("<em>Testing</em>"))]
        return ""

    @app.route("/test_filters_without_returning_categories/")
    def test_filters2() -> str:
        messages = flask.get_flashed_messages(category_filter=["message", "warning"])
        assert list(messages) == ["Hello World", Markup("<em>Testing</em>")]
        return ""

    @app.route("/left")
    def left() -> Any:
        return [str(m) for m in flask.get_flashed_messages()]

    for path in ["/test/", "/test_with_categories/", "/test_filter/", "/test_filters/",
                 "/test_filters_without_returning_categories/"]:
        client = app.test_client()  # a fresh client: no messages left from before
        client.get("/")
        assert client.get(path).status_code == 200  # the view's asserts raise under TESTING
    # Flask's get_flashed_messages takes every message out of the session, filtered or not
    assert client.get("/left").json == []


def test_session_transactions(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: session_transaction() reads and writes the client's session."""

    @app.route("/")
    def index() -> str:
        return str(flask.session["foo"])

    with client:
        with client.session_transaction() as sess:
            assert len(sess) == 0
            sess["foo"] = [42]
            assert len(sess) == 1
        rv = client.get("/")
        assert rv.data == b"[42]"
        with client.session_transaction() as sess:
            assert len(sess) == 1
            assert sess["foo"] == [42]
            sess["foo"].append(43)  # changed in place: saved all the same
        assert client.get("/").data == b"[42, 43]"


def test_session_transactions_no_null_sessions(store: Recording) -> None:
    """Flask: no secret key, no session transaction."""
    app = flask.Flask(__name__)
    app.session_interface = PreforkSessionInterface(store)  # type: ignore[arg-type]
    with app.test_client() as c:
        with pytest.raises(RuntimeError) as e, c.session_transaction():
            pass
        assert "Session backend did not open a session" in str(e.value)


def test_session_transactions_keep_context(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: a session transaction leaves the current request context alone."""
    with app.test_request_context():
        client.get("/")
        req = flask.request._get_current_object()  # type: ignore[attr-defined]
        assert req is not None
        with client.session_transaction():
            assert req is flask.request._get_current_object()  # type: ignore[attr-defined]


def test_session_transaction_needs_cookies(app: flask.Flask) -> None:
    """Flask: a client without cookies has no session to transact."""
    c = app.test_client(use_cookies=False)
    with pytest.raises(TypeError, match="Cookies are disabled."), c.session_transaction():
        pass


def test_redirect_session(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: the session follows redirects."""

    @app.route("/redirect")
    def index() -> Any:
        flask.session["redirect"] = True
        return flask.redirect("/target")

    @app.route("/target")
    def get_session() -> str:
        flask.session["target"] = True
        return ""

    with app.app_context(), client:
        client.get("/redirect", follow_redirects=True)
        assert flask.session["redirect"] is True
        assert flask.session["target"] is True


def test_session_dynamic_cookie_name(store: Recording) -> None:
    """Flask: an interface subclass may name the cookie per request."""

    class PathAwareSessionInterface(PreforkSessionInterface):
        def get_cookie_name(self, app: flask.Flask) -> str:
            if flask.request.url.endswith("dynamic_cookie"):
                return "dynamic_cookie_name"
            return super().get_cookie_name(app)

    app = flask.Flask(__name__)
    app.secret_key = "secret_key"
    app.session_interface = PathAwareSessionInterface(store)  # type: ignore[arg-type]

    @app.route("/set", methods=["POST"])
    @app.route("/set_dynamic_cookie", methods=["POST"])
    def set() -> str:
        flask.session["value"] = flask.request.form["value"]
        return "value set"

    @app.route("/get")
    @app.route("/get_dynamic_cookie")
    def get() -> str:
        return str(flask.session.get("value", "None"))

    c = app.test_client()
    assert c.post("/set", data={"value": "42"}).data == b"value set"
    assert c.post("/set_dynamic_cookie", data={"value": "616"}).data == b"value set"
    assert c.get("/get").data == b"42"
    assert c.get("/get_dynamic_cookie").data == b"616"


def test_stream_keeps_session(app: flask.Flask, client: FlaskClient) -> None:
    """Flask: a streamed body still sees the session."""

    @app.route("/")
    def index() -> flask.Response:
        flask.session["test"] = "flask"

        @flask.stream_with_context
        def gen() -> Iterator[str]:
            yield flask.session["test"]

        return flask.Response(gen())

    assert client.get("/").data == b"flask"


# -- what the adapter promises beyond Flask's tests -------------------------------------


def counter_app(app: flask.Flask) -> flask.Flask:
    @app.route("/bump")
    def bump() -> Any:
        flask.session["n"] = flask.session.get("n", 0) + 1
        return {"n": flask.session["n"]}

    @app.route("/read")
    def read() -> Any:
        return dict(flask.session)

    @app.route("/nothing")
    def nothing() -> str:
        return ""

    @app.route("/login")
    def login() -> str:
        flask.session.clear()
        flask.session["user"] = "ann"
        flask.session.permanent = True
        return ""

    @app.route("/logout")
    def logout() -> str:
        flask.session.clear()
        return ""

    return app


def test_untouched_session_costs_no_store_access(app: flask.Flask, store: Recording) -> None:
    client = counter_app(app).test_client()
    client.get("/bump")
    del store.calls[:]
    rv = client.get("/nothing")
    assert store.calls == []
    assert "set-cookie" not in rv.headers and "Vary" not in rv.headers


def test_forged_or_foreign_cookie_is_ignored_before_the_store(
    app: flask.Flask, store: Recording
) -> None:
    client = counter_app(app).test_client()
    client.get("/bump")
    good = cookie_of(client)
    assert good is not None and len(good) == 67 and good[43:45] == ".s"
    sid = good[:43]
    forged = [
        sid,  # the bare id, as a store reader might guess from nothing
        sid + ".s" + "A" * 22,  # a made-up tag
        good[:-1] + ("A" if good[-1] != "A" else "B"),  # one character changed
        sid + ".p" + good[45:],  # permanence flipped without re-signing
        store_key(sid),  # the store key
    ]
    for value in forged:
        del store.calls[:]
        c = app.test_client()
        c.set_cookie("session", value)
        assert c.get("/read").json == {}
        assert store.calls == [], value  # rejected before any lookup
    c = app.test_client()
    c.set_cookie("session", good)
    assert c.get("/read").json == {"n": 1}


def test_a_new_secret_ends_sessions_and_fallback_cookies_are_resigned(
    app: flask.Flask,
) -> None:
    client = counter_app(app).test_client()
    app.secret_key = "old key"
    client.get("/bump")
    old_cookie = cookie_of(client)
    app.secret_key, app.config["SECRET_KEY_FALLBACKS"] = "new key", ["old key"]
    rv = client.get("/read")  # read only: the cookie is re-signed all the same
    assert rv.json == {"n": 1}
    new_cookie = cookie_of(client)
    assert new_cookie is not None and new_cookie != old_cookie
    assert new_cookie[:43] == old_cookie[:43]  # type: ignore[index]
    app.config["SECRET_KEY_FALLBACKS"] = []
    assert client.get("/bump").json == {"n": 2}  # the re-signed cookie outlives the fallback
    stale = app.test_client()
    stale.set_cookie("session", old_cookie)  # type: ignore[arg-type]
    assert stale.get("/read").json == {}


def test_one_interface_serves_several_apps_by_their_own_config(store: Recording) -> None:
    interface = PreforkSessionInterface(store)  # type: ignore[arg-type]
    apps = []
    for name, cookie in [("one", "one_session"), ("two", "two_session")]:
        a = flask.Flask(name, root_path=HERE)
        a.config.update(TESTING=True, SECRET_KEY=f"{name} key", SESSION_COOKIE_NAME=cookie)
        a.session_interface = interface
        apps.append(counter_app(a))
    one, two = (a.test_client() for a in apps)
    assert one.get("/bump").json == {"n": 1}
    assert one.get("/bump").json == {"n": 2}
    assert two.get("/bump").json == {"n": 1}
    assert cookie_of(one, "one_session") and cookie_of(two, "two_session")
    assert cookie_of(one) is None
    # app two's cookie in app one's name: another secret, so not honoured
    cross = apps[0].test_client()
    cross.set_cookie("one_session", cookie_of(two, "two_session"))  # type: ignore[arg-type]
    assert cross.get("/read").json == {}


def test_browser_session_cookie_with_a_server_side_lifetime(
    app: flask.Flask, clock: Clock
) -> None:
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(hours=1)
    client = counter_app(app).test_client()
    rv = client.get("/bump")
    cookie = rv.headers["set-cookie"].lower()
    assert "expires" not in cookie and "max-age" not in cookie
    clock.now += 3599
    assert client.get("/bump").json == {"n": 2}  # a change restarts the lifetime
    clock.now += 3599
    rv = client.get("/read")  # a use restarts it too (SESSION_REFRESH_EACH_REQUEST)...
    assert rv.json == {"n": 2}
    assert "set-cookie" not in rv.headers  # ...with nothing to tell the browser
    clock.now += 3599
    assert client.get("/read").json == {"n": 2}
    clock.now += 3601
    assert client.get("/read").json == {}
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False  # the lifetime counts from changes
    client.get("/bump")
    clock.now += 3599
    assert client.get("/read").json == {"n": 1}
    clock.now += 2
    assert client.get("/read").json == {}


def test_permanent_cookie_matches_the_stored_expiry(
    app: flask.Flask, client: FlaskClient, store: Recording, clock: Clock
) -> None:
    app.config["PERMANENT_SESSION_LIFETIME"] = 3600
    counter_app(app)
    rv = client.get("/login")
    assert "max-age=3600" in rv.headers["set-cookie"].lower()
    sid = sid_of(client)
    assert store.store.get(store_key(sid))["e"] == clock.now + 3600
    # SESSION_REFRESH_EACH_REQUEST (default): every use re-sends the cookie, with the
    # stored expiry; the store is written only once the expiry is REFRESH_INTERVAL old.
    clock.now += REFRESH_INTERVAL - 1
    del store.calls[:]
    rv = client.get("/read")
    assert "max-age=3541" in rv.headers["set-cookie"].lower()
    assert store.calls == ["get"]
    clock.now += 2
    rv = client.get("/read")
    assert "max-age=3600" in rv.headers["set-cookie"].lower()
    assert store.calls == ["get", "get", "get_and_set"]
    assert store.store.get(store_key(sid))["e"] == clock.now + 3600
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False
    clock.now += 1000
    del store.calls[:]
    rv = client.get("/read")
    assert "set-cookie" not in rv.headers and store.calls == ["get"]
    clock.now += 2601
    assert client.get("/read").json == {}  # a fixed lifetime from the last change


def run_together(app: flask.Flask, cookie: str, paths: list[str]) -> list[Any]:
    """Run requests of one user at once: each loads the session, then all wait until
    every one has, then each makes its change and saves."""
    barrier = threading.Barrier(len(paths))
    app.config["BARRIER"] = barrier
    results: list[Any] = [None] * len(paths)

    def run(index: int) -> None:
        c = app.test_client()
        c.set_cookie("session", cookie)
        rv = c.get(paths[index])
        results[index] = (rv.status_code, rv.headers.get("set-cookie"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def merge_app(app: flask.Flask) -> flask.Flask:
    @app.route("/set/<key>")
    def set_key(key: str) -> str:
        assert "user" in flask.session  # loaded
        app.config["BARRIER"].wait(30)
        flask.session[key] = True
        return ""

    @app.route("/pop/<key>")
    def pop_key(key: str) -> str:
        assert "user" in flask.session
        app.config["BARRIER"].wait(30)
        flask.session.pop(key)
        return ""

    return counter_app(app)


def test_concurrent_requests_changing_different_keys_both_keep_their_change(
    app: flask.Flask,
) -> None:
    client = merge_app(app).test_client()
    client.get("/login")
    cookie = cookie_of(client)
    assert cookie is not None
    results = run_together(app, cookie, ["/set/a", "/set/b", "/pop/_permanent"])
    assert [status for status, _ in results] == [200, 200, 200]
    assert client.get("/read").json == {"user": "ann", "a": True, "b": True}


def test_a_logout_racing_a_write_never_brings_the_session_back(
    app: flask.Flask, store: Recording
) -> None:
    loaded, go = threading.Event(), threading.Event()

    @app.route("/slow-write")
    def slow_write() -> str:
        assert flask.session["user"] == "ann"
        loaded.set()
        go.wait(30)
        flask.session["cart"] = ["book"]
        return ""

    client = merge_app(app).test_client()
    client.get("/login")
    sid = sid_of(client)
    cookie = cookie_of(client)
    assert cookie is not None
    result: list[Any] = []

    def writer() -> None:
        c = app.test_client()
        c.set_cookie("session", cookie)
        result.append(c.get("/slow-write"))

    t = threading.Thread(target=writer)
    t.start()
    assert loaded.wait(30)
    rv = client.get("/logout")  # completes while the write is in flight
    assert "session=;" in rv.headers["set-cookie"]
    go.set()
    t.join(60)
    assert result[0].status_code == 200 and "set-cookie" not in result[0].headers
    assert store.store.get(store_key(sid)) is None
    replay = app.test_client()
    replay.set_cookie("session", cookie)
    assert replay.get("/read").json == {}


def test_emptying_or_clearing_ends_the_stored_session(
    app: flask.Flask, client: FlaskClient, store: Recording
) -> None:
    @app.route("/pop-all")
    def pop_all() -> str:
        for key in list(flask.session):
            flask.session.pop(key)
        return ""

    counter_app(app)
    client.get("/bump")
    sid = sid_of(client)
    rv = client.get("/pop-all")
    assert "session=;" in rv.headers["set-cookie"]
    assert store.store.get(store_key(sid)) is None
    client.get("/bump")
    before = sid_of(client)
    client.get("/login")  # clear() then set: a fresh id, the old one deleted
    after = sid_of(client)
    assert after != before
    assert store.store.get(store_key(before)) is None
    assert client.get("/read").json == {"user": "ann", "_permanent": True}


def test_rotate_keeps_the_data_under_a_fresh_id(
    app: flask.Flask, client: FlaskClient, store: Recording
) -> None:
    @app.route("/rotate")
    def rotate() -> str:
        session = flask.session
        assert isinstance(session, PreforkSession)
        session.rotate()
        return ""

    counter_app(app)
    client.get("/bump")
    old = cookie_of(client)
    client.get("/rotate")
    assert sid_of(client) != old[:43]  # type: ignore[index]
    assert client.get("/read").json == {"n": 1}
    stale = app.test_client()
    stale.set_cookie("session", old)  # type: ignore[arg-type]
    assert stale.get("/read").json == {}


def test_the_store_never_holds_a_usable_id(app: flask.Flask, store: Recording) -> None:
    client = counter_app(app).test_client()
    client.get("/login")
    client.get("/bump")
    sid = sid_of(client)
    real = store.store
    keys = [k if isinstance(k, str) else k.decode() for k in real]
    assert keys == [store_key(sid)]
    if isinstance(real, MmapStore):
        with open(real.path, "rb") as f:
            raw = f.read()
        assert store_key(sid).encode() in raw and sid.encode() not in raw
    # What a reader of the store learns (the key) opens no session.
    c = app.test_client()
    c.set_cookie("session", store_key(sid)[len("session:"):][:67])
    assert c.get("/read").json == {}


def test_in_place_changes_are_saved_without_modified(app: flask.Flask, client: FlaskClient) -> None:
    @app.route("/add/<item>")
    def add(item: str) -> Any:
        flask.session.setdefault("cart", {"items": []})["items"].append(item)
        return flask.session["cart"]

    @app.route("/add-later/<item>")
    def add_later(item: str) -> Any:
        flask.session["cart"]["items"].append(item)  # no assignment, no modified = True
        return ""

    counter_app(app)
    client.get("/add/a")
    client.get("/add-later/b")
    assert client.get("/read").json == {"cart": {"items": ["a", "b"]}}


def test_a_value_the_store_cannot_take_fails_the_request_and_changes_nothing(
    app: flask.Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    @app.route("/bad")
    def bad() -> str:
        flask.session["n"] = 99
        flask.session["s"] = {1, 2}  # a set: no tagged JSON form
        return ""

    counter_app(app)
    client.get("/bump")
    app.testing = False
    rv = client.get("/bad")
    assert rv.status_code == 500
    assert "session not saved" in caplog.text
    assert client.get("/read").json == {"n": 1}


def test_a_stored_value_of_another_shape_is_no_session(
    app: flask.Flask, client: FlaskClient, store: Recording
) -> None:
    counter_app(app)
    client.get("/bump")
    sid = sid_of(client)
    store.store.set(store_key(sid), {"d": {"x": {" b": "not base64!"}}, "e": 4e9, "f": []})
    assert client.get("/read").json == {}
    store.store.set(store_key(sid), [1, 2, 3])
    assert client.get("/read").json == {}


def test_values_are_stored_as_flask_tagged_json(
    app: flask.Flask, client: FlaskClient, store: Recording
) -> None:
    @app.route("/t")
    def t() -> str:
        flask.session["t"] = (1, b"\x00")
        return ""

    client.get("/t")
    stored = store.store.get(store_key(sid_of(client)))
    assert stored["d"] == {"t": {" t": [1, {" b": "AA=="}]}}


# -- init_app and the default store ---------------------------------------------------------


def test_init_app_builds_from_config_and_registers(tmp_path: Any) -> None:
    app = flask.Flask("configured", root_path=HERE)
    app.config.update(
        TESTING=True, SECRET_KEY="k", PREFORK_SESSIONS_PATH=str(tmp_path / "s"),
        PREFORK_SESSIONS_CACHE_SIZE=1 << 20, PREFORK_SESSIONS_KEY_PREFIX="app1:",
    )
    interface = init_app(app)
    assert app.extensions[EXTENSION_KEY] is interface is app.session_interface
    store = interface.store_for(app)
    assert isinstance(store, MmapStore) and store.path == str(tmp_path / "s")
    assert store.cache_size == 1 << 20
    client = counter_app(app).test_client()
    client.get("/bump")
    assert [k.startswith("app1:") for k in store] == [True]  # type: ignore[union-attr]
    # One store object per file per process: a second app on the same file shares it.
    second = flask.Flask("second", root_path=HERE)
    second.config.update(SECRET_KEY="k2", PREFORK_SESSIONS_PATH=str(tmp_path / "s"))
    assert init_app(second).store_for(second) is store


def test_init_app_with_redis_url(redis_url: str) -> None:
    app = flask.Flask("on_redis", root_path=HERE)
    app.config.update(TESTING=True, SECRET_KEY="k", PREFORK_SESSIONS_REDIS_URL=redis_url,
                      PREFORK_SESSIONS_KEY_PREFIX=f"t{uuid.uuid4().hex}:")
    interface = init_app(app)
    assert isinstance(interface.store_for(app), RedisStore)
    client = counter_app(app).test_client()
    assert client.get("/bump").json == {"n": 1}
    assert client.get("/bump").json == {"n": 2}


def test_default_store_path_is_per_app(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = flask.Flask("app", root_path=str(tmp_path / "site_a"))
    b = flask.Flask("app", root_path=str(tmp_path / "site_b"))
    path_a = default_store_path(a)
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/flask_app_[0-9a-f]{12}_session_data", path_a)
    assert path_a != default_store_path(b)
    assert default_store_path(flask.Flask("app", root_path=str(tmp_path / "site_a"))) == path_a
    a.secret_key = "k"
    interface = init_app(a)
    store = interface.store_for(a)
    assert isinstance(store, MmapStore) and store.path == path_a
    assert counter_app(a).test_client().get("/bump").json == {"n": 1}


def test_bad_settings_fail_at_init_app(tmp_path: Any) -> None:
    app = flask.Flask("bad", root_path=HERE)
    app.config.update(SECRET_KEY="k", PREFORK_SESSIONS_PATH=str(tmp_path / "s"),
                      PERMANENT_SESSION_LIFETIME=timedelta(days=500))
    with pytest.raises(InvalidArgumentError, match="PERMANENT_SESSION_LIFETIME"):
        init_app(app)
    with pytest.raises(InvalidArgumentError, match="either store or"):
        PreforkSessionInterface(MmapStore(tmp_path / "x"), path="y")


def test_flask_session_class_is_not_the_cookie_one(app: flask.Flask) -> None:
    # The interface must not fall back to Flask's signed-cookie sessions anywhere.
    assert not isinstance(app.session_interface, SecureCookieSessionInterface)
    with app.test_request_context():
        assert isinstance(flask.session._get_current_object(), PreforkSession)  # type: ignore[attr-defined]


def test_importing_prefork_sessions_does_not_import_flask() -> None:
    code = "import sys, prefork_sessions; sys.exit('flask' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
