"""The demos' cookie contract in a real browser: headless Chromium over the DevTools protocol.

Each demo (werkzeug, Flask, Django) runs under the real ``gunicorn -c
gunicorn_conf.py``, 4 gthread workers, as a person would start it.  A browser
keeps its connections alive, so its reloads all reach the worker that accepted
the first one: the counter test adds ``--max-requests 2``, which retires every
worker after two requests (closing that connection), so the browser's next
request lands in another process, and ``--preload``, so the new workers are
forks of a master that loaded the app (and its store, reopened by post_fork)
rather than each importing Flask or Django again.

Cross-site requests come from pages served here, on loopback, by a second HTTP
server: addressed as ``localhost`` it is another site than the demo at
``127.0.0.1``; addressed as ``127.0.0.1`` (another port) it is the same site,
since a site ignores the port.  That same-site page is the control showing the
cross-site check can fail.  The browser's profile allows third-party cookies
(see ``_cdp.PREFERENCES``), so SameSite alone decides what a cross-site request
carries.

Chromium is required, not optional: without it these tests fail, saying how to
install it (``.ci/run`` does).
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from _cdp import INSTALL_HINT, CDPError, Chromium, Tab, WebSocket, find_chromium
from _live import LiveGunicorn

COOKIE_NAMES = {"werkzeug": "session_id", "flask": "session", "django": "sessionid"}
DEMOS = sorted(COOKIE_NAMES)

COUNTER = "document.getElementById('visits').textContent"
WORKER = "document.getElementById('worker').textContent"


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """One headless Chromium per test process; each test gets its own browser context."""
    binary = find_chromium()
    if binary is None:  # a failure, not a skip: CI installs it, and so should a developer
        pytest.fail(INSTALL_HINT, pytrace=False)
    with Chromium(tmp_path_factory.mktemp("chromium"), binary=binary) as browser:
        yield browser


class Demo:
    """A demo served by gunicorn, as the browser addresses it."""

    def __init__(self, name: str, server: LiveGunicorn) -> None:
        self.name, self.server = name, server
        self.cookie_name = COOKIE_NAMES[name]
        self.url = f"http://127.0.0.1:{server.port}/"


@pytest.fixture(scope="module", params=DEMOS)
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """A demo under gunicorn's default settings, shared by the tests of this process."""
    name: str = request.param
    with LiveGunicorn(
        tmp_path_factory.mktemp(f"gunicorn-{name}"), workers=4, threads=4, app=name
    ) as server:
        yield Demo(name, server)
        assert server.proc is not None and server.proc.poll() is None, server.log_tail()


@pytest.fixture
def context(chromium: Chromium) -> Iterator[str]:
    """A fresh browser context for the test."""
    with chromium.context() as context_id:
        yield context_id


class _Pages(BaseHTTPRequestHandler):
    """``/embed?port=N``: a page embedding the demo on port N as an image, and linking it."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/embed":  # the browser asks for /favicon.ico too
            self.send_error(404)
            return
        port = int(parse_qs(url.query)["port"][0])
        body = (
            "<!doctype html><title>another page</title>"
            f'<img id=probe src="http://127.0.0.1:{port}/?via=img">'
            f'<a id=go href="http://127.0.0.1:{port}/">the demo</a>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log on the test's stderr


@pytest.fixture(scope="module")
def pages_port() -> Iterator[int]:
    """The port of a loopback server for the pages that embed or link a demo."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def visit(tab: Tab, url: str) -> tuple[int, int]:
    """Load the demo's counter page; (visits, worker pid) as the page shows them."""
    tab.navigate(url)
    return int(tab.evaluate(COUNTER)), int(tab.evaluate(WORKER))


def session_cookie(tab: Tab, demo: Demo) -> dict[str, Any] | None:
    found = [c for c in tab.cookies(demo.url) if c["name"] == demo.cookie_name]
    assert len(found) <= 1, found
    return found[0] if found else None


