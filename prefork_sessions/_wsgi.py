"""The two ways to give a WSGI app sessions: the ``with_session`` decorator for
werkzeug-style ``app(request) -> Response`` functions, and ``SessionMiddleware``
for any WSGI application.

Both save when the response starts, so the cookie can go out with its headers:
nothing is saved for a 5xx response or when an exception escapes the app, and a
save that fails (an unserialisable value, say) turns the response into a 500.
A store that cannot be reached (StoreUnavailableError: Redis went away), while
the session loads or saves, turns it into a 503 with ``Retry-After``; the next
request tries the store again, so service resumes by itself when it returns.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable
from werkzeug.wrappers import Request, Response

from ._errors import SessionStoreError, StoreUnavailableError
from ._session import (
    Session,
    SessionManager,
    SessionOptions,
    SessionStore,
    request_cookie_values,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ENVIRON_KEY", "RETRY_AFTER", "SessionMiddleware", "SessionRequest", "with_session"]

log = logging.getLogger("prefork_sessions")

RETRY_AFTER = 5
"""Seconds a 503 for an unreachable store asks the client to wait (``Retry-After``)."""

ENVIRON_KEY = "prefork_sessions.session"
"""Where SessionMiddleware puts the request's :class:`Session` in the WSGI environ."""

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


class SessionRequest(Request):
    """A werkzeug Request with the session attached (what ``with_session`` passes)."""

    session: Session


def with_session(
    store: SessionStore, **options: Any
) -> Callable[[Callable[..., Response]], WSGIApplication]:
    """Turn ``f(request) -> Response`` into a WSGI application with ``request.session``.

    Shaped like werkzeug's ``Request.application``: an HTTPException raised by
    ``f`` becomes its response, and ``f`` may be a method (``self, request``).
    ``options`` are :class:`SessionOptions` fields (TypeError for unknown
    names, InvalidArgumentError, also a ValueError, for bad values).  The
    wrapped app's ``session_store`` attribute is ``store``, so a gunicorn
    ``post_fork`` hook can reopen it.
    """
    manager = SessionManager(store, SessionOptions(**options))
    cookie_name = manager.options.cookie_name

    def decorator(f: Callable[..., Response]) -> WSGIApplication:
        @functools.wraps(f)
        def application(*args: Any) -> Iterable[bytes]:
            environ: WSGIEnvironment = args[-2]
            start_response: StartResponse = args[-1]
            request = SessionRequest(environ)
            session = manager.open(request_cookie_values(environ.get("HTTP_COOKIE"), cookie_name))
            request.session = session
            with request:
                try:
                    response = f(*args[:-2], request)
                except HTTPException as e:
                    response = e.get_response(environ)
                except StoreUnavailableError as e:  # the session could not load
                    return _unavailable(e).get_response(environ)(environ, start_response)
                if not isinstance(response, Response):
                    response = Response.force_type(response, environ)
                try:
                    extra = manager.headers(manager.finish(session, response.status_code), session)
                except StoreUnavailableError as e:
                    response = _unavailable(e).get_response(environ)
                    extra = []
                except SessionStoreError:  # logged by the manager; nothing was written
                    response = InternalServerError().get_response(environ)
                    extra = []
                if extra:
                    # Added to the final header list, not to response.headers: werkzeug's
                    # Headers cost several microseconds a call (and raise and catch a
                    # KeyError for every absent header looked up).
                    def start_with_session(
                        status: str, headers: list[tuple[str, str]], *exc_info: Any
                    ) -> Callable[[bytes], object]:
                        return start_response(status, _with_headers(headers, extra), *exc_info)

                    return response(environ, start_with_session)
                return response(environ, start_response)

        application.session_store = store  # type: ignore[attr-defined]
        return application

    return decorator


