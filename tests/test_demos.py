"""The three demos (werkzeug, Flask, Django) as a browser and curl meet them, through
werkzeug's test client on a real store file.

Each demo opens its store (and the Django one configures Django's settings) when
it is imported, so each runs in a subprocess of its own, with
``PREFORK_SESSIONS_PATH`` naming a file in a temporary directory: a small driver
there takes one request a line on stdin (which client, path, headers) and
answers with the response as JSON.  Clients are werkzeug ``Client``\\ s with
cookie jars, named by the test; a fresh name is a fresh browser.  Nothing here
imports Django's settings into the pytest process, where tests/test_django.py
configures its own.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from werkzeug.http import parse_cookie

DRIVER = r"""
import importlib, json, sys
from werkzeug.test import Client

module, name, cookie_name = sys.argv[1:4]
app = getattr(importlib.import_module(module), name)
clients = {}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    ask = json.loads(line)
    client = clients.get(ask["client"])
    if client is None:
        client = clients[ask["client"]] = Client(app)
        if ask.get("cookie") is not None:
            client.set_cookie(cookie_name, ask["cookie"])
    response = client.get(ask["path"], headers=ask["headers"])
    jar = client.get_cookie(cookie_name)
    print(json.dumps({
        "status": response.status_code,
        "headers": list(response.headers.items()),
        "body": response.get_data(as_text=True),
        "cookie": None if jar is None else jar.value,
    }), flush=True)