def cookie_value(tab: Tab, demo: Demo) -> str | None:
    cookie = session_cookie(tab, demo)
    return None if cookie is None else str(cookie["value"])


@pytest.mark.parametrize("name", DEMOS)
def test_counter_counts_every_reload_across_workers(
    chromium: Chromium, name: str, tmp_path: Path
) -> None:
    with LiveGunicorn(
        tmp_path, workers=4, threads=4, preload=True, app=name, args=("--max-requests", "2")
    ) as server, chromium.context() as context:  # closed first: no idle connection to linger on
        demo = Demo(name, server)
        tab = chromium.new_tab(context)
        seen = [visit(tab, demo.url) for _ in range(8)]
    assert [visits for visits, _ in seen] == list(range(1, 9)), seen
    # A retiring worker still answers one request on each other connection the browser
    # holds to it (at most 5 more: 6 per host), so 2 + 5 < 8 visits need two processes.
    assert len({pid for _, pid in seen}) >= 2, seen


def test_session_cookie_is_httponly_and_lax(chromium: Chromium, context: str, demo: Demo) -> None:
    tab = chromium.new_tab(context)
    assert visit(tab, demo.url)[0] == 1
    # A script sees the cookies that are not HttpOnly: one it sets itself, not the session's.
    tab.evaluate("document.cookie = 'probe=visible; path=/; SameSite=Lax'")
    script_sees = tab.evaluate("document.cookie")
    assert script_sees == "probe=visible"
    cookie = session_cookie(tab, demo)
    assert cookie is not None, tab.cookies(demo.url)
    assert cookie["value"] not in script_sees
    assert cookie["httpOnly"] is True
    assert cookie.get("sameSite") == "Lax"
    assert cookie["path"] == "/"
    assert {c["name"]: c["httpOnly"] for c in tab.cookies(demo.url)} == {
        demo.cookie_name: True, "probe": False,
    }
    assert visit(tab, demo.url)[0] == 2  # and the browser does send it


def test_a_fresh_profile_gets_its_own_session(
    chromium: Chromium, context: str, demo: Demo
) -> None:
    first = chromium.new_tab(context)
    assert [visit(first, demo.url)[0] for _ in range(2)] == [1, 2]
    with chromium.context() as other_context:
        other = chromium.new_tab(other_context)
        assert session_cookie(other, demo) is None
        assert [visit(other, demo.url)[0] for _ in range(2)] == [1, 2]
        mine, theirs = cookie_value(first, demo), cookie_value(other, demo)
        assert mine is not None and theirs is not None and mine != theirs
    assert visit(first, demo.url)[0] == 3


def test_a_logged_out_id_replayed_is_not_honoured(
    chromium: Chromium, context: str, demo: Demo
) -> None:
    tab = chromium.new_tab(context)
    assert [visit(tab, demo.url)[0] for _ in range(3)] == [1, 2, 3]
    old = session_cookie(tab, demo)
    assert old is not None
    tab.navigate(demo.url + "logout")
    assert session_cookie(tab, demo) is None  # the server expired it
    tab.call("Network.setCookie", {
        "name": old["name"], "value": old["value"], "url": demo.url, "path": "/",
        "httpOnly": True, "sameSite": "Lax",
    })
    replayed = session_cookie(tab, demo)
    assert replayed is not None and replayed["value"] == old["value"]
    assert visit(tab, demo.url)[0] == 1  # a new session: the old one's 3 visits are gone
    now = session_cookie(tab, demo)
    assert now is not None and now["value"] != old["value"]
    assert visit(tab, demo.url)[0] == 2


