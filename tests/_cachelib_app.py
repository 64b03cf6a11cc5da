"""A Flask + Flask-Caching app on prefork_sessions.cachelib.MmapCache, for tests/test_cachelib.py,
served by real gunicorn: ``PREFORK_SESSIONS_APP=_cachelib_app:create_app()`` with
``--pythonpath tests``.  The cache file is ``PREFORK_CACHELIB_TEST_PATH``.

Every response says which worker served it in ``X-Worker``.

    /cached    a view cached for 300 s: {"computed_by": pid, "computation": n}, where n
               counts (in the cache, atomically) how often the view body ran
    /inc       cache.inc("hits"): {"value": n}
    /get/<key> cache.get(key): {"value": ...}
"""

from __future__ import annotations

import os
from typing import Any

PATH_ENV = "PREFORK_CACHELIB_TEST_PATH"


def create_app() -> Any:
    from flask import Flask, Response, jsonify
    from flask_caching import Cache

    app = Flask("cachelib_app")
    app.config.update(
        CACHE_TYPE="prefork_sessions.cachelib.MmapCache",
        CACHE_DEFAULT_TIMEOUT=300,
        CACHE_OPTIONS={"path": os.environ[PATH_ENV], "cache_size": 1 << 20, "page_size": 16 << 10},
    )
    cache = Cache(app)

    @app.after_request
    def worker_header(response: Response) -> Response:
        response.headers["X-Worker"] = str(os.getpid())
        return response

    @app.get("/cached")
    @cache.cached(timeout=300)
    def cached() -> Any:  # a dict, which Flask-Caching pickles and Flask turns into JSON
        return {"computed_by": os.getpid(), "computation": cache.cache.inc("computations")}

    @app.get("/inc")
    def inc() -> Any:  # Flask-Caching's Cache has no inc(): its backend, our MmapCache, has
        return jsonify(value=cache.cache.inc("hits"))

    @app.get("/get/<key>")
    def get(key: str) -> Any:
        return jsonify(value=cache.get(key))

    return app
