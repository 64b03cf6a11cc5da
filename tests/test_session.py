"""The session layer through werkzeug's test client, on a real MmapStore file."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import Forbidden, InternalServerError
from werkzeug.http import dump_cookie, http_date
from werkzeug.sansio.http import parse_cookie
from werkzeug.test import Client, EnvironBuilder
from werkzeug.wrappers import Response

from prefork_sessions import MmapStore, _session
from prefork_sessions._session import (
    SessionManager,
    SessionOptions,
    cookie_values,
    is_valid_session_id,
    new_session_id,
)
from prefork_sessions._wsgi import ENVIRON_KEY, SessionMiddleware, SessionRequest, with_session

COOKIE = "session_id"
PREFIX = "session:"
Handler = Callable[[SessionRequest], Response]


class Clock:
    """Session time, moved by hand (the store's own clock is left alone)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Any) -> Any:
    s = MmapStore(tmp_path / "sessions", cache_size=1 << 20, page_size=16 << 10)
    yield s
    s.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(1_800_000_000.0)
    monkeypatch.setattr(_session, "_clock", c)
    return c


def json_response(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status=status, mimetype="application/json")


def counter(request: SessionRequest) -> Response:
    request.session["n"] = request.session.get("n", 0) + 1
    return json_response({"n": request.session["n"]})


def client_for(store: MmapStore, handler: Handler, **options: Any) -> Client:
    return Client(with_session(store, **options)(handler))


def sid_of(client: Client) -> str | None:
    cookie = client.get_cookie(COOKIE)
    return None if cookie is None else cookie.value


def client_with(app: Any, sid: str | None) -> Client:
    """Another browser presenting the session cookie ``sid``."""
    client = Client(app)
    client.set_cookie(COOKIE, sid)  # type: ignore[arg-type]
    return client


def key_of(sid: str | None) -> str:
    """The store key of a session id without a secret: the prefix and the id's SHA-256."""
    assert sid is not None
    return PREFIX + hashlib.sha256(sid.encode()).hexdigest()


def stored(store: MmapStore, sid: str | None) -> Any:
    return store.get(key_of(sid))


def set_cookies(response: Any) -> list[str]:
    return list(response.headers.getlist("Set-Cookie"))


# -- ids ---------------------------------------------------------------------


def test_new_ids_are_256_bit_urlsafe_and_valid() -> None:
    ids = {new_session_id() for _ in range(500)}
    assert len(ids) == 500
    for sid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", sid)
        assert is_valid_session_id(sid)


_COOKIE_TEXT = st.text(st.sampled_from('ab=;" \\\t\n\r\x0b\x1c\x85\xa0é'), max_size=40)


@settings(max_examples=500, deadline=None)
@given(
    parts=st.lists(
        st.one_of(st.just("session_id"), st.just(" session_id "), _COOKIE_TEXT), max_size=8
    )
)
def test_cookie_values_match_werkzeugs_parser(parts: list[str]) -> None:
    header = ";".join(parts) + "".join(parts)  # names and separators in odd places too
    for name in ("session_id", "a", "b"):
        assert cookie_values(header, name) == parse_cookie(header).getlist(name)


@settings(max_examples=300, deadline=None)
@given(seconds=st.integers(0, 2**33))
def test_expires_dates_match_werkzeugs(seconds: int) -> None:
    assert _session._http_date(seconds) == http_date(seconds)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cookie_name": "sid", "secure": True, "samesite": "None", "domain": ".example.org"},
        {"path": "/a b,c", "httponly": False, "samesite": None, "lifetime": 0.5},
        {"domain": "bücher.example", "lifetime": 86400.25},
    ],
)
def test_set_cookie_is_what_dump_cookie_gives(store: MmapStore, options: dict[str, Any]) -> None:
    manager = SessionManager(store, SessionOptions(**options))
    o = manager.options
    attributes: dict[str, Any] = {
        "path": o.path,
        "domain": o.domain,
        "secure": o.secure,
        "httponly": o.httponly,
        "samesite": o.samesite,
    }
    for expires in (1_800_000_000.9, 1_800_000_001.0, 2_000_000_000.5):
        sid = new_session_id()
        expected = dump_cookie(
            o.cookie_name, sid, max_age=math.ceil(o.lifetime), expires=int(expires), **attributes
        )
        assert manager.cookie_header(sid, expires) == expected
    assert manager.expired_cookie_header() == dump_cookie(
        o.cookie_name, "", max_age=0, expires=0, **attributes
    )


