"""The session layer against hostile input: any Cookie header, a reader of the store
file, options that would inject cookie attributes, values someone else stored, and a
failing store.  Real MmapStore files (and a real redis-server), requests through
werkzeug's test client or a raw WSGI environ as a server builds it."""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client, EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from prefork_sessions import (
    InvalidArgumentError,
    LockTimeoutError,
    MmapStore,
    RedisStore,
    SessionOptions,
    SessionStoreError,
)
from prefork_sessions._session import (
    MAX_LIFETIME,
    SessionManager,
    is_valid_session_id,
    new_session_id,
)
from prefork_sessions._wsgi import ENVIRON_KEY, SessionMiddleware, SessionRequest, with_session

COOKIE = "session_id"
PREFIX = "session:"
SECRET = "k" * 16 + "-a-test-secret-of-32+bytes"
App = Callable[..., Any]


@pytest.fixture
def store(tmp_path: Any) -> Iterator[MmapStore]:
    s = MmapStore(tmp_path / "sessions", cache_size=1 << 20, page_size=16 << 10)
    yield s
    s.close()


def counter(request: SessionRequest) -> Response:
    request.session["n"] = request.session.get("n", 0) + 1
    return Response(orjson.dumps({"n": request.session["n"]}), mimetype="application/json")


def wsgi_counter(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    session = environ[ENVIRON_KEY]
    session["n"] = session.get("n", 0) + 1
    start_response("200 OK", [("Content-Type", "application/json")])
    return [orjson.dumps({"n": session["n"]})]


ENTRY_POINTS: dict[str, Callable[..., App]] = {
    "with_session": lambda store, **o: with_session(store, **o)(counter),
    "middleware": lambda store, **o: SessionMiddleware(wsgi_counter, store, **o),
}


@pytest.fixture(params=sorted(ENTRY_POINTS))
def make_app(request: pytest.FixtureRequest) -> Callable[..., App]:
    return ENTRY_POINTS[request.param]


def call(app: App, cookie: object) -> tuple[int, dict[str, Any], str | None]:
    """One request as a server makes it: ``cookie`` goes into the environ as it is
    (bytes are decoded latin-1, as PEP 3333 says).  Returns (status, JSON body, new id)."""
    environ = EnvironBuilder("/").get_environ()
    environ["HTTP_COOKIE"] = cookie.decode("latin1") if isinstance(cookie, bytes) else cookie
    app_iter, status, headers = run_wsgi_app(app, environ)
    body = b"".join(app_iter)
    sids = [v.split(";")[0].split("=", 1)[1] for k, v in headers.items() if k == "Set-Cookie"]
    assert len(sids) == 1
    return int(status.split()[0]), orjson.loads(body), sids[0]


def key_of(sid: str) -> str:
    return PREFIX + hashlib.sha256(sid.encode()).hexdigest()


def keyed_key_of(sid: str, secret: str) -> str:
    """The store key with ``secret``: BLAKE2b-256 keyed with a BLAKE2b of the secret."""
    key = hashlib.blake2b(secret.encode(), digest_size=32, person=b"prefork_sessions").digest()
    return PREFIX + hashlib.blake2b(sid.encode(), key=key, digest_size=32).hexdigest()


def start_session(app: App) -> str:
    status, body, sid = call(app, None)
    assert status == 200 and body == {"n": 1} and sid is not None
    return sid


# -- any Cookie header: a fresh session, never an error --------------------------------


GARBAGE = [
    b"session_id=\xff",
    b"session_id=\xc3\x28\xa0\xa1; x=\xf0\x28\x8c\x28",  # invalid UTF-8 sequences
    b"session_id=" + "é".encode("latin1") * 43,  # 43 characters, latin-1 decoded
    b"session_id=\x00\x01\x1f\x7f\x80\xff",
    b"session_id=\x00" + b"A" * 42 + b"\x00",
    b'session_id="\\377\\000"; other="\xff"',
    b"session_id=a\r\nX-Injected: 1",  # only a raw environ can carry these
    b"\xff\xfe=\xff; ;;; ===; \t\x0b\x0c",
    b"session_id=" + b"A" * 43,  # well formed, never issued
    b"session_id=" + b"x" * 1_000_000,  # a huge header
    b"; ".join([b"session_id=junk"] * 10_000),  # many cookies of the same name
]


@pytest.mark.parametrize("cookie", GARBAGE, ids=range(len(GARBAGE)))
def test_a_garbage_cookie_gets_a_fresh_session(
    store: MmapStore, make_app: Callable[..., App], cookie: bytes
) -> None:
    status, body, sid = call(make_app(store), cookie)
    assert status == 200 and body == {"n": 1}
    assert is_valid_session_id(sid) and sid is not None and sid.encode() not in cookie
    assert len(store) == 1


@pytest.mark.parametrize(
    "cookie",
    [
        "session_id=\udcff",  # a non-conforming server: surrogates,
        'session_id="\udcff"; a="\udc80"',  # also inside quotes,
        "session_id=\u2028\u4e2d",  # or characters above U+00FF
    ],
)
def test_a_non_pep3333_cookie_string_gets_a_fresh_session(
    store: MmapStore, make_app: Callable[..., App], cookie: str
) -> None:
    status, body, _ = call(make_app(store), cookie)
    assert status == 200 and body == {"n": 1}


def test_a_cookie_header_that_is_not_a_str_gets_a_fresh_session(
    store: MmapStore, make_app: Callable[..., App]
) -> None:
    environ = EnvironBuilder("/").get_environ()
    environ["HTTP_COOKIE"] = b"session_id=x"  # a broken server's bytes
    app_iter, status, _ = run_wsgi_app(make_app(store), environ)
    assert status.startswith("200") and orjson.loads(b"".join(app_iter)) == {"n": 1}


@pytest.mark.parametrize(
    "around",
    [
        b"other=\xff; {}",  # the reported case: one non-UTF-8 byte in another cookie
        b"name=Jos\xc3\xa9; {}; lang=\xe9",  # UTF-8 and latin-1 text in others
        b"{}; blob=" + b"\x80" * 100_000,
        b"; ".join([b"session_id=junk"] * 1000) + b"; {}",
        b'quoted="a;b\xff\\"c"; {}',
    ],
)
def test_other_cookies_never_cost_the_session(
    store: MmapStore, make_app: Callable[..., App], around: bytes
) -> None:
    app = make_app(store)
    sid = start_session(app)
    status, body, new_sid = call(app, around.replace(b"{}", f"{COOKIE}={sid}".encode()))
    assert status == 200 and body == {"n": 2} and new_sid == sid


# Bytes that never end a cookie value, nor start a quoted string in it.
_VALUE_BYTES = st.binary(max_size=300).map(lambda b: b.translate(None, b';"'))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(max_size=300), value=_VALUE_BYTES)
def test_any_header_bytes_are_answered(store: MmapStore, garbage: bytes, value: bytes) -> None:
    for make in ENTRY_POINTS.values():
        app = make(store)
        status, body, _ = call(app, garbage)
        assert status == 200 and body == {"n": 1}
        sid = start_session(app)
        cookie = b"junk=" + value + f"; {COOKIE}={sid}".encode()
        assert call(app, cookie)[1:] == ({"n": 2}, sid)
    store.clear()


