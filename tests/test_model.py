"""Model-based test: a hypothesis state machine drives MmapStore and a plain dict side by side."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefork_sessions import MmapStore, ValueTooLargeError, _pager, _store

KEYS = st.sampled_from([f"k{i}" for i in range(12)] + ["", "é", "x" * 300])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=8,
) | st.text(min_size=500, max_size=3000)


class StoreModel(RuleBasedStateMachine):
    """Small pages, so compaction runs often; big enough in total that nothing is evicted."""

    pager = _pager.FastPager

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "s")
        saved, _store.FastPager = _store.FastPager, self.pager
        try:
            self.store = MmapStore(self.path, cache_size=512 << 10, page_size=8 << 10)
        finally:
            _store.FastPager = saved
        self.model: dict[str, Any] = {}

    @rule(key=KEYS, value=VALUES)
    def set(self, key: str, value: Any) -> None:
        try:
            self.store.set(key, value)
        except ValueTooLargeError:
            return  # refused: the model keeps the old value too
        self.model[key] = value

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.store.get(key, "<missing>") == self.model.get(key, "<missing>")

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.store.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=KEYS, add=st.integers(1, 5))
    def increment(self, key: str, add: int) -> None:
        def bump(v: Any) -> Any:
            return v + add if isinstance(v, int) and not isinstance(v, bool) else add

        assert self.store.get_and_set(key, bump) == bump(self.model.get(key))
        self.model[key] = bump(self.model.get(key))

    @rule(key=KEYS)
    def failing_update(self, key: str) -> None:
        def fail(v: Any) -> Any:
            raise RuntimeError

        try:
            self.store.get_and_set(key, fail)
        except RuntimeError:
            pass

    @rule()
    def reopen(self) -> None:
        self.store.reopen()

    @precondition(lambda self: len(self.model) > 8)
    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.model.clear()

    @invariant()
    def same_keys(self) -> None:
        assert sorted(self.store.keys()) == sorted(self.model)  # type: ignore[type-var]
        assert len(self.store) == len(self.model)

    def teardown(self) -> None:
        assert self.store.check() == []
        assert self.store.stats()["evictions"] == 0
        self.store.close()
        self.dir.cleanup()


class PythonPagerModel(StoreModel):
    pager = _pager.Pager


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPythonPagerModel = PythonPagerModel.TestCase
TestPythonPagerModel.settings = settings(max_examples=25, stateful_step_count=40, deadline=None)
