"""MmapStore behaviour on real files: API, serialisers, expiry, eviction, limits, errors."""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Callable

import pytest

from prefork_sessions import (
    NEVER,
    InvalidArgumentError,
    MmapStore,
    ReentrantCallError,
    SerializationError,
    SessionStoreError,
    StoreClosedError,
    ValueTooLargeError,
)
from prefork_sessions._store import default_path

Make = Callable[..., MmapStore]


def test_set_get_delete_roundtrip(store: MmapStore) -> None:
    assert store.get("missing") is None
    assert store.get("missing", 42) == 42
    store.set("a", {"n": 1, "l": [1, 2, "x"], "u": "é"})
    assert store.get("a") == {"n": 1, "l": [1, 2, "x"], "u": "é"}
    assert "a" in store and "b" not in store
    assert len(store) == 1
    store.set("a", "replaced")
    assert store.get("a") == "replaced"
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.get("a") is None
    assert store.check() == []


def test_bytes_and_str_keys_are_kept_apart_and_listed_as_given(store: MmapStore) -> None:
    store.set("k", 1)
    store.set(b"k2", 2)
    assert store.get(b"k") == 1  # the same bytes on disk as "k"
    assert sorted(map(repr, store.keys())) == sorted([repr("k"), repr(b"k2")])
    with pytest.raises(TypeError):
        store.set(3, "x")  # type: ignore[arg-type]


def test_many_keys_survive_and_check_is_clean(store: MmapStore) -> None:
    for i in range(2000):
        store.set(f"session:{i:032x}", {"i": i})
    assert all(store.get(f"session:{i:032x}") == {"i": i} for i in range(2000))
    assert store.stats()["entries"] == 2000
    assert store.stats()["evictions"] == 0
    assert store.check() == []


def test_updates_that_need_compaction_keep_every_value(make_store: Make) -> None:
    store = make_store(cache_size=64 << 10, page_size=8 << 10)
    for round_ in range(30):
        for i in range(40):
            store.set(f"k{i}", "v" * (50 + (i * round_) % 200) + str(round_))
    for i in range(40):
        assert store.get(f"k{i}").endswith("29")
    assert store.stats()["evictions"] == 0
    assert store.check() == []


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_serializers_roundtrip(make_store: Make, serializer: str) -> None:
    store = make_store(serializer=serializer)
    value = {"a": [1, 2.5, None, True], "b": "text"}
    store.set("k", value)
    assert store.get("k") == value


def test_json_is_the_default_and_on_disk_format(store: MmapStore) -> None:
    assert store.serializer == "json"
    store.set("k", {"x": 1})
    with open(store.path, "rb") as f:
        assert b'{"x":1}' in f.read()


def test_raw_serializer_is_bytes_in_bytes_out(make_store: Make) -> None:
    store = make_store(serializer="raw")
    store.set("k", b"\x00\xffbinary")
    assert store.get("k") == b"\x00\xffbinary"
    with pytest.raises(SerializationError):
        store.set("k", "not bytes")
    assert store.get("k") == b"\x00\xffbinary"


def test_pickle_only_when_asked(make_store: Make) -> None:
    store = make_store()
    with pytest.raises(SerializationError) as err:
        store.set("k", {1, 2})
    assert "pickle" in str(err.value)  # says how to fix it
    assert isinstance(err.value, TypeError)
    pickled = make_store("p", serializer="pickle")
    pickled.set("k", {1, 2})
    assert pickled.get("k") == {1, 2}


def test_custom_serializer_object(make_store: Make) -> None:
    store = make_store(serializer=json)  # the json module has dumps/loads (dumps returns str)
    store.set("k", [1, "two"])
    assert store.get("k") == [1, "two"]
    with pytest.raises(ValueError, match="serializer"):
        make_store("bad", serializer="yaml")


def test_unserialisable_value_keeps_the_old_one(store: MmapStore) -> None:
    store.set("k", {"ok": True})
    with pytest.raises(SerializationError):
        store.set("k", {"bad": object()})
    assert store.get("k") == {"ok": True}


def test_value_too_large_is_refused_and_old_value_kept(store: MmapStore) -> None:
    store.set("k", "small")
    with pytest.raises(ValueTooLargeError) as err:
        store.set("k", "x" * store.page_size)
    assert isinstance(err.value, ValueError) and isinstance(err.value, SessionStoreError)
    assert "page_size" in str(err.value)
    assert store.get("k") == "small"


def test_add_of_a_value_too_large_raises_and_keeps_nothing(store: MmapStore) -> None:
    with pytest.raises(ValueTooLargeError):
        store.add("new", "x" * store.page_size)
    assert "new" not in store
    store.set("k", "small")
    with pytest.raises(ValueTooLargeError):  # raised even though the key exists
        store.add("k", "x" * store.page_size)
    assert store.get("k") == "small"


