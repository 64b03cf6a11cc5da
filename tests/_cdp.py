"""A headless Chromium driven over the Chrome DevTools Protocol, with no dependency.

The protocol is JSON over a websocket; the websocket client here is the least of
RFC 6455 a DevTools endpoint needs: the opening handshake, masked client text
frames, and server frames of any length (7-, 16- and 64-bit), fragmented or not,
with pings answered and a close frame honoured.

One Chromium per ``Chromium`` object, with a fresh profile in its work directory,
in its own process group that ``stop()`` always kills.  Its host resolver maps
every name but ``localhost`` and ``127.0.0.1`` to nothing and its background
services are off, so a test's traffic stays on loopback.  Tabs are attached in
flat mode: one websocket carries every tab's commands and events, each tagged
with its ``sessionId``.

    with Chromium(tmp_path) as chromium:
        with chromium.context() as context:
            tab = chromium.new_tab(context)
            tab.navigate("http://127.0.0.1:8000/")
            title = tab.evaluate("document.title")
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_MESSAGE = 64 << 20  # a DevTools answer bigger than this is a bug, not data

INSTALL_HINT = (
    "Chromium is not installed: apt-get install -y --no-install-recommends chromium "
    "(Debian's package, /usr/bin/chromium; .ci/run installs it), or set CHROMIUM to its path"
)

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the sandbox refuses to run as root, as CI does
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers' /dev/shm is small
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,MediaRouter,OptimizationHints,DialMediaRouteProvider",
    "--metrics-recording-only",
    "--no-pings",
    "--mute-audio",
    "--password-store=basic",
    "--no-proxy-server",
    # Nothing but loopback: any other name fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # the port Chromium picks is written to DevToolsActivePort
)


# Third-party cookies allowed, in private contexts too (Chromium blocks them there by
# default, mode 2): then a cookie's SameSite alone decides whether a cross-site request
# carries it, which is what a test of SameSite needs.
PREFERENCES = {"profile": {"cookie_controls_mode": 0}}


def find_chromium() -> str | None:
    """The Chromium to run: ``$CHROMIUM`` if set, else ``chromium`` on PATH; None if not executable."""
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium")
    return binary if binary and os.access(binary, os.X_OK) else None


class CDPError(RuntimeError):
    """A DevTools command failed, timed out, or the connection broke."""


class WebSocket:
    """A blocking RFC 6455 client for one ``ws://`` endpoint on loopback."""

    def __init__(self, host: str, port: int, path: str, *, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = bytearray()
        self.closed = False
        try:
            self._handshake(f"{host}:{port}", path)
        except BaseException:
            self._sock.close()
            raise

    def _handshake(self, host: str, path: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self._buf:
            self._fill()
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        self._buf = bytearray(rest)  # a first frame may follow the headers at once
        status, *lines = head.decode("latin1").split("\r\n")
        if status.split(" ")[1:2] != ["101"]:
            raise CDPError(f"websocket handshake to {host}{path} refused: {status!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        want = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != want:
            raise CDPError(f"websocket handshake to {host}{path}: bad Sec-WebSocket-Accept")

    def _fill(self) -> None:
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            self.closed = True
            raise CDPError("the DevTools websocket was closed by Chromium")
        self._buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)  # clients must mask every frame (section 5.3)
        self._sock.sendall(head + mask + _xor(payload, mask))

    def send_text(self, text: str) -> None:
        self._send_frame(_TEXT, text.encode())

    def recv_text(self, timeout: float) -> str:
        """The next text (or binary, decoded) message; CDPError on close or timeout.

        A timeout may cut a frame in two, so it closes the websocket.
        """
        self._sock.settimeout(max(timeout, 0.001))
        try:
            return self._recv_message()
        except TimeoutError:
            self.close()
            raise CDPError(f"no DevTools message within {timeout:.1f} s") from None

    def _recv_message(self) -> str:
        parts: list[bytes] = []
        size = 0
        while True:
            b0, b1 = self._take(2)
            fin, opcode, masked, n = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8))
            if n > _MAX_MESSAGE:
                raise CDPError(f"a websocket frame of {n} bytes: over {_MAX_MESSAGE}")
            mask = self._take(4) if masked else b""
            payload = self._take(n)
            if mask:
                payload = _xor(payload, mask)
            if opcode == _PING:  # control frames may come between fragments
                self._send_frame(_PONG, payload)
                continue
            if opcode == _PONG:
                continue
            if opcode == _CLOSE:
                self.closed = True
                raise CDPError(f"Chromium closed the DevTools websocket: {payload[2:]!r}")
            if opcode not in (_CONT, _TEXT, _BINARY) or (opcode == _CONT) != bool(parts):
                raise CDPError(f"websocket protocol error: opcode {opcode} out of place")
            parts.append(payload)
            size += n
            if size > _MAX_MESSAGE:
                raise CDPError(f"a websocket message over {_MAX_MESSAGE} bytes")
            if fin:
                return b"".join(parts).decode()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._send_frame(_CLOSE, struct.pack("!H", 1000))
            except OSError:
                pass
        self._sock.close()