"""

# What browsers send for a page load (Firefox, then Chromium).
BROWSER_ACCEPTS = [
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
     "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"),
]
JSON_ACCEPTS = [None, "*/*", "application/json"]
HEADINGS = {  # the page each path names
    "/": "Visits in this session",
    "/login": "Logged in",
    "/logout": "Logged out",
    "/stats": "The store's counters",
}
REPLY_TIMEOUT = 30.0  # seconds for the driver to start or answer one request


@dataclass(frozen=True)
class Demo:
    framework: str  # as the pages name it
    target: str  # module:name of the WSGI app
    cookie_name: str

    def session_id(self, cookie: str) -> str:
        """The session id a cookie value carries (Flask's cookie adds a tag after a dot)."""
        return cookie.split(".", 1)[0] if self.framework == "Flask" else cookie


DEMOS = [
    Demo("werkzeug", "prefork_sessions.demo:app", "session_id"),
    Demo("Flask", "prefork_sessions.demo_flask:app", "session"),
    Demo("Django", "prefork_sessions.demo_django:application", "sessionid"),
]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: str
    cookie: str | None  # the client's session cookie after the response

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def vary(self) -> set[str]:
        return {v.strip().lower() for h in self.headers.get_all("Vary", []) for v in h.split(",")}

    def json(self) -> Any:
        assert self.content_type == "application/json", (self.content_type, self.body[:300])
        return json.loads(self.body)

    def visits_shown(self) -> int:
        """The count an HTML page shows in its <output id=visits>."""
        found = re.findall(r"<output id=visits>(\d+)</output>", self.body)
        assert len(found) == 1, self.body
        return int(found[0])

    def session_cookies(self, name: str) -> list[str]:
        # Django's headers start with a space (SimpleCookie's output)
        found = (h.strip() for h in self.headers.get_all("Set-Cookie", []))
        return [h for h in found if h.startswith(f"{name}=")]


class DemoProcess:
    """One demo app imported in a subprocess, driven one request at a time."""

    def __init__(self, demo: Demo, workdir: Path) -> None:
        self.demo = demo
        env = {k: v for k, v in os.environ.items()
               if k not in ("DJANGO_SETTINGS_MODULE", "PREFORK_SESSIONS_REDIS_URL")}
        env.update(PREFORK_SESSIONS_PATH=str(workdir / "sessions.store"),
                   PREFORK_SESSIONS_SIZE=str(4 << 20))
        self.stderr_path = workdir / "stderr.txt"
        module, name = demo.target.split(":")
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", DRIVER, module, name, demo.cookie_name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True,
            )
        assert self._read() == {"ready": True}

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if ready:  # end of file: the driver is exiting
                self.proc.wait(timeout=REPLY_TIMEOUT)
            raise AssertionError(
                f"the {self.demo.framework} demo's driver gave no answer (exit status "
                f"{self.proc.poll()}):\n{self.stderr_path.read_text()[-4000:]}"
            )
        return json.loads(line)

    def get(self, client: str, path: str, accept: str | None = None,
            cookie: str | None = None) -> Reply:
        """GET ``path`` as ``client`` (made on first use, holding ``cookie`` if given)."""
        assert self.proc.stdin is not None
        headers = {} if accept is None else {"Accept": accept}
        ask = {"client": client, "path": path, "headers": headers, "cookie": cookie}
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()
        raw = self._read()
        headers_out = Message()
        for k, v in raw["headers"]:
            headers_out[k] = v
        return Reply(raw["status"], headers_out, raw["body"], raw["cookie"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            assert self.proc.stdout is not None
            self.proc.stdout.close()


@pytest.fixture(scope="module", params=DEMOS, ids=[d.framework for d in DEMOS])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[DemoProcess]:
    process = DemoProcess(request.param, tmp_path_factory.mktemp(request.param.framework))
    yield process
    process.close()


def fresh() -> str:
    """A new client name: a browser with an empty cookie jar."""
    return uuid.uuid4().hex


def expires_cookie(header: str) -> bool:
    """Whether a Set-Cookie header tells the browser to drop the cookie now."""
    lowered = header.lower()
    return "max-age=0" in lowered or "expires=thu, 01 jan 1970" in lowered


@pytest.mark.parametrize("accept", JSON_ACCEPTS, ids=["no-accept", "any", "json"])
def test_clients_that_do_not_ask_for_html_get_json(demo: DemoProcess, accept: str | None) -> None:
    client = fresh()
    first = demo.get(client, "/", accept)
    assert first.status == 200
    assert first.json() == {"visits": 1, "worker": demo.proc.pid, "logged_in": False}
    assert {"accept", "cookie"} <= first.vary
    assert first.cookie is not None
    assert demo.get(client, "/", accept).json()["visits"] == 2
    stats = demo.get(client, "/stats", accept)
    assert stats.status == 200 and "accept" in stats.vary
    assert stats.json()["entries"] >= 1  # this session, at least
    for path, expected in [("/login", {"logged_in": True}), ("/logout", {"logged_in": False})]:
        reply = demo.get(client, path, accept)
        assert reply.status == 200
        assert reply.json() == {**expected, "worker": demo.proc.pid}
        assert {"accept", "cookie"} <= reply.vary


@pytest.mark.parametrize("accept", BROWSER_ACCEPTS, ids=["firefox", "chromium"])
def test_a_browser_gets_pages_that_name_themselves_and_link_the_others(
    demo: DemoProcess, accept: str
) -> None:
    client = fresh()
    seen_ids: set[str] = set()
    replies = []
    for visits in (1, 2, 3):
        reply = demo.get(client, "/", accept)
        assert reply.visits_shown() == visits
        assert reply.cookie is not None
        seen_ids.add(reply.cookie)
        replies.append(("/", reply))
    for path in ("/stats", "/login", "/"):
        reply = demo.get(client, path, accept)
        assert reply.cookie is not None
        seen_ids.add(reply.cookie)
        replies.append((path, reply))
    assert replies[-1][1].visits_shown() == 4  # the login kept the count
    replies.append(("/logout", demo.get(client, "/logout", accept)))
    assert len({demo.demo.session_id(c) for c in seen_ids}) == 2  # before and after the login

    for path, reply in replies:
        assert reply.status == 200, (path, reply.body[:300])
        assert reply.content_type.startswith("text/html"), (path, reply.content_type)
        body = reply.body
        assert body.startswith("<!doctype html>")
        assert f"<title>prefork_sessions {demo.demo.framework} demo</title>" in body
        assert f"<h2>{HEADINGS[path]}" in body, (path, body)
        for link in HEADINGS:
            assert f'<a href="{link}">' in body, (path, link)
        assert f"<span id=worker>{demo.proc.pid}</span>" in body
        for cookie in seen_ids:  # nothing on the page gives the session id away
            assert cookie not in body and demo.demo.session_id(cookie) not in body, path
        assert "accept" in reply.vary, path
        if path != "/stats":  # the pages that use the session
            assert "cookie" in reply.vary, path


def test_the_counter_counts_login_rotates_the_id_and_logout_is_not_undone_by_a_replay(
    demo: DemoProcess,
) -> None:
    name = demo.demo.cookie_name
    client = fresh()
    assert [demo.get(client, "/").json()["visits"] for _ in range(3)] == [1, 2, 3]
    before = demo.get(client, "/").cookie
    assert before is not None

    login = demo.get(client, "/login")
    assert login.json()["logged_in"] is True
    after = login.cookie
    assert after is not None and login.session_cookies(name)
    assert demo.demo.session_id(after) != demo.demo.session_id(before)
    assert demo.get(client, "/").json() == {"visits": 5, "worker": demo.proc.pid, "logged_in": True}
    # The id from before the login no longer opens the session.
    assert demo.get(fresh(), "/", cookie=before).json() == {
        "visits": 1, "worker": demo.proc.pid, "logged_in": False}

    logout = demo.get(client, "/logout")
    assert logout.json()["logged_in"] is False
    [expired] = logout.session_cookies(name)
    assert expires_cookie(expired), expired
    assert parse_cookie(expired.split(";", 1)[0]).get(name) == ""
    assert logout.cookie is None  # the client dropped it
    replay = fresh()
    assert demo.get(replay, "/", cookie=after).json() == {
        "visits": 1, "worker": demo.proc.pid, "logged_in": False}
    assert demo.get(replay, "/").json()["visits"] == 2  # a new session of its own
    assert demo.demo.session_id(demo.get(replay, "/").cookie or "") not in (
        demo.demo.session_id(before), demo.demo.session_id(after))
    assert demo.get(client, "/").json()["visits"] == 1  # the logged-out browser starts over


def test_two_browsers_count_apart(demo: DemoProcess) -> None:
    one, two = fresh(), fresh()
    counts = [demo.get(c, "/").json()["visits"] for c in (one, one, two, one, two)]
    assert counts == [1, 2, 1, 3, 2]


@pytest.mark.parametrize("accept", [None, BROWSER_ACCEPTS[0]], ids=["json", "html"])
def test_an_unknown_path_is_not_found(demo: DemoProcess, accept: str | None) -> None:
    client = fresh()
    assert demo.get(client, "/").status == 200
    for path in ("/nope", "/login/extra", "/stats.json"):
        assert demo.get(client, path, accept).status == 404, path
    assert demo.get(client, "/").json()["visits"] == 2  # a 404 counted nothing