def image_request(tab: Tab, demo: Demo) -> tuple[list[str], int]:
    """For the ``#probe`` image the last page loaded: Chromium's reasons for not sending
    the session cookie with it ([] if sent), and the demo's HTTP status for it."""
    sent = tab.conn.wait_event(
        "Network.requestWillBeSent", session=tab.session,
        match=lambda e: bool(e["request"]["url"].endswith("/?via=img")),
    )
    def same(e: dict[str, Any]) -> bool:
        return bool(e["requestId"] == sent["requestId"])

    request = tab.conn.wait_event("Network.requestWillBeSentExtraInfo", session=tab.session, match=same)
    response = tab.conn.wait_event("Network.responseReceivedExtraInfo", session=tab.session, match=same)
    reasons = [c["blockedReasons"] for c in request["associatedCookies"]
               if c["cookie"]["name"] == demo.cookie_name]
    assert len(reasons) == 1, request["associatedCookies"]
    return reasons[0], int(response["statusCode"])


def test_lax_cookie_is_withheld_from_cross_site_subresources(
    chromium: Chromium, context: str, demo: Demo, pages_port: int
) -> None:
    tab = chromium.new_tab(context)
    assert [visit(tab, demo.url)[0] for _ in range(2)] == [1, 2]
    cookie = cookie_value(tab, demo)
    assert cookie is not None
    cross_site = f"http://localhost:{pages_port}/embed?port={demo.server.port}"
    same_site = f"http://127.0.0.1:{pages_port}/embed?port={demo.server.port}"

    # Another site embeds the demo as an image: the request reaches the demo, without the cookie.
    tab.navigate(cross_site)
    assert image_request(tab, demo) == (["SameSiteLax"], 200)
    assert visit(tab, demo.url)[0] == 3  # that request counted nothing in this session
    assert cookie_value(tab, demo) == cookie  # nor replaced the cookie

    # The control: the same image on a page of the demo's own site carries it.
    tab.navigate(same_site)
    assert image_request(tab, demo) == ([], 200)
    assert visit(tab, demo.url)[0] == 5

    # Lax lets a top-level GET from another site carry the cookie: a link followed.
    tab.navigate(cross_site)
    tab.click_and_wait("#go")
    assert tab.evaluate("location.href") == demo.url
    assert int(tab.evaluate(COUNTER)) == 6
    assert cookie_value(tab, demo) == cookie


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def _client_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of one frame from the client; AssertionError unless masked."""
    def take(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the client closed the connection"
            data += chunk
        return data

    first, second = take(2)
    assert second & 0x80, "a client frame must be masked"
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", take(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", take(8))
    mask, payload = take(4), take(n)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_the_devtools_websocket_client_speaks_rfc_6455() -> None:
    # Chromium's own frames are small and whole; a scripted peer sends what else the
    # protocol allows: 16- and 64-bit lengths, a fragmented message with a ping inside.
    medium, large = "m" * 300, "L" * 70_000
    sent = "\u00e9t\u00e9 " * 40  # over 125 bytes: a 16-bit length from the client
    received: list[tuple[int, bytes]] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def peer() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(  # the first frames in the same packet as the handshake's answer
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                + _server_frame(0x1, b"small") + _server_frame(0x1, medium.encode())
                + _server_frame(0x1, large.encode())
                + _server_frame(0x1, b"one ", fin=False) + _server_frame(0x9, b"hi")
                + _server_frame(0x0, b"two ", fin=False) + _server_frame(0x0, b"three")
            )
            received.append(_client_frame(conn))  # the pong
            received.append(_client_frame(conn))  # the text the client sends
            conn.sendall(_server_frame(0x8, struct.pack("!H", 1000)))

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    try:
        ws = WebSocket("127.0.0.1", listener.getsockname()[1], "/devtools/browser/x", timeout=10)
        try:
            assert [ws.recv_text(10) for _ in range(3)] == ["small", medium, large]
            assert ws.recv_text(10) == "one two three"
            ws.send_text(sent)
            with pytest.raises(CDPError, match="closed"):
                ws.recv_text(10)
        finally:
            ws.close()
        thread.join(10)
    finally:
        listener.close()
    assert received == [(0xA, b"hi"), (0x1, sent.encode())]