def test_an_oversized_cookie_still_warns(store: MmapStore) -> None:
    manager = SessionManager(store, SessionOptions(path="/" + "p" * 4100))
    with pytest.warns(UserWarning, match="too large"):
        manager.cookie_header(new_session_id(), 1_800_000_000.0)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "a" * 42,
        "a" * 44,
        "a" * 42 + "B",
        "a" * 42 + "=",
        "a" * 41 + "+A",
        "a" * 42 + "é",
        None,
        42,
    ],
)
def test_malformed_ids_are_rejected(value: Any) -> None:
    assert not is_valid_session_id(value)


# -- cookies -----------------------------------------------------------------


def test_untouched_session_sets_no_cookie_and_writes_nothing(store: MmapStore) -> None:
    client = client_for(store, lambda request: Response("hi"))
    response = client.get("/")
    assert set_cookies(response) == []
    assert "Vary" not in response.headers
    assert len(store) == 0


def test_read_only_new_session_varies_but_sets_no_cookie(store: MmapStore) -> None:
    client = client_for(store, lambda request: json_response(request.session.get("user")))
    response = client.get("/")
    assert response.json is None
    assert set_cookies(response) == []
    assert response.headers["Vary"] == "Cookie"
    assert len(store) == 0


def test_first_save_sets_a_cookie_with_secure_defaults(store: MmapStore, clock: Clock) -> None:
    client = client_for(store, counter)
    response = client.get("/")
    assert response.json == {"n": 1}
    [header] = set_cookies(response)
    sid = sid_of(client)
    assert is_valid_session_id(sid)
    assert header.startswith(f"{COOKIE}={sid};")
    attributes = {part.strip().split("=")[0] for part in header.split(";")[1:]}
    assert attributes == {"Expires", "Max-Age", "HttpOnly", "Path", "SameSite"}  # no Secure
    assert "Path=/" in header and "SameSite=Lax" in header
    assert f"Max-Age={int(_session.DEFAULT_LIFETIME)}" in header
    value = stored(store, sid)
    assert value["d"] == {"n": 1}
    assert value["e"] == clock.now + _session.DEFAULT_LIFETIME
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None and cookie.expires is not None
    assert int(cookie.expires.timestamp()) == int(value["e"])  # cookie and server agree
    assert response.headers["Vary"] == "Cookie"


def test_cookie_options(store: MmapStore) -> None:
    client = client_for(
        store,
        counter,
        cookie_name="sid",
        secure=True,
        samesite="Strict",
        domain="example.org",
        path="/app",
        lifetime=600,
    )
    response = client.get("/app/", base_url="https://example.org")
    [header] = set_cookies(response)
    assert header.startswith("sid=")
    for part in (
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
        "Domain=example.org",
        "Path=/app",
        "Max-Age=600",
    ):
        assert part in header