class SessionMiddleware:
    """Wrap any WSGI ``app`` so each request's :class:`Session` is in
    ``environ["prefork_sessions.session"]``.

    The session is saved when the app calls ``start_response`` and the cookie
    added to its headers; changes made after that are not saved.  ``options``
    are :class:`SessionOptions` fields.
    """

    def __init__(self, app: WSGIApplication, store: SessionStore, **options: Any) -> None:
        self.app = app
        self.session_store = store
        self.manager = SessionManager(store, SessionOptions(**options))
        self.cookie_name = self.manager.options.cookie_name

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        cookies = request_cookie_values(environ.get("HTTP_COOKIE"), self.cookie_name)
        session = self.manager.open(cookies)
        environ[ENVIRON_KEY] = session
        call = _Call(self.manager, session, start_response)
        try:
            app_iter = self.app(environ, call.start_response)  # an exception here saves nothing
        except StoreUnavailableError as e:  # the session could not load
            if call.started:
                raise  # the app's own response has begun: nothing else can be sent
            return _unavailable(e).get_response(environ)(environ, start_response)
        if call.failed:
            _close(app_iter)
            return call.error_body()
        if call.started:
            return app_iter
        return _Body(app_iter, call)  # start_response will come with the first chunk


class _Call:
    """One request's wrapped ``start_response``: saves, then adds the headers."""

    def __init__(self, manager: SessionManager, session: Session, start_response: StartResponse):
        self.manager, self.session, self.outer = manager, session, start_response
        self.started = self.failed = False
        self.error: HTTPException = InternalServerError()  # what a failed save answers

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None or self.started:
            # The app is replacing its response after an error: never save for it.
            return self.outer(status, headers, exc_info)
        self.started = True
        try:
            code = int(status.split(None, 1)[0])
        except (ValueError, IndexError):  # not "NNN reason": the server will refuse it anyway
            code = 500
        try:
            extra = self.manager.headers(self.manager.finish(self.session, code), self.session)
        except SessionStoreError as e:  # logged by the manager; nothing was written
            self.failed = True
            self.error = _unavailable(e) if isinstance(e, StoreUnavailableError) else InternalServerError()
            self.outer(f"{self.error.code} {self.error.name.upper()}", self._error_headers())
            return lambda data: None  # the app's own body is dropped
        return self.outer(status, _with_headers(headers, extra) if extra else headers)

    def _error_headers(self) -> list[tuple[str, str]]:
        body = self.error_body()[0]
        return [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                *self.error.get_headers()[1:]]  # Retry-After for a 503

    def error_body(self) -> list[bytes]:
        return [self.error.get_body().encode()]


class _Body:
    """The app's body when it calls start_response lazily (from its first chunk)."""

    def __init__(self, app_iter: Iterable[bytes], call: _Call) -> None:
        self.app_iter, self.call = app_iter, call

    def __iter__(self) -> Iterator[bytes]:
        it = iter(self.app_iter)
        for chunk in it:
            if self.call.failed:
                yield from self.call.error_body()
                return
            yield chunk
            break
        if self.call.failed:  # start_response came with an empty body
            yield from self.call.error_body()
            return
        yield from it

    def close(self) -> None:
        _close(self.app_iter)


def _unavailable(e: StoreUnavailableError) -> ServiceUnavailable:
    """The 503 for a request whose session store cannot be reached, logged once."""
    log.error("session store unavailable, answering 503 (Retry-After: %d): %s", RETRY_AFTER, e)
    return ServiceUnavailable(retry_after=RETRY_AFTER)


def _close(app_iter: Iterable[bytes]) -> None:
    close = getattr(app_iter, "close", None)
    if close is not None:
        close()


def _with_headers(
    headers: list[tuple[str, str]], extra: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """A copy of ``headers`` with ``extra`` added, Vary merged into an existing Vary
    header the way werkzeug's ``Headers.set`` would (the first one replaced, the
    others removed)."""
    out = list(headers)
    for name, value in extra:
        if name != "Vary":
            out.append((name, value))
            continue
        for index, (key, current) in enumerate(out):
            if len(key) == 4 and key.lower() == "vary":
                break
        else:
            out.append((name, value))
            continue
        if not current:
            merged = value
        elif current.strip() != "*" and value.lower() not in (
            token.strip().lower() for token in current.split(",")
        ):
            merged = f"{current}, {value}"
        else:
            continue
        out[index + 1 :] = [(k, v) for k, v in out[index + 1 :] if k.lower() != "vary"]
        out[index] = (name, merged)
    return out
