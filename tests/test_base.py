"""The base both stores share: one written contract, one stats() shape, one context manager."""

from __future__ import annotations

import typing
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from prefork_sessions import (
    MmapStats,
    MmapStore,
    RedisStats,
    RedisStore,
    StoreBase,
    StoreClosedError,
    StoreStats,
)


def _public_methods(cls: type) -> set[str]:
    dunders = {"__contains__", "__len__", "__iter__", "__enter__", "__exit__"}
    return {n for n in dir(cls) if (not n.startswith("_") or n in dunders) and callable(getattr(cls, n))}


def test_every_method_both_stores_offer_is_declared_on_the_base() -> None:
    shared = _public_methods(MmapStore) & _public_methods(RedisStore)
    assert shared - set(vars(StoreBase)) == set(), "write the shared method's contract down on StoreBase"
    with pytest.raises(TypeError, match="abstract"):
        StoreBase(expire=0, serializer="json")  # type: ignore[abstract]


def _assert_is(stats: Mapping[str, Any], shape: type) -> None:
    """``stats`` has exactly the keys of the TypedDict ``shape``, each of its declared type."""
    hints = typing.get_type_hints(shape)
    assert set(stats) == set(hints) == shape.__required_keys__  # type: ignore[attr-defined]
    assert StoreStats.__required_keys__ <= set(stats)
    for key, kind in hints.items():
        assert type(stats[key]) is kind, f"stats()[{key!r}] is {stats[key]!r}, declared {kind.__name__}"


def test_mmap_store_stats_are_its_typed_dict(make_store: Callable[..., MmapStore]) -> None:
    store = make_store()
    assert isinstance(store, StoreBase)
    store.set("a", {"n": 1})
    store.get("a")
    store.get("missing")
    _assert_is(store.stats(), MmapStats)


def test_redis_store_stats_are_its_typed_dict(redis_url: str) -> None:
    with RedisStore(redis_url, prefix=f"test:{uuid.uuid4().hex}:") as store:
        assert isinstance(store, StoreBase)
        store.set("a", {"n": 1})
        store.get("a")
        store.get("missing")
        _assert_is(store.stats(), RedisStats)
        store.clear()


@pytest.mark.parametrize("kind", ["mmap", "redis"])
def test_with_block_closes_either_store(kind: str, request: pytest.FixtureRequest,
                                        make_store: Callable[..., MmapStore]) -> None:
    store: StoreBase
    if kind == "mmap":
        store = make_store()
    else:
        store = RedisStore(request.getfixturevalue("redis_url"), prefix=f"test:{uuid.uuid4().hex}:")
    with store as entered:
        assert entered is store
        store.set("k", 1)
    with pytest.raises(StoreClosedError):
        store.get("k")
    store.reopen()
    assert store.get("k") == 1
    store.clear()
    store.close()