@pytest.mark.parametrize(
    "options, error",
    [
        ({"lifetime": 0}, ValueError),
        ({"lifetime": float("inf")}, ValueError),
        ({"refresh_threshold": 10, "lifetime": 5}, ValueError),
        ({"samesite": "None"}, ValueError),
        ({"samesite": "lax"}, ValueError),
        ({"cookie_name": "bad name"}, ValueError),
        ({"domain": "example.org\r\nX-Injected: 1"}, ValueError),
        ({"path": "app"}, ValueError),
        ({"no_such_option": 1}, TypeError),
    ],
)
def test_bad_options_fail_at_setup(store: MmapStore, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        with_session(store, **options)
    with pytest.raises(error):
        SessionMiddleware(lambda e, s: [], store, **options)


def test_options_are_frozen() -> None:
    options = SessionOptions(lifetime=100)
    assert options.threshold == 50
    with pytest.raises(AttributeError):
        options.lifetime = 5  # type: ignore[misc]


# -- forged and garbage cookies, fixation ---------------------------------------


@pytest.mark.parametrize(
    "cookie",
    [
        f"{COOKIE}=",
        f"{COOKIE}=nonsense",
        f"{COOKIE}={'A' * 43}",  # well-formed, never issued
        f"{COOKIE}={'A' * 5000}",
        f'{COOKIE}="{"x" * 43}"',
        f"{COOKIE}=\x01\x02\x7f\xff; other=1",
        f"{COOKIE}=a; {COOKIE}=b; {COOKIE}=c; {COOKIE}=d; {COOKIE}=e",
        "garbage;;;===;" * 200,
    ],
)
def test_forged_or_garbage_cookie_gets_a_fresh_id(store: MmapStore, cookie: str) -> None:
    client = Client(with_session(store)(counter), use_cookies=False)
    response = client.get("/", headers={"Cookie": cookie})
    assert response.status_code == 200
    assert response.json == {"n": 1}
    [header] = set_cookies(response)
    new_sid = header.split(";")[0].split("=", 1)[1]
    assert is_valid_session_id(new_sid)
    assert new_sid not in cookie
    assert len(store) == 1


def test_client_chosen_id_is_never_adopted(store: MmapStore) -> None:
    attacker_id = new_session_id()  # well-formed, as an attacker would make it
    client = Client(with_session(store)(counter), use_cookies=False)
    response = client.get("/", headers={"Cookie": f"{COOKIE}={attacker_id}"})
    issued = set_cookies(response)[0].split(";")[0].split("=", 1)[1]
    assert issued != attacker_id
    assert store.get(key_of(attacker_id)) is None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=300))
def test_any_cookie_value_is_answered(store: MmapStore, value: str) -> None:
    client = Client(with_session(store)(counter), use_cookies=False)
    response = client.get("/", headers={"Cookie": f"{COOKIE}={value}"})
    assert response.status_code == 200
    assert response.json == {"n": 1}


def test_the_valid_one_of_several_same_name_cookies_is_used(store: MmapStore) -> None:
    client = client_for(store, counter)
    client.get("/")
    sid = sid_of(client)
    raw = Client(with_session(store)(counter), use_cookies=False)
    response = raw.get(
        "/", headers={"Cookie": f"{COOKIE}=junk; {COOKIE}={new_session_id()}; {COOKIE}={sid}"}
    )
    assert response.json == {"n": 2}


def test_unusable_stored_value_starts_a_new_session(store: MmapStore) -> None:
    client = client_for(store, counter)
    client.get("/")
    sid = sid_of(client)
    store.set(key_of(sid), ["not", "a", "session"])
    response = client.get("/")
    assert response.json == {"n": 1}
    assert sid_of(client) != sid


# -- lifetime and sliding expiry ------------------------------------------------


def test_expired_session_gets_a_new_id(store: MmapStore, clock: Clock) -> None:
    client = client_for(store, counter, lifetime=100)
    client.get("/")
    old = sid_of(client)
    clock.now += 101
    assert client.get("/").json == {"n": 1}
    assert sid_of(client) != old


def test_sliding_expiry_writes_only_under_the_threshold(store: MmapStore, clock: Clock) -> None:
    client = client_for(store, lambda r: json_response(r.session.get("n")), lifetime=100)
    store.set(PREFIX + "x", 0)  # something else in the file
    seed = client_for(store, counter, lifetime=100)
    seed.get("/")
    sid = sid_of(seed)
    client.set_cookie(COOKIE, sid)  # type: ignore[arg-type]
    start = clock.now
    assert stored(store, sid)["e"] == start + 100

    for offset in (1, 20, 49):  # more than half the lifetime left: no write, no cookie
        clock.now = start + offset
        response = client.get("/")
        assert response.json == 1
        assert set_cookies(response) == []
        assert stored(store, sid)["e"] == start + 100

    clock.now = start + 51  # under the threshold: refresh once
    response = client.get("/")
    assert response.json == 1
    [header] = set_cookies(response)
    assert "Max-Age=100" in header
    assert stored(store, sid) == {"d": {"n": 1}, "e": start + 151, "f": []}

    clock.now = start + 60  # fresh again
    assert set_cookies(client.get("/")) == []
    assert stored(store, sid)["e"] == start + 151