def test_largest_value_fits_whole_page(make_store: Make) -> None:
    """Unlike Cache::FastMmap (which refuses values over ~40% of a page), a value
    as large as the page's data area is stored."""
    store = make_store(serializer="raw")
    for i in range(20):
        store.set(f"filler{i}", b"f" * 700)
    big = b"B" * store.max_value_size
    store.set("big", big)
    assert store.get("big") == big
    assert store.check() == []


def test_expiry_per_entry(store: MmapStore) -> None:
    store.set("short", 1, expire=0.2)
    store.set("long", 2, expire=60)
    store.set("never", 3, expire=NEVER)
    assert store.get("short") == 1
    time.sleep(0.3)
    assert store.get("short") is None
    assert "short" not in store
    assert store.get("long") == 2 and store.get("never") == 3
    assert sorted(store.keys()) == ["long", "never"]  # type: ignore[type-var]
    assert store.purge() == 1
    assert store.stats()["expirations"] == 1
    assert store.purge() == 0


def test_expire_zero_and_inf_mean_never_and_negative_is_refused(make_store: Make) -> None:
    store = make_store(expire=0.2)  # store default
    store.set("default", 1)
    store.set("zero", 2, expire=0)
    store.set("inf", 3, expire=math.inf)
    time.sleep(0.3)
    assert store.get("default") is None
    assert store.get("zero") == 2 and store.get("inf") == 3
    with pytest.raises(ValueError):
        store.set("neg", 1, expire=-1)


def test_delete_of_expired_entry_reports_false(store: MmapStore) -> None:
    store.set("k", 1, expire=0.1)
    time.sleep(0.2)
    assert store.delete("k") is False


def test_get_and_set_is_read_modify_write(store: MmapStore) -> None:
    assert store.get_and_set("n", lambda v: (v or 0) + 1) == 1
    assert store.get_and_set("n", lambda v: v + 1) == 2
    assert store.get("n") == 2
    seen = []
    store.get_and_set("new", lambda v: seen.append(v) or "made")
    assert seen == [None] and store.get("new") == "made"


def test_get_and_set_exception_stores_nothing_and_unlocks(store: MmapStore) -> None:
    store.set("k", 1)

    def boom(v: int) -> int:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        store.get_and_set("k", boom)
    assert store.get("k") == 1
    store.set("k", 2)  # the page lock was released
    assert store.get_and_set("k", lambda v: v * 10) == 20


def test_get_and_set_unserialisable_result_stores_nothing(store: MmapStore) -> None:
    store.set("k", 1)
    with pytest.raises(SerializationError):
        store.get_and_set("k", lambda v: object())
    assert store.get("k") == 1


def test_calling_the_store_inside_get_and_set_raises(store: MmapStore) -> None:
    store.set("other", 1)
    for call in (lambda: store.get("other"), lambda: store.set("k", 1), lambda: store.delete("other")):
        with pytest.raises(ReentrantCallError):
            store.get_and_set("k", lambda v, call=call: call())
    store.set("k", 5)  # nothing is left locked
    assert store.get("k") == 5


def test_eviction_prefers_expired_then_least_recently_used(make_store: Make) -> None:
    store = make_store(cache_size=8 << 10, page_size=8 << 10, serializer="raw")  # one page
    store.set("expired", b"e" * 1000, expire=0.1)
    for i in range(5):
        store.set(f"k{i}", b"v" * 1000)
        time.sleep(0.07)  # distinct access ticks (1/16 s)
    time.sleep(0.1)
    assert store.get("k0") == b"v" * 1000  # k0 is now the most recently used
    time.sleep(0.07)
    for i in range(5, 8):
        store.set(f"k{i}", b"v" * 1000)
    stats = store.stats()
    assert store.get("expired") is None
    assert stats["expirations"] == 1
    assert store.get("k0") is not None, "a recently read entry was evicted before older ones"
    assert store.get("k1") is None, "the least recently used entry should have gone first"
    assert stats["evictions"] >= 1
    assert all(store.get(f"k{i}") for i in range(5, 8))
    assert store.check() == []


def test_stats_fields(store: MmapStore) -> None:
    store.set("a", 1)
    store.get("a")
    store.get("zz")
    st = store.stats()
    for field in ("entries", "hits", "misses", "expirations", "evictions", "recovered_pages",
                  "bytes_used", "capacity"):
        assert isinstance(st[field], int), field
    assert st["entries"] == 1 and st["hits"] == 1 and st["misses"] == 1
    assert 0 < st["bytes_used"] < st["capacity"]


def test_clear(store: MmapStore) -> None:
    for i in range(100):
        store.set(f"k{i}", i)
    store.clear()
    assert len(store) == 0 and store.get("k1") is None
    store.set("k1", 1)
    assert store.get("k1") == 1 and store.check() == []


