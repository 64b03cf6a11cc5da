"""One store object per file (or Redis URL) per process, for the framework adapters.

A framework makes its session or cache backend objects itself, often one per
request or per thread (Django), and cannot be handed a store: the adapters ask
here instead, and every caller in the process gets the same open store for
the same file, URL and serializer.  A forked worker reopens its inherited
stores by itself (and ``prefork_sessions.gunicorn.post_fork`` does it at
once), so nothing here needs to know about fork.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from ._base import StoreBase
from ._redis import RedisStore
from ._store import MmapStore

__all__ = ["close_shared", "shared_mmap", "shared_redis"]

_stores: dict[tuple[Any, ...], StoreBase] = {}
_lock = threading.Lock()


def shared_mmap(path: str, *, serializer: str = "json", **options: Any) -> MmapStore:
    """The process's MmapStore on ``path`` read and written with ``serializer``,
    opened (or created, with ``options``) on first call.  The first caller's
    options win; an existing file keeps its own geometry anyway."""
    ident = ("mmap", os.path.abspath(path), serializer)
    store = _shared(ident, lambda: MmapStore(path, serializer=serializer, **options))
    assert isinstance(store, MmapStore)
    return store


def shared_redis(url: str, *, serializer: str = "json", **options: Any) -> RedisStore:
    """The process's RedisStore on ``url`` with ``serializer`` (and ``options``,
    such as ``prefix``), connected on first call."""
    ident = ("redis", url, serializer, tuple(sorted(options.items())))
    store = _shared(ident, lambda: RedisStore(url, serializer=serializer, **options))
    assert isinstance(store, RedisStore)
    return store


def _shared(ident: tuple[Any, ...], make: Callable[[], StoreBase]) -> StoreBase:
    store = _stores.get(ident)  # no lock on the way every call takes
    if store is None:
        with _lock:
            store = _stores.get(ident)
            if store is None:
                store = _stores[ident] = make()
    return store


def close_shared() -> None:
    """Close every store opened here (the next call opens them again): for tests
    that change settings, and for shutdown."""
    with _lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()
