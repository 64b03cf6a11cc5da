"""Processes and threads at once: atomic increments, fork handling, SIGKILLed writers."""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _procs import fork, wait_ok

from prefork_sessions import LockTimeoutError, MmapStore
from prefork_sessions import _layout as L

INCREMENTS = 2000


def _increment(store: MmapStore, n: int) -> None:
    for _ in range(n):
        store.get_and_set("counter", lambda v: (v or 0) + 1)


def _in_threads(fn: Callable[[], None], count: int) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_four_processes_increment_to_exactly_8000(tmp_path: Path) -> None:
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)
    wait_ok([fork(lambda: _increment(store, INCREMENTS)) for _ in range(4)])
    assert store.get("counter") == 4 * INCREMENTS
    assert store.check() == []


def test_four_threads_increment_to_exactly_8000(tmp_path: Path) -> None:
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)
    _in_threads(lambda: _increment(store, INCREMENTS), 4)
    assert store.get("counter") == 4 * INCREMENTS


def test_processes_with_threads_increment_exactly(tmp_path: Path) -> None:
    """2 forked processes x 2 threads each, plus 2 threads in the parent: 6 x 1000."""
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)
    pids = [fork(lambda: _in_threads(lambda: _increment(store, 1000), 2)) for _ in range(2)]
    _in_threads(lambda: _increment(store, 1000), 2)
    wait_ok(pids)
    assert store.get("counter") == 6000


def test_child_reopening_explicitly_shares_the_file(tmp_path: Path) -> None:
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)
    store.set("from_parent", 1)

    def child() -> None:
        store.reopen()
        assert store.get("from_parent") == 1
        store.set("from_child", 2)

    wait_ok([fork(child)])
    assert store.get("from_child") == 2


def test_fork_while_another_thread_holds_a_page_lock(tmp_path: Path) -> None:
    """The child must not inherit a held in-process lock (it would deadlock), and
    must wait for the parent's real lock through its own file description."""
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10, lock_timeout=20)
    store.set("k", 0)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        def slow(v: int) -> int:
            holding.set()
            release.wait(10)
            return v + 1

        store.get_and_set("k", slow)

    t = threading.Thread(target=hold)
    t.start()
    assert holding.wait(10)
    pid = fork(lambda: store.get_and_set("k", lambda v: v + 10))
    time.sleep(0.3)  # the child is now waiting on the page lock
    release.set()
    t.join()
    wait_ok([pid])
    assert store.get("k") == 11


def test_grandchildren_share_the_store(tmp_path: Path) -> None:
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)

    def child() -> None:
        wait_ok([fork(lambda: _increment(store, 200)) for _ in range(2)])
        _increment(store, 200)

    wait_ok([fork(child) for _ in range(2)])
    assert store.get("counter") == 1200


def test_lock_held_too_long_times_out_with_a_typed_error(tmp_path: Path) -> None:
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)
    store.set("k", 0)
    r, w = os.pipe()

    def holder() -> None:
        store.get_and_set("k", lambda v: (os.write(w, b"x"), time.sleep(3), v)[2])

    pid = fork(holder)
    os.read(r, 1)
    other = MmapStore(tmp_path / "s", lock_timeout=0.3)
    with pytest.raises(LockTimeoutError) as err:
        other.set("k", 1)
    assert isinstance(err.value, TimeoutError) and "lock_timeout" in str(err.value)
    assert other.get("k") == 0  # lock-free reads still work meanwhile
    wait_ok([pid])