def _xor(data: bytes, mask: bytes) -> bytes:
    # One big-integer XOR instead of a Python loop over every byte.
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class Connection:
    """DevTools commands and events over one websocket; events are kept until asked for."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._next_id = 0
        self._events: deque[dict[str, Any]] = deque()

    def call(
        self, method: str, params: dict[str, Any] | None = None, *,
        session: str | None = None, timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Send one command and return its result; CDPError with Chromium's message if it fails."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._ws.send_text(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, f"{method} (no answer)")
            if reply.get("id") != self._next_id:
                self._events.append(reply)
                continue
            if "error" in reply:
                raise CDPError(f"{method} {params!r}: {reply['error']}")
            result: dict[str, Any] = reply.get("result", {})
            return result

    def wait_event(
        self, method: str, *, session: str | None = None,
        match: Callable[[dict[str, Any]], bool] = lambda params: True, timeout: float = 10.0,
    ) -> dict[str, Any]:
        """The params of the first (kept or next) event ``method`` from ``session`` that
        ``match`` accepts; it is removed from the kept events."""
        def wanted(event: dict[str, Any]) -> bool:
            return (event.get("method") == method and event.get("sessionId") == session
                    and match(event.get("params", {})))

        for event in list(self._events):
            if wanted(event):
                self._events.remove(event)
                return dict(event.get("params", {}))
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline, f"event {method}")
            if wanted(event):
                return dict(event.get("params", {}))
            self._events.append(event)

    def forget(self, session: str | None) -> None:
        """Drop the events kept for ``session``."""
        self._events = deque(e for e in self._events if e.get("sessionId") != session)

    def _read(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CDPError(f"timed out waiting for {waiting_for}")
        try:
            message: dict[str, Any] = json.loads(self._ws.recv_text(left))
        except CDPError as e:
            raise CDPError(f"waiting for {waiting_for}: {e}") from None
        return message

    def close(self) -> None:
        self._ws.close()


class Tab:
    """One page target, attached in flat mode, with Page and Network events on."""

    def __init__(self, conn: Connection, session: str) -> None:
        self.conn, self.session = conn, session

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.conn.call(method, params, session=self.session, **kw)

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        """Load ``url`` and wait for its load event (images included); CDPError if it fails."""
        self.conn.forget(self.session)
        result = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        self.conn.wait_event("Page.loadEventFired", session=self.session, timeout=timeout)

    def click_and_wait(self, selector: str, timeout: float = 15.0) -> None:
        """Click the element ``selector`` (a link) and wait for the page it leads to."""
        self.conn.forget(self.session)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self.conn.wait_event("Page.loadEventFired", session=self.session, timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 10.0) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def cookies(self, url: str) -> list[dict[str, Any]]:
        """Every cookie the browser would send to ``url``, HttpOnly ones included."""
        found: list[dict[str, Any]] = self.call("Network.getCookies", {"urls": [url]})["cookies"]
        return found


class Chromium:
    """One headless Chromium with a fresh profile under ``workdir``; a context manager."""

    def __init__(
        self, workdir: str | os.PathLike[str], *, binary: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.profile = self.workdir / "profile"
        self.log_path = self.workdir / "chromium.log"
        self.binary = binary or find_chromium()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise CDPError("Chromium is not started")
        return self._conn

    def start(self) -> Chromium:
        if self.binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.profile.mkdir(parents=True)
        (self.profile / "Default").mkdir()
        (self.profile / "Default" / "Preferences").write_text(json.dumps(PREFERENCES))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() kills every helper process
            )
        try:
            port, path = self._wait_port()
            self._conn = Connection(WebSocket("127.0.0.1", port, path))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_port(self) -> tuple[int, str]:
        active = self.profile / "DevToolsActivePort"  # "<port>\n/devtools/browser/<id>"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise CDPError(f"Chromium exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                port, path = active.read_text().split()[:2]
                return int(port), path
            except (FileNotFoundError, ValueError):  # not there, or half written
                time.sleep(0.05)
        raise CDPError(f"Chromium wrote no {active} in {self.start_timeout} s:\n{self.log_tail()}")

    @contextlib.contextmanager
    def context(self) -> Iterator[str]:
        """A new browser context, disposed of on exit (closing its connections): a cookie
        jar, cache and sockets of its own, like a fresh private profile."""
        context: str = self.conn.call("Target.createBrowserContext")["browserContextId"]
        try:
            yield context
        finally:
            if self._conn is not None:
                self._conn.call("Target.disposeBrowserContext", {"browserContextId": context})

    def new_tab(self, context: str) -> Tab:
        """A blank tab in ``context``, cache disabled, Page and Network events on."""
        target = self.conn.call(
            "Target.createTarget", {"url": "about:blank", "browserContextId": context}
        )["targetId"]
        session = self.conn.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}
        )["sessionId"]
        tab = Tab(self.conn, session)
        tab.call("Page.enable")
        tab.call("Network.enable")
        tab.call("Network.setCacheDisabled", {"cacheDisabled": True})
        return tab

    def stop(self) -> None:
        """Close the connection and kill Chromium's process group (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # renderers and the zygote may outlive the browser process
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Chromium:  # noqa: PYI034
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