def test_every_write_resends_the_cookie_with_the_extended_expiry(
    store: MmapStore, clock: Clock
) -> None:
    client = client_for(store, counter, lifetime=100)
    client.get("/")
    sid = sid_of(client)
    for step in (1, 30, 10):  # well above the refresh threshold: the write extends anyway
        clock.now += step
        response = client.get("/")
        [header] = set_cookies(response)
        assert header.startswith(f"{COOKIE}={sid};") and "Max-Age=100" in header
        cookie = client.get_cookie(COOKIE)
        assert cookie is not None and cookie.expires is not None
        assert stored(store, sid)["e"] == clock.now + 100
        assert int(cookie.expires.timestamp()) == int(clock.now + 100)


def test_vary_merge_keeps_one_vary_header(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session.get("x")
        response = Response("ok")
        response.headers.add("vary", "Accept")
        response.headers.add("Vary", "Origin")
        return response

    response = client_for(store, handler).get("/")
    assert response.headers.getlist("Vary") == ["Accept, Cookie"]  # as Headers.set leaves it

    def star(request: SessionRequest) -> Response:
        request.session.get("x")
        return Response("ok", headers={"Vary": "*"})

    assert client_for(store, star).get("/").headers.getlist("Vary") == ["*"]


def test_zero_threshold_means_fixed_lifetime(store: MmapStore, clock: Clock) -> None:
    client = client_for(store, counter, lifetime=100, refresh_threshold=0)
    client.get("/")
    sid = sid_of(client)
    reader = client_for(
        store, lambda r: json_response(r.session.get("n")), lifetime=100, refresh_threshold=0
    )
    reader.set_cookie(COOKIE, sid)  # type: ignore[arg-type]
    clock.now += 99
    assert set_cookies(reader.get("/")) == []
    clock.now += 2
    assert reader.get("/").json is None  # expired, never refreshed by reading


# -- saving only what changed ------------------------------------------------------


def test_read_only_and_same_value_requests_do_not_write(store: MmapStore, clock: Clock) -> None:
    def handler(request: SessionRequest) -> Response:
        if request.path == "/set":
            request.session["user"] = request.args["v"]
            request.session["tags"] = ["a"]
        else:
            _ = dict(request.session), request.session["tags"][0]
        return json_response(request.session.modified)

    client = client_for(store, handler)
    client.get("/set?v=alice")
    sid = sid_of(client)
    before = stored(store, sid)
    clock.now += 5  # any write would move the stored expiry
    for path in ("/read", "/set?v=alice"):
        response = client.get(path)
        assert response.json is False
        assert set_cookies(response) == []
        assert stored(store, sid) == before


def test_in_place_changes_are_saved(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        if request.path == "/init":
            request.session["cart"] = {"items": [1]}
        else:
            request.session["cart"]["items"].append(2)
        return Response("ok")

    client = client_for(store, handler)
    client.get("/init")
    assert set_cookies(client.get("/add")) != []
    assert stored(store, sid_of(client))["d"] == {"cart": {"items": [1, 2]}}


def test_type_change_between_equal_values_is_saved(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session["v"] = 1 if request.path == "/int" else True
        return Response("ok")

    client = client_for(store, handler)
    client.get("/int")
    client.get("/bool")
    assert stored(store, sid_of(client))["d"] == {"v": True}


def test_deleting_keys_and_forcing_modified(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        session = request.session
        if request.path == "/init":
            session.update(a=1, b=2, c=3)
        elif request.path == "/del":
            del session["a"]
            session.pop("b")
        elif request.path == "/force":
            session.modified = True
        return json_response(sorted(session))

    client = client_for(store, handler)
    client.get("/init")
    assert client.get("/del").json == ["c"]
    sid = sid_of(client)
    assert stored(store, sid)["d"] == {"c": 3}
    store.set(key_of(sid), {"d": {"c": 3, "z": 9}, "e": stored(store, sid)["e"], "f": []})
    assert set_cookies(client.get("/force")) != []  # saved although nothing differs
    assert stored(store, sid)["d"] == {"c": 3, "z": 9}


def test_session_keys_must_be_str(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        with pytest.raises(TypeError, match="keys must be str"):
            request.session[1] = "x"  # type: ignore[index]
        return Response("ok")

    assert client_for(store, handler).get("/").status_code == 200


# -- rotation, invalidation, flashes ----------------------------------------------


def session_actions(request: SessionRequest) -> Response:
    session = request.session
    action = request.path.strip("/")
    if action == "rotate":
        session.rotate()
    elif action == "invalidate":
        session.invalidate()
    elif action == "logout-and-flash":
        session.invalidate()
        session.flash("bye")
    elif action == "flash":
        session.flash(request.args["m"], request.args.get("c", "message"))
    elif action == "messages":
        return json_response(session.get_flashed_messages(with_categories=True))
    elif action == "errors":
        return json_response(session.get_flashed_messages(category_filter=["error"]))
    elif action == "both":
        session.flash("now")
        return json_response(session.get_flashed_messages())
    else:
        session["n"] = session.get("n", 0) + 1
    return json_response({"n": session.get("n"), "new": session.new})


def test_rotate_keeps_data_under_a_fresh_id(store: MmapStore) -> None:
    client = client_for(store, session_actions)
    client.get("/")
    client.get("/")
    old = sid_of(client)
    response = client.get("/rotate")
    new = sid_of(client)
    assert new != old and is_valid_session_id(new)
    assert set_cookies(response)[0].startswith(f"{COOKIE}={new};")
    assert stored(store, old) is None
    assert stored(store, new)["d"] == {"n": 2}
    assert client.get("/").json == {"n": 3, "new": False}
    # The old id is dead: presenting it again starts over.
    replay = Client(with_session(store)(session_actions), use_cookies=False)
    assert replay.get("/", headers={"Cookie": f"{COOKIE}={old}"}).json == {"n": 1, "new": True}


def test_invalidate_deletes_the_session_and_expires_the_cookie(store: MmapStore) -> None:
    client = client_for(store, session_actions)
    client.get("/")
    old = sid_of(client)
    response = client.get("/invalidate")
    [header] = set_cookies(response)
    assert header.startswith(f"{COOKIE}=;") and "Max-Age=0" in header
    assert stored(store, old) is None
    assert sid_of(client) is None
    assert client.get("/").json == {"n": 1, "new": True}


def test_invalidate_then_flash_starts_a_new_session(store: MmapStore) -> None:
    client = client_for(store, session_actions)
    client.get("/")
    old = sid_of(client)
    client.get("/logout-and-flash")
    new = sid_of(client)
    assert new is not None and new != old
    assert stored(store, old) is None
    assert client.get("/messages").json == [["message", "bye"]]
    assert client.get("/").json == {"n": 1, "new": False}


def test_flash_messages_are_read_once(store: MmapStore) -> None:
    client = client_for(store, session_actions)
    client.get("/flash?m=saved")
    client.get("/flash?m=oops&c=error")
    assert client.get("/errors").json == ["oops"]
    assert client.get("/messages").json == [["message", "saved"]]
    assert client.get("/messages").json == []
    assert client.get("/both").json == ["now"]  # flashed and read in the same request
    assert client.get("/messages").json == []


# -- failures ------------------------------------------------------------------------


def test_unserialisable_value_fails_with_500_and_keeps_the_stored_session(
    store: MmapStore, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session["n"] = 2
        if request.path == "/bad":
            request.session["when"] = threading.Lock()
        return Response("done")

    client = client_for(store, handler)
    client.get("/")
    sid = sid_of(client)
    store.set(key_of(sid), {"d": {"n": 1}, "e": stored(store, sid)["e"], "f": []})
    before = stored(store, sid)
    with caplog.at_level(logging.ERROR, logger="prefork_sessions"):
        response = client.get("/bad")
    assert response.status_code == 500
    assert b"done" not in response.data
    assert set_cookies(response) == []
    assert stored(store, sid) == before
    [record] = [r for r in caplog.records if r.name == "prefork_sessions"]
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert (
        "session not saved" in message and "'when'" in message and "SerializationError" in message
    )
    assert sid not in message  # the secret id never reaches the logs


def test_unserialisable_value_in_a_new_session_stores_nothing(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session["x"] = {1, 2}
        return Response("done")

    response = client_for(store, handler).get("/")
    assert response.status_code == 500
    assert set_cookies(response) == []
    assert len(store) == 0


def test_a_session_too_large_for_a_page_fails_with_500_and_keeps_the_stored_one(
    store: MmapStore, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session["blob"] = "x" * int(request.args.get("size", "10"))
        return Response("done")

    client = client_for(store, handler)
    client.get("/")
    sid = sid_of(client)
    before = stored(store, sid)
    with caplog.at_level(logging.ERROR, logger="prefork_sessions"):
        response = client.get(f"/?size={store.max_value_size + 1}")
    assert response.status_code == 500
    assert stored(store, sid) == before
    assert any("ValueTooLargeError" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", ["status", "abort", "raise"])
def test_server_errors_do_not_save(store: MmapStore, how: str) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session["n"] = request.session.get("n", 0) + 1
        if request.path == "/fail":
            request.session["half"] = "done"
            if how == "status":
                return Response("oops", status=503)
            if how == "abort":
                raise InternalServerError()
            raise RuntimeError("boom")
        return Response("ok")

    client = client_for(store, handler)
    client.get("/")
    sid = sid_of(client)
    before = stored(store, sid)
    if how == "raise":
        with pytest.raises(RuntimeError):
            client.get("/fail")
    else:
        response = client.get("/fail")
        assert response.status_code >= 500
        assert set_cookies(response) == []
    assert stored(store, sid) == before


def test_client_errors_still_save(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session["tries"] = request.session.get("tries", 0) + 1
        raise Forbidden()

    client = client_for(store, handler)
    assert client.get("/").status_code == 403
    assert client.get("/").status_code == 403
    assert stored(store, sid_of(client))["d"] == {"tries": 2}


# -- concurrent requests of one user ---------------------------------------------------


def test_concurrent_requests_changing_different_keys_both_keep_their_changes(
    store: MmapStore,
) -> None:
    """Request A loads the session; request B runs to completion; then A saves."""
    inner: list[Client] = []

    def handler(request: SessionRequest) -> Response:
        session = request.session
        if request.path == "/init":
            session.update(a=0, b=0, gone=1)
        elif request.path == "/a":
            _ = session["a"]  # A has loaded its copy
            inner[0].get("/b")  # B: same cookie, finishes first
            session["a"] = 1
        elif request.path == "/b":
            session["b"] = 1
            del session["gone"]
            session.flash("from b")
        return Response("ok")

    app = with_session(store)(handler)
    client = Client(app)
    client.get("/init")
    sid = sid_of(client)
    inner.append(client_with(app, sid))
    client.get("/a")
    assert stored(store, sid)["d"] == {"a": 1, "b": 1}
    assert stored(store, sid)["f"] == [["message", "from b"]]


def test_threads_incrementing_different_keys_lose_nothing(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        key = request.path.strip("/")
        request.session[key] = request.session.get(key, 0) + 1
        return Response("ok")

    app = with_session(store)(handler)
    seed = Client(app)
    seed.get("/seed")
    sid = sid_of(seed)
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            client = client_with(app, sid)
            for _ in range(25):
                assert client.get(f"/{key}").status_code == 200
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("x", "y", "z")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert stored(store, sid)["d"] == {"seed": 1, "x": 25, "y": 25, "z": 25}


def test_a_session_ended_meanwhile_is_not_resurrected(store: MmapStore) -> None:
    inner: list[Client] = []

    def handler(request: SessionRequest) -> Response:
        if request.path == "/logout":
            request.session.invalidate()
        elif request.path == "/slow":
            _ = request.session.get("user")
            inner[0].get("/logout")
            request.session["late"] = True
        else:
            request.session["user"] = "alice"
        return Response("ok")

    app = with_session(store)(handler)
    client = Client(app)
    client.get("/login")
    sid = sid_of(client)
    inner.append(client_with(app, sid))
    response = client.get("/slow")
    assert response.status_code == 200
    assert stored(store, sid) is None
    assert len(store) == 0


# -- the decorator itself ----------------------------------------------------------------


def test_decorator_wraps_functions_and_methods(store: MmapStore) -> None:
    class Views:
        @with_session(store)
        def app(self, request: SessionRequest) -> Response:
            """Doc."""
            request.session["who"] = type(self).__name__
            return Response("ok")

    views = Views()
    assert Views.app.__name__ == "app" and Views.app.__doc__ == "Doc."
    assert Views.app.session_store is store  # type: ignore[attr-defined]
    client = Client(views.app)
    client.get("/")
    assert stored(store, sid_of(client))["d"] == {"who": "Views"}


def test_vary_merges_with_the_apps_own(store: MmapStore) -> None:
    def handler(request: SessionRequest) -> Response:
        request.session.get("x")
        response = Response("ok")
        response.vary.add("Accept-Encoding")
        return response

    response = client_for(store, handler).get("/")
    assert response.headers["Vary"] == "Accept-Encoding, Cookie"


# -- the middleware -------------------------------------------------------------------------


def wsgi_counter(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    session = environ[ENVIRON_KEY]
    path = environ["PATH_INFO"]
    session["n"] = session.get("n", 0) + 1
    if path == "/bad":
        session["bad"] = object()
    if path == "/fail":
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [b"fail"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Vary", "Accept")])
    return [str(session["n"]).encode()]


def test_middleware_counts_and_sets_the_cookie(store: MmapStore) -> None:
    client = Client(SessionMiddleware(wsgi_counter, store, lifetime=300))
    assert client.get("/").data == b"1"
    response = client.get("/")
    assert response.data == b"2"
    assert response.headers["Vary"] == "Accept, Cookie"
    [header] = set_cookies(response)
    assert "HttpOnly" in header and "Max-Age=300" in header
    assert stored(store, sid_of(client))["d"] == {"n": 2}


def test_middleware_does_not_save_server_errors(
    store: MmapStore, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(SessionMiddleware(wsgi_counter, store))
    client.get("/")
    sid = sid_of(client)
    before = stored(store, sid)
    response = client.get("/fail")
    assert response.status_code == 500 and response.data == b"fail"
    with caplog.at_level(logging.ERROR, logger="prefork_sessions"):
        response = client.get("/bad")
    assert response.status_code == 500
    assert b"Internal Server Error" in response.data
    assert set_cookies(response) == []
    assert stored(store, sid) == before
    assert any("session not saved" in r.getMessage() for r in caplog.records)


def test_middleware_with_lazy_start_response(store: MmapStore) -> None:
    def generator_app(environ: dict[str, Any], start_response: Any) -> Any:
        session = environ[ENVIRON_KEY]
        session["n"] = session.get("n", 0) + 1
        if environ["PATH_INFO"] == "/bad":
            session["bad"] = object()
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"n="
        yield str(session["n"]).encode()

    client = Client(SessionMiddleware(generator_app, store))
    assert client.get("/").data == b"n=1"
    assert client.get("/").data == b"n=2"
    response = client.get("/bad")
    assert response.status_code == 500 and b"n=" not in response.data
    assert stored(store, sid_of(client))["d"] == {"n": 2}


def test_middleware_error_page_after_exc_info_does_not_save(store: MmapStore) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ[ENVIRON_KEY]["n"] = 1
        try:
            raise ValueError("x")
        except ValueError:
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"error page"]

    # werkzeug's test client re-raises exc_info, so play the server here.
    sent: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        sent.append((status, headers))
        return lambda data: None

    environ = EnvironBuilder("/").get_environ()
    body = b"".join(SessionMiddleware(app, store)(environ, start_response))
    assert body == b"error page"
    [(status, headers)] = sent
    assert status.startswith("500")
    assert [v for k, v in headers if k == "Set-Cookie"] == []
    assert len(store) == 0


def test_middleware_leaves_untouched_requests_alone(store: MmapStore) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"static"]

    response = Client(SessionMiddleware(app, store)).get("/")
    assert response.data == b"static"
    assert "Vary" not in response.headers and set_cookies(response) == []


# -- the save plan: what finish() reports to the front ends ------------------------------


def test_finish_reports_the_plan_of_every_kind_of_save(store: MmapStore, clock: Clock) -> None:
    from prefork_sessions._session import Plan

    manager = SessionManager(store, SessionOptions(lifetime=100.0))

    def finish(cookies: list[str], change: Callable[[Any], None], status: int = 200) -> Any:
        session = manager.open(cookies)
        change(session)
        return session, manager.finish(session, status)

    session, saved = finish([], lambda s: None)
    assert saved == (Plan.NOTHING, "keep", 0.0, False)  # never used: no Vary either
    session, saved = finish([], lambda s: s.get("x"))
    assert saved == (Plan.NOTHING, "keep", 0.0, True)  # used, new and empty: nothing stored
    session, saved = finish([], lambda s: s.__setitem__("n", 1))
    assert saved == (Plan.WHOLE, "set", clock.now + 100.0, True)
    assert session.expires == clock.now + 100.0 and not session.new  # current after the save
    sid = session.id
    clock.now += 10
    session, saved = finish([sid], lambda s: s.__setitem__("n", 2))
    assert saved == (Plan.MERGE, "set", clock.now + 100.0, True)
    clock.now += 10
    session, saved = finish([sid], lambda s: s.get("n"))
    assert saved.plan is Plan.NOTHING and saved.cookie == "keep"  # 90 s left: above half
    clock.now += 50
    session, saved = finish([sid], lambda s: s.get("n"))
    assert saved == (Plan.REFRESH, "set", clock.now + 100.0, True)
    assert session.expires == clock.now + 100.0
    session, saved = finish([sid], lambda s: s.__setitem__("n", 3), status=503)
    assert saved.plan is Plan.NOTHING and saved.vary
    assert manager.open([sid])["n"] == 2  # a 5xx saved nothing
    session, saved = finish([sid], lambda s: s.rotate())
    assert saved.plan is Plan.WHOLE and session.id != sid
    assert manager.open([sid]).new  # the old id is gone
    sid = session.id
    late = manager.open([sid])
    late["n"] = 4
    session, saved = finish([sid], lambda s: s.invalidate())
    assert saved == (Plan.END, "expire", 0.0, True)
    assert manager.finish(late, 200) == (Plan.VANISHED, "keep", 0.0, True)
    assert manager.open([sid]).new  # the logout held: the late write brought nothing back


def test_headers_translate_the_plan(store: MmapStore, clock: Clock) -> None:
    manager = SessionManager(store, SessionOptions(lifetime=100.0))
    session = manager.open([])
    session["n"] = 1
    saved = manager.finish(session, 200)
    assert manager.headers(saved, session) == [
        ("Vary", "Cookie"), ("Set-Cookie", manager.cookie_header(session.id, clock.now + 100.0))
    ]
    ended = manager.open([session.id])
    ended.invalidate()
    assert manager.headers(manager.finish(ended, 200), ended) == [
        ("Vary", "Cookie"), ("Set-Cookie", manager.expired_cookie_header())
    ]
    unused = manager.open([session.id])
    assert manager.headers(manager.finish(unused, 200), unused) == []


def test_a_failed_save_raises_the_store_error_and_writes_nothing(store: MmapStore) -> None:
    from prefork_sessions import SerializationError

    manager = SessionManager(store, SessionOptions())
    session = manager.open([])
    session["n"] = 1
    manager.finish(session, 200)
    again = manager.open([session.id])
    again["bad"] = object()
    with pytest.raises(SerializationError):
        manager.finish(again, 200)
    assert dict(manager.open([session.id])) == {"n": 1}


def test_changes_and_merge_changes_are_the_key_level_merge() -> None:
    base = {"a": 1, "b": [1], "c": True, "gone": 0}
    mine = {"a": 1, "b": [1, 2], "c": 1, "new": "x"}
    changed, deleted = _session.changes(base, mine)
    assert sorted(changed) == ["b", "c", "new"] and deleted == ["gone"]  # True -> 1 is a change
    stored = {"a": 5, "gone": 0, "theirs": "kept"}  # a concurrent request set a and theirs
    assert _session.merge_changes(stored, mine, changed, deleted) == {
        "a": 5, "b": [1, 2], "c": 1, "new": "x", "theirs": "kept"
    }


def test_store_keys_are_one_way_and_follow_the_secret() -> None:
    sid = new_session_id()
    plain = _session.StoreKeys("p:")
    assert plain(sid) == "p:" + hashlib.sha256(sid.encode()).hexdigest()
    assert plain.fallbacks(sid) == []
    keyed = _session.StoreKeys("p:", [b"new" * 11, b"old" * 11])
    old = _session.StoreKeys("p:", [b"old" * 11])
    assert keyed(sid) != old(sid) and keyed.fallbacks(sid) == [old(sid)]
    assert sid not in keyed(sid) and len(keyed(sid)) == 2 + 64