def test_a_killed_lock_holder_never_wedges_the_store(tmp_path: Path) -> None:
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10, lock_timeout=5)
    store.set("k", 0)
    r, w = os.pipe()
    pid = fork(lambda: store.get_and_set("k", lambda v: (os.write(w, b"x"), time.sleep(60))[1]))
    os.read(r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert store.get_and_set("k", lambda v: v + 1) == 1


# --- killed writers --------------------------------------------------------

_ACK = struct.Struct("<II")  # key index, version


def _writer(path: Path, seed: int, keys: int, w: int) -> None:  # pragma: no cover - child
    store = MmapStore(path)
    rnd = random.Random(seed)
    version = 0
    while True:
        version += 1
        k = rnd.randrange(keys)
        value = 0 if rnd.random() < 0.1 else version  # 0: a delete
        os.write(w, _ACK.pack(k, value | 0x80000000))  # in flight
        if value:
            store.set(f"key{k}", {"v": value, "pad": "p" * rnd.randrange(10, 1500)})
        else:
            store.delete(f"key{k}")
        os.write(w, _ACK.pack(k, value))  # acknowledged


def test_writer_killed_at_random_moments_loses_at_most_the_write_in_flight(tmp_path: Path) -> None:
    """SIGKILL a writer over and over (small pages: compactions and evictions happen);
    every key reads back as its last acknowledged value or the one in flight."""
    path = tmp_path / "s"
    keys = 60
    store = MmapStore(path, cache_size=256 << 10, page_size=8 << 10)
    acked: dict[int, int] = {}
    rnd = random.Random(1234)
    for round_ in range(400):  # at least 40 rounds, then until a kill has landed mid-write
        if round_ >= 40 and store.stats()["recovered_pages"]:
            break
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            try:
                _writer(path, round_, keys, w)
            finally:
                os._exit(1)
        os.close(w)
        time.sleep(rnd.uniform(0.005, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        in_flight: tuple[int, int] | None = None
        for i in range(0, len(data) - len(data) % _ACK.size, _ACK.size):
            k, v = _ACK.unpack_from(data, i)
            if v & 0x80000000:
                in_flight = (k, v & 0x7FFFFFFF)
            else:
                acked[k] = v
                in_flight = None
        for k in range(keys):
            got = store.get(f"key{k}")
            got_v = got["v"] if got else 0
            allowed = {acked.get(k, 0)}
            if in_flight and in_flight[0] == k:
                allowed.add(in_flight[1])
            assert got_v in allowed, f"round {round_}: key{k} reads {got_v}, expected one of {allowed}"
            if got_v != acked.get(k, 0):
                acked[k] = got_v  # the in-flight write landed
        assert store.check() == []
    assert store.stats()["evictions"] == 0, "the test store was meant to be big enough"
    print("recovered pages:", store.stats()["recovered_pages"])
    assert store.stats()["recovered_pages"] > 0, "no kill landed mid-write: the test proved nothing"


def test_threads_of_a_forked_child_reopen_the_store_once(tmp_path: Path) -> None:
    """Several threads of a child hit the lazily reopened store at the same moment."""
    store = MmapStore(tmp_path / "s", cache_size=1 << 20, page_size=16 << 10)
    store.set("counter", 0)

    def child() -> None:
        sys.setswitchinterval(1e-6)  # switch threads as often as possible: widen any race
        start = threading.Barrier(8)

        def work() -> None:
            start.wait()
            _increment(store, 10)

        _in_threads(work, 8)

    for _ in range(5):
        wait_ok([fork(child) for _ in range(8)])
    assert store.get("counter") == 3200
    assert store.check() == []


def test_writer_killed_mid_compaction_page_is_restored_from_the_spare(make_store: Any, pager_impl: str) -> None:
    """Kill a writer exactly while it copies a compacted image over its page (after
    marking the spare valid, with the page half overwritten): the next locker
    restores the page from the spare and nothing acknowledged is lost.  The writer
    runs the reference pager (its lines can be traced); the next locker runs each."""
    import linecache

    from prefork_sessions import _pager, _store, _upkeep

    store = make_store(cache_size=8 << 10, page_size=8 << 10, serializer="raw")  # one page
    for i in range(5):
        store.set(f"k{i}", bytes([65 + i]) * 1000)
    for i in range(2):
        store.set(f"k{i}", bytes([97 + i]) * 1000)  # dead space: the next big write compacts
    expected = {f"k{i}": store.get(f"k{i}") for i in range(5)}

    def child() -> None:
        _store.FastPager = _pager.Pager  # type: ignore[misc]
        writer = MmapStore(store.path, serializer="raw")

        def trace(frame: Any, event: str, arg: Any) -> Any:
            if frame.f_code.co_filename != _upkeep.__file__ or frame.f_code.co_name != "install":
                return None

            def line(frame: Any, event: str, arg: Any) -> Any:
                text = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
                if event == "line" and "= body" in text and "spare" not in text:  # the copy over the page
                    po = frame.f_locals["po"]
                    frame.f_locals["mm"][po + L.OFF_COUNTS:po + 3000] = b"\xee" * (3000 - L.OFF_COUNTS)
                    os.kill(os.getpid(), signal.SIGKILL)
                return line

            return line

        sys.settrace(trace)
        writer.set("new", b"N" * 2500)  # in flight when killed

    pid = fork(child)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the trap never fired"
    for key, value in expected.items():
        assert store.get(key) == value
    assert store.get("new") == b"N" * 2500  # the spare held the finished image
    assert store.check() == []
    assert store.stats()["recovered_pages"] >= 1


def test_racing_inserts_of_the_same_new_keys_never_duplicate(tmp_path: Path) -> None:
    """Processes and threads all insert the same fresh keys at once (first page,
    second page, either), deleting some as they go: every increment counts and no
    key ever lands in both of its pages."""
    store = MmapStore(tmp_path / "s", cache_size=512 << 10, page_size=4 << 10)

    def work() -> None:
        def run() -> None:
            for i in range(150):
                store.get_and_set(f"new{i}", lambda v: (v or 0) + 1)
                store.set(f"scratch{i % 7}", "x" * (i % 300))
                if i % 5 == 0:
                    store.delete(f"scratch{(i + 3) % 7}")

        _in_threads(run, 2)

    wait_ok([fork(work) for _ in range(3)])
    assert [store.get(f"new{i}") for i in range(150)] == [6] * 150
    assert store.check() == []
    assert store.stats()["evictions"] == 0