class CountingStore:
    """An MmapStore that counts lookups."""

    def __init__(self, store: MmapStore) -> None:
        self.inner, self.gets = store, 0

    def get(self, key: str, default: Any = None) -> Any:
        self.gets += 1
        return self.inner.get(key, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_flood_of_same_name_cookies_costs_at_most_four_lookups(
    store: MmapStore, make_app: Callable[..., App]
) -> None:
    counting = CountingStore(store)
    app = make_app(counting)
    sid = start_session(app)
    forged = "; ".join(f"{COOKIE}={new_session_id()}" for _ in range(500))
    counting.gets = 0
    status, body, new_sid = call(app, f"{forged}; {COOKIE}={sid}")
    assert status == 200 and body == {"n": 1} and new_sid != sid
    assert counting.gets == 4
    junk = "; ".join(f"{COOKIE}=junk{i}" for i in range(500))  # malformed: not counted
    counting.gets = 0
    assert call(app, f"{junk}; {COOKIE}={sid}")[1:] == ({"n": 2}, sid)
    assert counting.gets == 1


# -- the store file never holds a session id ----------------------------------------------


def ids_in(data: bytes) -> set[str]:
    """Every string of a session id's shape in ``data``, overlapping ones too."""
    return {m.group(1).decode() for m in re.finditer(rb"(?=([A-Za-z0-9_-]{43}))", data)}


def test_the_store_file_holds_no_session_id_and_yields_no_cookie(
    store: MmapStore, make_app: Callable[..., App]
) -> None:
    app = make_app(store)
    sids = [start_session(app) for _ in range(3)]
    assert call(app, f"{COOKIE}={sids[0]}")[1] == {"n": 2}
    with open(store.path, "rb") as f:
        data = f.read()
    for sid in sids:
        assert sid.encode() not in data
        assert base64.urlsafe_b64decode(sid + "=") not in data  # nor its raw bytes
        assert key_of(sid).encode() in data  # what is there instead
    # Whatever a reader of the file tries as a cookie starts a new session.
    tries = ids_in(data) | {k for k in store if isinstance(k, str)}
    tries |= {k.removeprefix(PREFIX) for k in list(tries)}
    assert len(tries) > 3 * 20
    for guess in sorted(tries):
        status, body, new_sid = call(app, f"{COOKIE}={guess}")
        assert status == 200 and body == {"n": 1} and new_sid not in sids
    for sid in sids:  # and the real cookies still work
        assert call(app, f"{COOKIE}={sid}")[1]["n"] >= 2


def session_flow(request: SessionRequest) -> Response:
    session = request.session
    if request.path == "/rotate":
        session.rotate()
    elif request.path == "/invalidate":
        session.invalidate()
        session.flash("bye")
    else:
        session["n"] = session.get("n", 0) + 1
    return Response(orjson.dumps({"n": session.get("n")}), mimetype="application/json")


def test_rotation_and_invalidation_leave_no_id_in_the_file(store: MmapStore) -> None:
    client = Client(with_session(store, secret=SECRET)(session_flow))
    seen = []
    for path in ("/", "/", "/rotate", "/", "/invalidate", "/", "/rotate"):
        client.get(path)
        cookie = client.get_cookie(COOKIE)
        if cookie is not None and cookie.value:
            seen.append(cookie.value)
    assert len(set(seen)) == 4  # first, rotated, after logout, rotated again
    with open(store.path, "rb") as f:
        data = f.read()
    assert not [sid for sid in seen if sid.encode() in data]
    assert store.get(keyed_key_of(seen[-1], SECRET))["f"] == [["message", "bye"]]
    assert len(store) == 1  # the rotated and invalidated ones are gone


def test_redis_keys_hold_no_session_id(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        app = ENTRY_POINTS["middleware"](store, secret=SECRET)
        sid = start_session(app)
        assert call(app, f"{COOKIE}={sid}")[1] == {"n": 2}
        [key] = store.keys()
        assert key == keyed_key_of(sid, SECRET) and sid not in key
    finally:
        store.clear()
        store.close()


def test_the_store_key_is_a_digest_keyed_by_the_secret(store: MmapStore) -> None:
    sid = new_session_id()
    plain = SessionManager(store, SessionOptions())
    keyed = SessionManager(store, SessionOptions(secret=SECRET))
    assert plain.store_key(sid) == key_of(sid)
    assert keyed.store_key(sid) == keyed_key_of(sid, SECRET)
    assert keyed.store_key(sid) != plain.store_key(sid)
    other = SessionManager(store, SessionOptions(secret=SECRET.encode() + b"!"))
    assert other.store_key(sid) != keyed.store_key(sid)
    namespaced = SessionManager(store, SessionOptions(key_prefix="app2:", secret=SECRET))
    assert namespaced.store_key(sid) == "app2:" + keyed.store_key(sid).removeprefix(PREFIX)


def test_a_session_is_found_only_with_the_secret_it_was_saved_with(
    store: MmapStore, make_app: Callable[..., App]
) -> None:
    with_secret = make_app(store, secret=SECRET)
    sid = start_session(with_secret)
    assert call(with_secret, f"{COOKIE}={sid}")[1] == {"n": 2}
    for other in (make_app(store), make_app(store, secret=SECRET + "2")):
        status, body, new_sid = call(other, f"{COOKIE}={sid}")
        assert status == 200 and body == {"n": 1} and new_sid != sid
    assert call(with_secret, f"{COOKIE}={sid}")[1] == {"n": 3}


def test_a_record_stored_under_the_raw_id_is_not_found(
    store: MmapStore, make_app: Callable[..., App]
) -> None:
    """What earlier releases stored: after the upgrade those sessions start fresh."""
    app = make_app(store)
    sid = new_session_id()
    store.set(PREFIX + sid, {"d": {"n": 41}, "e": 4_000_000_000.0, "f": []})
    status, body, new_sid = call(app, f"{COOKIE}={sid}")
    assert status == 200 and body == {"n": 1} and new_sid != sid


def test_the_secret_is_never_shown(store: MmapStore) -> None:
    options = SessionOptions(secret=SECRET)
    assert SECRET not in repr(options) and SECRET not in str(options)
    assert "secret" not in repr(options)
    for bad in (SECRET[:31], SECRET.encode()[:31]):
        with pytest.raises(InvalidArgumentError) as e:
            SessionOptions(secret=bad)
        assert "31 bytes" in str(e.value) and SECRET[:31] not in str(e.value)


@pytest.mark.parametrize(
    "secret", ["", "short", b"x" * 31, "é" * 15 + "x", "\udcff" * 40, bytearray(40), 12345]
)
def test_a_bad_secret_is_refused(store: MmapStore, secret: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        SessionOptions(secret=secret)
    with pytest.raises(InvalidArgumentError):
        with_session(store, secret=secret)
    with pytest.raises(InvalidArgumentError):
        SessionMiddleware(wsgi_counter, store, secret=secret)


def test_the_demo_reads_its_secret_from_the_environment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Importing the demo opens its store: here, not in the shared temporary directory.
    monkeypatch.setenv("PREFORK_SESSIONS_PATH", str(tmp_path / "demo.store"))
    monkeypatch.setenv("PREFORK_SESSIONS_SIZE", str(256 << 10))
    monkeypatch.delenv("PREFORK_SESSIONS_SECRET", raising=False)
    monkeypatch.delenv("PREFORK_SESSIONS_REDIS_URL", raising=False)
    from prefork_sessions import demo

    assert demo.session_secret({}) is None
    assert demo.session_secret({demo.SECRET_ENV: ""}) is None
    assert demo.session_secret({demo.SECRET_ENV: SECRET}) == SECRET.encode()
    with pytest.raises(InvalidArgumentError, match=demo.SECRET_ENV) as e:
        demo.session_secret({demo.SECRET_ENV: "changeme"})
    assert "changeme" not in str(e.value)


# -- options: nothing can inject a cookie attribute --------------------------------------


def set_cookie_attributes(header: str) -> dict[str, str]:
    """The attributes of a Set-Cookie header as a browser splits them (RFC 6265 5.2)."""
    _, *parts = header.split(";")
    out = {}
    for part in parts:
        name, _, value = part.partition("=")
        assert name.strip().lower() not in out, f"attribute given twice in {header!r}"
        out[name.strip().lower()] = value.strip()
    return out


def assert_only_our_attributes(options: SessionOptions, store: MmapStore) -> None:
    manager = SessionManager(store, options)
    expected = {"expires", "max-age", "path", "samesite", "httponly"}
    if options.domain is not None:
        expected.add("domain")
    if options.secure:
        expected.add("secure")
    for header in (manager.cookie_header(new_session_id(), 1_800_000_000.0), manager.expired_cookie_header()):
        assert header.startswith(f"{options.cookie_name}=")
        attributes = set_cookie_attributes(header)
        assert set(attributes) == expected, header
        assert re.fullmatch(r"[A-Za-z0-9.-]*", attributes.get("domain", ""))
        assert not re.search(r"[\x00-\x1f\x7f]", header)


BAD_DOMAINS = [
    "ex.com; Secure=no",
    "ex.com;Domain=evil.com",
    "ex.com\uff1b Secure=no",  # a fullwidth semicolon, which IDNA turns into ";"
    "ex.com,evil.com",
    "ex com",
    "ex.com=1",
    "ex.com\x00",
    "ex.com\r\nX-Injected: 1",
    "ex.com\t",
    "ex.com:8080",
    "",
    ".",
    "..ex.com",
    "ex..com",
    "ex.com.",
    "-ex.com",
    "ex-.com",
    "ex_1.com",
    "a" * 64 + ".com",
    "a." * 126 + "com",  # 255 characters
    "\u0080",
]


@pytest.mark.parametrize("domain", BAD_DOMAINS)
def test_a_domain_that_is_not_a_host_name_is_refused(store: MmapStore, domain: str) -> None:
    with pytest.raises(InvalidArgumentError, match="not a host name") as e:
        SessionOptions(domain=domain)
    assert isinstance(e.value, ValueError) and isinstance(e.value, SessionStoreError)
    with pytest.raises(InvalidArgumentError):
        with_session(store, domain=domain)
    with pytest.raises(InvalidArgumentError):
        SessionMiddleware(wsgi_counter, store, domain=domain)


@pytest.mark.parametrize(
    "domain, sent",
    [
        ("example.org", "example.org"),
        (".example.org", "example.org"),
        ("Sub-1.EXAMPLE.org", "Sub-1.EXAMPLE.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "localhost"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_host_names_are_accepted(store: MmapStore, domain: str, sent: str) -> None:
    options = SessionOptions(domain=domain)
    assert_only_our_attributes(options, store)
    header = SessionManager(store, options).cookie_header(new_session_id(), 1_800_000_000.0)
    assert set_cookie_attributes(header)["domain"] == sent


_HOSTILE_TEXT = st.text(st.sampled_from("ab-.; ,=\t\r\n\x00\x7f\"'\\é；。:/%"), max_size=20)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(domain=_HOSTILE_TEXT, path=_HOSTILE_TEXT)
def test_no_domain_or_path_injects_an_attribute(store: MmapStore, domain: str, path: str) -> None:
    tries: list[dict[str, Any]] = [{"domain": domain}, {"path": "/" + path}, {"path": path}]
    for options in tries:
        try:
            parsed = SessionOptions(**options)
        except InvalidArgumentError:
            continue
        assert_only_our_attributes(parsed, store)


@pytest.mark.parametrize(
    "options",
    [
        {"path": "/x;Domain=evil.com"},  # werkzeug 2.x sends ";" in a path as it is
        {"path": "/x\r\nX-Injected: 1"},
        {"path": "/x\x00"},
        {"path": "x"},
        {"path": b"/"},
        {"cookie_name": "a;b"},
        {"cookie_name": "a=b"},
        {"cookie_name": "a b"},
        {"cookie_name": ""},
        {"cookie_name": "sid\r\n"},
        {"cookie_name": 5},
        {"cookie_name": "__Host-sid"},  # needs secure=True
        {"cookie_name": "__Host-sid", "secure": True, "path": "/app"},
        {"cookie_name": "__host-sid", "secure": True, "domain": "example.org"},
        {"cookie_name": "__Secure-sid"},
        {"samesite": "lax"},
        {"samesite": "Lax; Secure"},
        {"samesite": 1},
        {"secure": "no"},
        {"httponly": 1},
        {"lifetime": True},
        {"lifetime": "10"},
        {"lifetime": 10**400},
        {"lifetime": math.nan},
        {"lifetime": -1},
        {"lifetime": MAX_LIFETIME + 1},
        {"refresh_threshold": True},
        {"refresh_threshold": "5"},
        {"refresh_threshold": math.nan},
        {"key_prefix": 5},
        {"domain": b"example.org"},
    ],
)
def test_bad_options_are_refused_with_our_error(store: MmapStore, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        SessionOptions(**options)
    with pytest.raises(InvalidArgumentError):
        with_session(store, **options)


def test_good_prefixed_names_and_the_longest_lifetime(store: MmapStore) -> None:
    for options in (
        SessionOptions(cookie_name="__Host-sid", secure=True),
        SessionOptions(cookie_name="__Secure-sid", secure=True, domain="example.org"),
        SessionOptions(lifetime=MAX_LIFETIME, refresh_threshold=0),
    ):
        assert_only_our_attributes(options, store)


# -- values someone else stored under a session's key -------------------------------------


@pytest.fixture
def pickle_store(tmp_path: Any) -> Iterator[MmapStore]:
    """Pickle can store what JSON cannot (NaN, huge ints), as another writer might."""
    s = MmapStore(tmp_path / "pickled", cache_size=1 << 20, page_size=16 << 10, serializer="pickle")
    yield s
    s.close()


FUTURE = 4_000_000_000.0


@pytest.mark.parametrize(
    "value",
    [
        "a string",
        42,
        None,
        ["d", "e"],
        {"d": ["not", "a", "dict"], "e": FUTURE},
        {"d": {}, "e": "tomorrow"},
        {"d": {}, "e": True},
        {"d": {}, "e": math.nan},
        {"d": {}, "e": math.inf},
        {"d": {}, "e": 10**400},
        {"d": {}, "e": 1.0},  # long expired
        {"d": {}},
    ],
)
def test_an_unusable_stored_value_starts_a_fresh_session(
    pickle_store: MmapStore, make_app: Callable[..., App], value: Any
) -> None:
    app = make_app(pickle_store)
    sid = start_session(app)
    pickle_store.set(key_of(sid), value)
    status, body, new_sid = call(app, f"{COOKIE}={sid}")
    assert status == 200 and body == {"n": 1} and new_sid != sid


def test_stored_flashes_of_the_wrong_shape_are_dropped(pickle_store: MmapStore) -> None:
    def messages(request: SessionRequest) -> Response:
        shown = request.session.get_flashed_messages(category_filter=["error", "message"])
        return Response(orjson.dumps(shown), mimetype="application/json")

    app = with_session(pickle_store)(messages)
    sid = new_session_id()
    flashes = [["message", "ok"], [["unhashable"], "x"], "junk", [1, 2], ["error", "e", 3]]
    pickle_store.set(key_of(sid), {"d": {}, "e": FUTURE, "f": flashes})
    environ = EnvironBuilder("/", headers=[("Cookie", f"{COOKIE}={sid}")]).get_environ()
    app_iter, status, _ = run_wsgi_app(app, environ)
    assert status.startswith("200") and orjson.loads(b"".join(app_iter)) == ["ok"]
    assert pickle_store.get(key_of(sid))["f"] == []


def test_a_flash_category_must_be_a_str(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        with pytest.raises(InvalidArgumentError, match="category must be a str"):
            request.session.flash("m", ["not", "a", "str"])  # type: ignore[arg-type]
        return Response("ok")

    assert Client(with_session(store)(handler)).get("/").status_code == 200


# -- a failing store ---------------------------------------------------------------------


class FailingStore:
    """An MmapStore whose ``failing`` methods raise LockTimeoutError naming the key,
    as a store's messages do."""

    def __init__(self, store: MmapStore, *failing: str) -> None:
        self.inner, self.failing = store, failing

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.failing:
            return method

        def fail(key: str, *args: Any, **kwargs: Any) -> Any:
            raise LockTimeoutError(f"page 3 of {self.inner.path} stayed locked (key {key!r})")

        return fail


def test_a_store_error_on_load_escapes_as_our_error_without_the_id(
    store: MmapStore, make_app: Callable[..., App]
) -> None:
    sid = start_session(make_app(store))
    app = make_app(FailingStore(store, "get"))
    environ = EnvironBuilder("/", headers=[("Cookie", f"{COOKIE}={sid}")]).get_environ()
    with pytest.raises(LockTimeoutError) as e:
        run_wsgi_app(app, environ)
    assert sid not in str(e.value) and key_of(sid) in str(e.value)


@pytest.mark.parametrize("failing", ["set", "get_and_set"])
def test_a_store_error_on_save_answers_500_and_logs_no_id(
    store: MmapStore,
    make_app: Callable[..., App],
    caplog: pytest.LogCaptureFixture,
    failing: str,
) -> None:
    sid = start_session(make_app(store))
    app = make_app(FailingStore(store, failing))
    cookie = f"{COOKIE}={sid}" if failing == "get_and_set" else ""  # update, or a new session
    environ = EnvironBuilder("/", headers=[("Cookie", cookie)]).get_environ()
    with caplog.at_level(logging.ERROR, logger="prefork_sessions"):
        app_iter, status, headers = run_wsgi_app(app, environ)
        b"".join(app_iter)
    assert status.startswith("500") and "Set-Cookie" not in headers
    [record] = [r for r in caplog.records if r.name == "prefork_sessions"]
    message = record.getMessage()
    assert "LockTimeoutError" in message and "stayed locked" in message
    assert sid not in message
    assert store.get(key_of(sid))["d"] == {"n": 1}


# -- end to end: the demo under a real gunicorn, its secret from the environment ----------


def test_the_demo_under_gunicorn_keeps_ids_out_of_its_file(tmp_path: Any) -> None:
    import http.client

    from _live import Browser, LiveGunicorn

    env = {"PREFORK_SESSIONS_SECRET": SECRET}
    with LiveGunicorn(tmp_path, workers=2, env=env, args=("--max-requests", "2")) as server:
        browser = Browser(server)
        assert [browser.json("/")["visits"] for _ in range(4)] == [1, 2, 3, 4]
        sid = browser.cookie
        assert sid is not None
        # Raw bytes on the wire: one non-UTF-8 byte in another cookie.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Cookie": b"x=\xff; session_id=" + sid.encode()})
            response = conn.getresponse()
            assert response.status == 200
            assert orjson.loads(response.read())["visits"] == 5
        finally:
            conn.close()
        with open(server.store_path, "rb") as f:
            data = f.read()
        assert sid.encode() not in data
        assert keyed_key_of(sid, SECRET).encode() in data
