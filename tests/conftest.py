"""Shared fixtures: stores on real files in tmp_path, with either hot-path implementation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prefork_sessions import MmapStore, _pager, _store


@pytest.fixture(params=["c", "python"])
def pager_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C hot path and again with the pure-Python reference."""
    if request.param == "c":
        assert _pager.FastPager is not _pager.Pager, "the C extension _speedups was not built"
    else:
        monkeypatch.setattr(_store, "FastPager", _pager.Pager)
    return str(request.param)


@pytest.fixture
def make_store(tmp_path: Any, pager_impl: str) -> Iterator[Callable[..., MmapStore]]:
    """Factory for stores in tmp_path (closed at teardown)."""
    made: list[MmapStore] = []

    def make(name: str = "store", **kw: Any) -> MmapStore:
        kw.setdefault("cache_size", 1 << 20)
        kw.setdefault("page_size", 16 << 10)
        store = MmapStore(os.path.join(tmp_path, name), **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., MmapStore]) -> MmapStore:
    return make_store()