def test_close_reopen_and_context_manager(make_store: Make) -> None:
    store = make_store()
    store.set("k", "v")
    store.close()
    with pytest.raises(StoreClosedError):
        store.get("k")
    store.reopen()
    assert store.get("k") == "v"
    with MmapStore(store.path) as again:
        assert again.get("k") == "v"
    with pytest.raises(StoreClosedError):
        again.set("x", 1)


def test_existing_file_geometry_is_adopted(make_store: Make) -> None:
    first = make_store(cache_size=256 << 10, page_size=8 << 10)
    first.set("k", "v")
    second = make_store(cache_size=4 << 20, page_size=64 << 10)  # same path, other settings
    assert (second.page_size, second.num_pages) == (8 << 10, 32)
    assert second.get("k") == "v"


def test_invalid_arguments(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(InvalidArgumentError):
        MmapStore(os.path.join(tmp_path, "a"), page_size=1000)
    with pytest.raises(InvalidArgumentError):
        MmapStore(os.path.join(tmp_path, "b"), cache_size=1024, page_size=4096)
    with pytest.raises(InvalidArgumentError, match="at most 4294967295 pages"):
        MmapStore(os.path.join(tmp_path, "c"), cache_size=4096 << 32, page_size=4096)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("kw", [{"path": 42}, {"path": ""}, {"path": "a\0b"}, {"app_name": "../etc"},
                                {"app_name": 7}, {"app_name": "a\nb"}])
def test_a_bad_path_or_app_name_is_refused_with_our_error(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        MmapStore(**kw)  # type: ignore[arg-type]


def test_a_bytes_path_works(tmp_path: os.PathLike[str]) -> None:
    store = MmapStore(os.fsencode(os.path.join(tmp_path, "b")), cache_size=1 << 20, page_size=16 << 10)
    store.set("k", 1)
    assert store.path == os.path.join(tmp_path, "b") and store.get("k") == 1
    store.close()


def test_default_path_uses_app_name_in_temp_dir(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert default_path("myapp") == os.path.join(tmp_path, "myapp_session_data")
    with MmapStore(app_name="myapp", cache_size=1 << 20) as store:
        assert store.path == os.path.join(tmp_path, "myapp_session_data")
        assert os.path.exists(store.path)


def test_pickle_serializer_stores_pickles(make_store: Make) -> None:
    store = make_store(serializer="pickle")
    store.set("k", ("tuple", 1))
    raw = make_store(serializer="raw")  # same file, read the bytes back
    assert pickle.loads(raw.get("k")) == ("tuple", 1)


def test_damaged_entry_reads_as_missing_and_check_repairs_the_page(make_store: Make) -> None:
    store = make_store(serializer="raw", cache_size=16 << 10)  # one page
    store.set("k", b"A" * 100)
    store.set("other", b"B" * 100)  # after the damaged entry in the data area
    with open(store.path, "r+b") as f:
        at = f.read().index(b"A" * 100)
        f.seek(at + 50)
        f.write(b"Z")
    problems = store.check()
    assert len(problems) == 1 and "page 0:" in problems[0] and "1 of 2 entries lost" in problems[0], problems
    assert store.get("k") is None
    assert store.get("other") == b"B" * 100
    assert store.check() == []


def test_a_read_that_meets_damage_repairs_the_page(make_store: Make) -> None:
    store = make_store(serializer="raw", cache_size=16 << 10)  # one page
    store.set("k", b"A" * 100)
    store.set("other", b"B" * 100)
    with open(store.path, "r+b") as f:
        at = f.read().index(b"A" * 100)
        f.seek(at + 50)
        f.write(b"Z")
    assert store.get("k") is None
    assert store.stats()["recovered_pages"] == 1
    assert store.get("other") == b"B" * 100
    assert store.check() == []


def test_updating_an_expired_key_in_a_full_page(make_store: Make) -> None:
    store = make_store(cache_size=8 << 10, page_size=8 << 10, serializer="raw")  # one page
    store.set("k", b"x" * 3000, expire=0.1)
    store.set("other", b"o" * 3000)
    time.sleep(0.2)
    store.set("k", b"y" * 4000)  # needs the expired entry's room, and replaces it
    assert store.get("k") == b"y" * 4000
    assert store.get("other") == b"o" * 3000
    assert store.check() == []


def test_page_size_not_a_multiple_of_4096(make_store: Make) -> None:
    store = make_store(cache_size=5 * 5120, page_size=5120)
    store.set("k", "v")
    assert store.get("k") == "v" and store.num_pages == 5 and store.check() == []


def test_empty_raw_value_is_a_value(make_store: Make) -> None:
    store = make_store(serializer="raw")
    store.set("empty", b"")
    assert store.get("empty") == b"" and "empty" in store
    assert store._read_locked(b"empty") == b""  # the path a busy page falls back to
