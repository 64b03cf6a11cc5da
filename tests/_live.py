"""A real ``gunicorn -c gunicorn_conf.py`` on a loopback port, for tests and stress programs.

The listening socket is bound here (port 0, so the kernel picks a free port)
and handed to gunicorn as ``fd://N``: parallel instances never race for a port.
Each instance has no control socket (gunicorn 27 would share
``~/.gunicorn/gunicorn.ctl``), logs to a file in its work directory, and is
always stopped: SIGTERM, then SIGKILL to its whole process group.

    with LiveGunicorn(tmp_path, workers=4, threads=1, preload=False) as server:
        browser = Browser(server)
        status, headers, body = browser.get("/")
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "gunicorn_conf.py"


class LiveGunicorn:
    """One gunicorn master with its workers; a context manager.

    ``workers``, ``threads``, ``preload`` and the store file go through the
    environment variables gunicorn_conf.py reads; ``args`` are extra gunicorn
    command-line options.  ``start()`` raises RuntimeError (with the log's
    tail) if no HTTP response arrives within ``ready_timeout`` seconds.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        workers: int = 4,
        threads: int = 1,
        preload: bool = False,
        app: str | None = None,
        store_path: str | os.PathLike[str] | None = None,
        store_size: int = 4 << 20,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store_path = Path(store_path) if store_path else self.workdir / "sessions.store"
        self.log_path = self.workdir / "gunicorn.log"
        self.ready_timeout = ready_timeout
        self.env = dict(os.environ)
        self.env.update(
            PREFORK_SESSIONS_WORKERS=str(workers),
            PREFORK_SESSIONS_THREADS=str(threads),
            PREFORK_SESSIONS_PRELOAD="1" if preload else "0",
            PREFORK_SESSIONS_PATH=str(self.store_path),
            PREFORK_SESSIONS_SIZE=str(store_size),
            PYTHONUNBUFFERED="1",
        )
        if app is not None:
            self.env["PREFORK_SESSIONS_APP"] = app
        self.env.update(env or {})
        self.args = args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveGunicorn:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        fd = listener.fileno()
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(CONF),
            "--bind",
            f"fd://{fd}",
            "--no-control-socket",
            "--graceful-timeout",
            "5",
            "--timeout",
            "30",
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(fd,),
                start_new_session=True,
            )
        listener.close()  # gunicorn holds its own copy
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                request(self.port, "/__ready__", timeout=1.0)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(
            f"gunicorn answered nothing in {self.ready_timeout} s:\n{self.log_tail()}"
        )

    def stop(self) -> int | None:
        """Stop the server (idempotent); return its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:  # workers that outlived the master, or everything if it hung
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=15)
        return proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> LiveGunicorn:  # noqa: PYI034
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def request(
    port: int,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 10.0,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a new connection (so any worker may take it); (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


class Browser:
    """A client that keeps the session cookie between requests, one connection each."""

    def __init__(self, server: LiveGunicorn, cookie_name: str = "session_id") -> None:
        self.port = server.port
        self.cookie_name = cookie_name
        self.cookie: str | None = None
        self.set_cookie_headers: list[str] = []

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, http.client.HTTPMessage, bytes]:
        headers = {"Cookie": f"{self.cookie_name}={self.cookie}"} if self.cookie else {}
        status, response_headers, body = request(self.port, path, headers=headers, timeout=timeout)
        for header in response_headers.get_all("Set-Cookie") or []:
            self.set_cookie_headers.append(header)
            name, _, rest = header.partition("=")
            if name.strip() != self.cookie_name:
                continue
            value = rest.split(";", 1)[0]
            self.cookie = None if "max-age=0" in header.lower() or not value else value
        return status, response_headers, body

    def json(self, path: str) -> Any:
        """GET ``path`` and decode its JSON body; AssertionError unless the status is 200."""
        status, _, body = self.get(path)
        if status != 200:
            raise AssertionError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body)
