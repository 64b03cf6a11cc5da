"""The page locks (``_locks``) on real files, real fork(), real SIGKILL and SIGSTOP, on
both pagers: waiters are woken by the release, dead holders are detected at once,
live ones bound every wait with LockTimeoutError, damaged locks are reset with
nothing lost, a file made under another lock protocol is refused, and a free lock
costs no system call."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from zlib import crc32

import pytest
from _procs import fork, wait_ok

from prefork_sessions import FileFormatError, LockTimeoutError, MmapStore, _locks, _pager, _store
from prefork_sessions import _layout as L

Make = Callable[..., MmapStore]
PAGE = 16 << 10
SLOW = 0.3  # seconds a holder keeps a lock before it lets go
PATIENT = 10.0  # lock_timeout where a wait must end by a wake-up, never by timing out
AT_ONCE = 5.0  # a generous bound that a woken waiter (or a reset) stays far below


# --------------------------------------------------------------------- helpers

def _lock_off(store: MmapStore, page: int) -> int:
    """File offset of a page's lock (page -1: the spare's)."""
    return L.page_offset(store.page_size, page) + L.OFF_LOCK


def _patch(path: str, at: int, data: bytes) -> None:
    """Write into the file through a handle of its own, as damage from outside would."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _home(store: MmapStore, key: str) -> int:
    """The page of its two that holds ``key`` now (it must be stored)."""
    kb = key.encode()
    h, p1, p2, s0 = store._pager.where(kb)
    for page in (p1, p2):
        if store._pager.find(L.page_offset(store.page_size, page), kb, h, s0)[1] > 0:
            return page
    raise AssertionError(f"{key!r} is in neither of its pages")


def _new_key_homed_at(store: MmapStore, page: int, prefix: str) -> str:
    """A key not yet stored whose first page (where every insert locks first) is ``page``."""
    for i in range(100_000):
        key = f"{prefix}{i}"
        if store._pager.where(key.encode())[1] == page and key not in store:
            return key
    raise AssertionError(f"no key with first page {page}")


def _key_avoiding(store: MmapStore, page: int, prefix: str) -> str:
    """A key not yet stored with neither of its two pages ``page``."""
    for i in range(100_000):
        key = f"{prefix}{i}"
        if page not in store._pager.where(key.encode())[1:3] and key not in store:
            return key
    raise AssertionError(f"no key avoiding page {page}")


def _lock_works(path: str, off: int) -> bool:
    """Can a fresh mapping of the file take and give back the lock at ``off`` at once?"""
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            with _locks.Mutexes(mm) as m:
                state = m.lock(off, 0.0)
                if state == _locks.Locked.SOUND:
                    m.unlock(off)
        finally:
            mm.close()
    return state == _locks.Locked.SOUND


@contextmanager
def _child(fn: Callable[[], object]) -> Iterator[int]:
    """Fork ``fn``; on the way out a child still alive is killed (stopped ones too) and reaped."""
    pid = fork(fn)
    try:
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _exit_code(pid: int, within: float = 60.0) -> int:
    """Reap ``pid``; a child still running after ``within`` seconds is killed (a deadlock) and fails."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    _kill(pid)
    raise AssertionError(f"child {pid} was still running after {within} s: deadlocked")


def _signalled(r: int) -> None:
    """Wait for the child's byte on the pipe (EOF: it died before getting there)."""
    assert os.read(r, 1) == b"x", "the child died before signalling"


def _hold_in_callback(store: MmapStore, key: str, w: int, hold: float) -> Callable[[], None]:
    """A child body: get_and_set(key, +1) whose callback says so on ``w``, then holds the lock."""
    def body() -> None:
        def slow(v: int) -> int:
            os.write(w, b"x")
            time.sleep(hold)
            return v + 1

        store.get_and_set(key, slow)

    return body


# --------------------------------------------------------------------- 1. woken by the release

def test_a_waiter_is_woken_by_the_release(make_store: Make) -> None:
    """B's set() on A's locked page waits in the kernel and goes on when A lets go:
    long before lock_timeout, and only after A's write (which B then sees)."""
    store = make_store(cache_size=PAGE, page_size=PAGE, lock_timeout=PATIENT)  # one page: every key on it
    store.set("a", 0)
    r, w = os.pipe()
    with _child(_hold_in_callback(store, "a", w, SLOW)) as pid:
        os.close(w)
        _signalled(r)
        t0 = time.monotonic()
        store.set("b", "from B")
        waited = time.monotonic() - t0
        assert store.get("a") == 1, "B's set returned while A still held the page"
        assert waited < AT_ONCE, f"B waited {waited:.2f} s for a lock released after {SLOW} s"
        assert _exit_code(pid) == 0
    assert store.get("b") == "from B"
    assert store.check() == []


def test_waiters_in_several_processes_are_all_woken(make_store: Make) -> None:
    """Three processes wait on one page held by a fourth; each gets it in turn."""
    store = make_store(cache_size=PAGE, page_size=PAGE, lock_timeout=PATIENT)
    store.set("n", 0)
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()

    def waiter() -> None:
        os.write(ready_w, b"x")
        store.get_and_set("n", lambda v: v + 10)

    with _child(_hold_in_callback(store, "n", w, SLOW)) as holder:
        _signalled(r)
        waiters = [fork(waiter) for _ in range(3)]
        for _ in waiters:
            _signalled(ready_r)
        t0 = time.monotonic()
        codes = [_exit_code(pid) for pid in [holder, *waiters]]
        assert time.monotonic() - t0 < AT_ONCE
    assert codes == [0, 0, 0, 0]
    assert store.get("n") == 31


def test_the_c_and_the_reference_pager_exclude_each_other(tmp_path: Path) -> None:
    """The two pagers speak one protocol: a C process and a reference process incrementing
    one counter at once (each also waking the other) end exact."""
    from prefork_sessions import _speedups  # built for every CI run (.ci/run installs it first)

    impls: list[Any] = [_speedups.Pager, _pager.Pager]
    path = str(tmp_path / "s")
    MmapStore(path, cache_size=PAGE, page_size=PAGE).close()

    def count(impl: Any) -> Callable[[], None]:
        def body() -> None:
            _store.FastPager = impl  # type: ignore[attr-defined]  # this child only
            s = MmapStore(path, lock_timeout=PATIENT)
            for _ in range(1000):
                s.get_and_set("n", lambda v: (v or 0) + 1)

        return body

    wait_ok([fork(count(impl)) for impl in impls * 2])
    with MmapStore(path) as s:
        assert s.get("n") == 4000
        assert s.check() == []


# --------------------------------------------------------------------- 2. dead holders

@pytest.mark.parametrize("waiting", [False, True], ids=["locker-after-kill", "waiter-during-kill"])
def test_a_holder_killed_in_a_callback_is_passed_at_once(make_store: Make, waiting: bool) -> None:
    """SIGKILL inside get_and_set's callback (the page is locked, not yet changed): the
    next locker, or one already waiting, takes the page at once; nothing is lost
    and there is nothing to repair."""
    store = make_store(cache_size=PAGE, page_size=PAGE, lock_timeout=PATIENT)
    values = {f"k{i}": i for i in range(20)}
    for k, v in values.items():
        store.set(k, v)
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()

    def late_writer() -> None:
        os.write(ready_w, b"x")
        store.set("late", "written")

    with _child(_hold_in_callback(store, "k3", w, 60)) as holder:
        _signalled(r)
        waiter = fork(late_writer) if waiting else 0
        if waiter:
            _signalled(ready_r)
            time.sleep(0.2)  # not asserted: lets the waiter block on the page first
        t0 = time.monotonic()
        _kill(holder)
        if waiter:
            assert _exit_code(waiter) == 0
        else:
            store.set("late", "written")
        took = time.monotonic() - t0
    assert took < AT_ONCE, f"{took:.2f} s to pass a dead holder (lock_timeout {PATIENT} s)"
    assert {k: store.get(k) for k in values} == values  # k3's callback result never landed
    assert store.get("late") == "written"
    assert store.stats()["recovered_pages"] == 0
    assert store.check() == []


def test_a_holder_killed_mid_change_is_repaired_at_once(make_store: Make) -> None:
    """SIGKILL with the page locked and its seq odd (mid-change): the next locker gets
    the lock at once, repairs the page, keeps every key, and counts the repair."""
    store = make_store(cache_size=PAGE, page_size=PAGE, lock_timeout=PATIENT)
    values = {f"k{i}": "v" * i for i in range(20)}
    for k, v in values.items():
        store.set(k, v)
    po = L.page_offset(store.page_size, 0)
    r, w = os.pipe()

    def die_mid_change() -> None:
        other = MmapStore(store.path)
        assert other._pager.lock(0, 5.0) == _locks.Locked.SOUND
        other._pager.bump(po)  # seq odd: a writer's first step
        os.write(w, b"x")
        time.sleep(60)

    with _child(die_mid_change) as pid:
        _signalled(r)
        _kill(pid)
    t0 = time.monotonic()
    store.set("after", 1)
    assert time.monotonic() - t0 < AT_ONCE
    assert {k: store.get(k) for k in values} == values
    assert store.get("after") == 1
    assert store.stats()["recovered_pages"] == 1
    assert store.check() == []


# --------------------------------------------------------------------- 3. a live stuck holder

def test_a_stopped_holder_times_out_its_page_only(make_store: Make) -> None:
    """A child SIGSTOPped inside a get_and_set callback: set() on its page raises
    LockTimeoutError after lock_timeout and changes nothing, other pages go on; once
    the child resumes and finishes, the page works and its write has landed."""
    store = make_store(cache_size=64 * 4096, page_size=4096, lock_timeout=0.3)
    values: dict[str, Any] = {f"k{i}": i for i in range(150)}
    for k, v in values.items():
        store.set(k, v)
    page = _home(store, "k0")
    neighbours = [k for k in values if k != "k0" and _home(store, k) == page]
    elsewhere = [k for k in values if page not in store._pager.where(k.encode())[1:3]]
    assert neighbours and elsewhere
    newcomer = _new_key_homed_at(store, page, "new")
    outsider = _key_avoiding(store, page, "out")
    r, w = os.pipe()
    with _child(_hold_in_callback(store, "k0", w, SLOW)) as pid:
        _signalled(r)
        os.kill(pid, signal.SIGSTOP)
        try:
            for key in (neighbours[0], newcomer):
                with pytest.raises(LockTimeoutError) as err:
                    store.set(key, "lost?")
                assert isinstance(err.value, TimeoutError) and f"page {page}" in str(err.value)
            with pytest.raises(LockTimeoutError):
                store.get_and_set(neighbours[0], lambda v: v + 1)
            with pytest.raises(LockTimeoutError):
                store.delete(neighbours[0])
            assert {k: store.get(k) for k in values} == values  # lock-free reads go on
            assert newcomer not in store
            store.set(elsewhere[0], "moved on")
            values[elsewhere[0]] = "moved on"
            store.set(outsider, "new elsewhere")
            values[outsider] = "new elsewhere"
        finally:
            os.kill(pid, signal.SIGCONT)
        assert _exit_code(pid) == 0
    values["k0"] = 1
    store.set(neighbours[0], "now")
    values[neighbours[0]] = "now"
    store.set(newcomer, "now")
    values[newcomer] = "now"
    assert {k: store.get(k) for k in values} == values
    assert store.check() == []


# --------------------------------------------------------------------- 4. threads

INCREMENTS = 300


def _in_threads(fn: Callable[[], None], count: int) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - a failure in any thread fails the test below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _increment(store: MmapStore) -> None:
    for _ in range(INCREMENTS):
        store.get_and_set("counter", lambda v: (v or 0) + 1)


def test_threads_of_one_process_exclude_each_other(make_store: Make) -> None:
    """Eight threads on one counter: the lock's owner is a thread, so the callbacks
    of two threads never overlap (a lost update would show as a short count)."""
    store = make_store(lock_timeout=PATIENT)
    inside = [0]
    overlaps = [0]

    def add(v: int | None) -> int:
        inside[0] += 1
        if inside[0] > 1:
            overlaps[0] += 1
        time.sleep(0)  # hand the GIL to a thread that will then find the page locked
        inside[0] -= 1
        return (v or 0) + 1

    def count() -> None:
        for _ in range(INCREMENTS):
            store.get_and_set("counter", add)

    _in_threads(count, 8)
    assert overlaps[0] == 0
    assert store.get("counter") == 8 * INCREMENTS


def test_threads_and_processes_together_on_one_counter(make_store: Make) -> None:
    """3 forked processes x 3 threads, plus 3 threads in the parent, on one counter."""
    store = make_store(lock_timeout=PATIENT)
    pids = [fork(lambda: _in_threads(lambda: _increment(store), 3)) for _ in range(3)]
    _in_threads(lambda: _increment(store), 3)
    wait_ok(pids)
    assert store.get("counter") == 12 * INCREMENTS
    assert store.check() == []


# --------------------------------------------------------------------- 5. and 6. damaged locks

DAMAGE: dict[str, Callable[[], bytes]] = {
    "no-such-thread": lambda: L.U32.pack(0x3FFFFFF0) + _locks.template()[4:],
    "pid-1": lambda: L.U32.pack(1) + _locks.template()[4:],
    "random-1": lambda: random.Random(1).randbytes(L.LOCK_SIZE),
    "random-2": lambda: random.Random(2).randbytes(L.LOCK_SIZE),
    "random-3": lambda: random.Random(3).randbytes(L.LOCK_SIZE),
    "all-ff": lambda: b"\xff" * L.LOCK_SIZE,
    "zeros": lambda: bytes(L.LOCK_SIZE),  # a working mutex, but a private non-robust one
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_page_lock_is_reset_and_nothing_is_lost(make_store: Make, damage: str) -> None:
    """A page's lock bytes changed from outside while nobody holds it: every
    operation on that page's keys works, well within lock_timeout; no value is lost;
    the lock works again afterwards."""
    store = make_store(cache_size=16 * 4096, page_size=4096, lock_timeout=PATIENT)
    values: dict[str, Any] = {f"k{i}": {"i": i, "pad": "p" * (i % 40)} for i in range(120)}
    for k, v in values.items():
        store.set(k, v)
    page = _home(store, "k0")
    on_page = [k for k in values if _home(store, k) == page]
    assert len(on_page) >= 4
    newcomer = _new_key_homed_at(store, page, "new")
    _patch(store.path, _lock_off(store, page), DAMAGE[damage]())

    t0 = time.monotonic()
    assert store.get(on_page[0]) == values[on_page[0]]
    store.set(on_page[1], "overwritten")
    values[on_page[1]] = "overwritten"
    assert store.get_and_set(on_page[2], lambda v: v["i"] * 100) == values[on_page[2]]["i"] * 100
    values[on_page[2]] = values[on_page[2]]["i"] * 100
    assert store.delete(on_page[3]) is True
    del values[on_page[3]]
    store.set(newcomer, "inserted")
    values[newcomer] = "inserted"
    took = time.monotonic() - t0
    assert took < AT_ONCE, f"{took:.2f} s to get past a damaged lock (lock_timeout {PATIENT} s)"
    assert {k: store.get(k) for k in values} == values
    assert on_page[3] not in store
    assert store.check() == []
    assert _lock_works(store.path, _lock_off(store, page))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_spare_lock_is_reset_by_the_next_compaction(make_store: Make, damage: str) -> None:
    """The spare page's lock damaged, then overwrites that fill a small page so a set
    must compact it through the spare: it works and every key keeps its value."""
    store = make_store(cache_size=4096, page_size=4096, serializer="raw", lock_timeout=PATIENT)
    values = {f"k{i}": bytes([65 + i]) * 300 for i in range(4)}
    for k, v in values.items():
        store.set(k, v)
    spare = _lock_off(store, L.SPARE_LOCK)
    _patch(store.path, spare, DAMAGE[damage]())
    t0 = time.monotonic()
    for n in range(30):  # ~10 entries of this size fill the page: two compactions at least
        values["k0"] = bytes([97 + n % 26]) * 300
        store.set("k0", values["k0"])
    took = time.monotonic() - t0
    assert took < AT_ONCE, f"{took:.2f} s to get past a damaged spare lock (lock_timeout {PATIENT} s)"
    assert {k: store.get(k) for k in values} == values
    assert store.stats()["evictions"] == 0
    assert store.check() == []
    assert _lock_works(store.path, spare)


def test_a_killed_holder_of_the_spare_does_not_stop_compaction(make_store: Make) -> None:
    """The spare's holder SIGKILLed: the next compaction takes the spare at once."""
    store = make_store(cache_size=4096, page_size=4096, serializer="raw", lock_timeout=PATIENT)
    values = {f"k{i}": bytes([65 + i]) * 300 for i in range(4)}
    for k, v in values.items():
        store.set(k, v)
    r, w = os.pipe()

    def hold_spare() -> None:
        other = MmapStore(store.path, serializer="raw")
        assert other._pager.lock(L.SPARE_LOCK, 5.0) == _locks.Locked.SOUND
        os.write(w, b"x")
        time.sleep(60)

    with _child(hold_spare) as pid:
        _signalled(r)
        _kill(pid)
    t0 = time.monotonic()
    for n in range(30):
        values["k0"] = bytes([97 + n % 26]) * 300
        store.set("k0", values["k0"])
    assert time.monotonic() - t0 < AT_ONCE
    assert {k: store.get(k) for k in values} == values
    assert store.check() == []


@pytest.mark.parametrize("damage", ["no-such-thread", "all-ff", "random-1", "zeros"])
def test_a_damaged_lock_still_excludes_processes(make_store: Make, damage: str) -> None:
    """After the damage, two processes on the page still exclude each other: A takes
    the (reset) lock and holds it in a callback; B's set() waits for A's release and
    sees A's write; neither raises."""
    store = make_store(cache_size=PAGE, page_size=PAGE, lock_timeout=PATIENT)
    store.set("a", 0)
    _patch(store.path, _lock_off(store, 0), DAMAGE[damage]())
    r, w = os.pipe()
    with _child(_hold_in_callback(store, "a", w, SLOW)) as pid:
        os.close(w)
        _signalled(r)
        t0 = time.monotonic()
        store.set("b", "from B")
        waited = time.monotonic() - t0
        assert store.get("a") == 1, "B's set returned while A still held the page"
        assert _exit_code(pid) == 0, "A failed (see its traceback above)"
    assert waited < AT_ONCE
    assert store.get("b") == "from B"
    assert store.check() == []
    assert _lock_works(store.path, _lock_off(store, 0))


# --------------------------------------------------------------------- 7. the protocol in the header

def _rewrite_header(path: str, **change: Any) -> bytes:
    """Change header fields (by name) and fix the header checksum; the file's bytes after."""
    names = ("magic", "version", "header_size", "page_size", "num_pages", "slots", "seed", "file_id",
             "created", "protocol")
    with open(path, "rb") as f:
        fields = dict(zip(names, L.HEADER.unpack(f.read(L.HEADER.size)), strict=True))
    fields.update(change)
    raw = L.HEADER.pack(*(fields[n] for n in names))
    _patch(path, 0, raw + L.U32.pack(crc32(raw)))
    return Path(path).read_bytes()


def test_a_file_made_under_another_lock_protocol_is_refused_untouched(make_store: Make) -> None:
    store = make_store(cache_size=4 * 4096, page_size=4096)
    store.set("k", "v")
    store.close()
    before = _rewrite_header(store.path, protocol=b"pthread-robust/musl/riscv64")
    with pytest.raises(FileFormatError) as err:
        MmapStore(store.path)
    assert "pthread-robust/musl/riscv64" in str(err.value)
    assert _locks.protocol().decode() in str(err.value) and store.path in str(err.value)
    assert Path(store.path).read_bytes() == before


def test_a_version_2_file_is_refused_untouched(make_store: Make) -> None:
    """Version 2 locked pages with fcntl: a process speaking it and one speaking
    version 3 would not exclude each other, so it is refused, not adopted."""
    store = make_store(cache_size=4 * 4096, page_size=4096)
    store.close()
    before = _rewrite_header(store.path, version=2)
    with pytest.raises(FileFormatError, match="version 2"):
        MmapStore(store.path)
    assert Path(store.path).read_bytes() == before


# --------------------------------------------------------------------- 8. no system call when free

_LOOP = textwrap.dedent("""
    import os, sys
    import prefork_sessions
    from prefork_sessions import MmapStore
    store = MmapStore(sys.argv[1], serializer="raw", cache_size=int(sys.argv[2]), page_size=int(sys.argv[3]))
    mark = os.open(os.devnull, os.O_WRONLY)
    store.set("warm", b"w"); store.get("warm"); store.get_and_set("warm", lambda v: v)
    os.write(mark, b"PFS-LOOP-START")
    value = b"v" * 100
    for i in range(2000):
        store.set(f"s{i}", value)
    for i in range(2000):
        assert store.get(f"s{i}") == value
    for i in range(500):
        store.get_and_set(f"c{i}", lambda v: (v or b"") + b"1")
    os.write(mark, b"PFS-LOOP-END")
    print(prefork_sessions.ACCELERATED)
""")


def test_free_locks_make_no_system_call(make_store: Make, pager_impl: str, tmp_path: Path) -> None:
    """Under strace, 2,000 set + 2,000 get + 500 get_and_set of distinct keys in one
    thread make (almost) no futex or fcntl call: an uncontended lock is taken and
    given back in user space (the fcntl locks of format 2 made two calls a write)."""
    strace = shutil.which("strace")
    assert strace, "strace is not installed: apt-get install strace (.ci/run installs it)"
    store = make_store(cache_size=4 << 20, page_size=PAGE, serializer="raw")
    store.close()
    env = {k: v for k, v in os.environ.items() if k != _pager.PURE_ENV}
    if pager_impl == "python":
        env[_pager.PURE_ENV] = "1"
    log = tmp_path / "strace.log"
    run = subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=futex,fcntl,write", "-o", str(log),
         sys.executable, "-c", _LOOP, store.path, str(store.cache_size), str(store.page_size)],
        check=False, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(pager_impl == "c"), "the subprocess ran another pager"
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "PFS-LOOP-START" in line)
    end = next(i for i, line in enumerate(lines) if "PFS-LOOP-END" in line)
    calls = [line for line in lines[start + 1:end]
             if ("futex(" in line or "fcntl(" in line) and "resumed>" not in line]
    assert len(calls) < 20, f"{len(calls)} futex/fcntl calls in 4,500 uncontended operations: {calls[:10]}"


# --------------------------------------------------------------------- 9. fork

def test_a_child_forked_while_a_thread_holds_a_lock_waits_for_it(make_store: Make) -> None:
    """A parent thread holds a page (inside a callback) while the main thread forks:
    the child's get_and_set on that page waits for the parent thread's release, then
    runs on the parent's result (no deadlock on an inherited lock, no lost update)."""
    store = make_store(cache_size=PAGE, page_size=PAGE, lock_timeout=PATIENT)
    store.set("k", 0)
    holding, release = threading.Event(), threading.Event()
    r, w = os.pipe()

    def hold() -> None:
        def slow(v: int) -> int:
            holding.set()
            release.wait(30)
            return v + 1

        store.get_and_set("k", slow)

    def child() -> None:
        os.write(w, b"x")
        assert store.get_and_set("k", lambda v: v * 10 + 5) == 15
        store.set("child", "done")

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # forking with a thread running is the point
            pid = fork(child)
        _signalled(r)
        time.sleep(0.2)  # not asserted: lets the child block on the page
        assert store.get("k") == 0  # the child is still waiting: the parent's update has not landed
    finally:
        release.set()
        t.join()
    assert _exit_code(pid) == 0
    assert store.get("k") == 15
    assert store.get("child") == "done"
    assert store.check() == []


_CLOSE_UNDER_A_HOLDER = textwrap.dedent("""
    import os, sys, threading
    from prefork_sessions import MmapStore, SessionStoreError
    a = MmapStore(os.path.join(sys.argv[1], "a"), cache_size=16384, page_size=16384, lock_timeout=5)
    b = MmapStore(os.path.join(sys.argv[1], "b"), cache_size=16384, page_size=16384, lock_timeout=5)
    inside, closed = threading.Event(), threading.Event()
    failures = []

    def worker():
        def slow(v):
            inside.set()
            closed.wait(10)
            return 1
        try:
            a.get_and_set("k", slow)
        except SessionStoreError:
            pass  # refused because the store was closed: fine
        except BaseException as e:
            failures.append(f"get_and_set raised {type(e).__name__}: {e}")
        b.set("x", 1)  # this thread goes on with another store
        b.set("y", 2)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    a.close()
    closed.set()
    t.join()
    again = MmapStore(os.path.join(sys.argv[1], "a"), lock_timeout=5)
    again.set("k", 2)  # the page is not left locked by the worker thread
    assert again.get("k") == 2 and b.get("y") == 2
    assert not failures, failures
    print("ok")
""")


def test_closing_a_store_while_a_thread_holds_a_page_lock(pager_impl: str, tmp_path: Path) -> None:
    """close() while another thread is inside a get_and_set callback: that thread gets
    a store error (or finishes), goes on with other stores, and the page is not left
    locked.  In a subprocess: a robust mutex left on a thread's list after its mapping
    is gone makes that thread's next lock of any page crash the process (SIGSEGV)."""
    env = {k: v for k, v in os.environ.items() if k != _pager.PURE_ENV}
    if pager_impl == "python":
        env[_pager.PURE_ENV] = "1"
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _CLOSE_UNDER_A_HOLDER, str(tmp_path)],
                         check=False, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (
        f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}")


@pytest.mark.parametrize("op", ["set", "get_and_set"])
def test_a_stuck_second_page_below_the_first_is_waited_for_not_tried_forever(
    make_store: Callable[..., MmapStore], op: str
) -> None:
    """An insert whose second page is below its first only tries that page's lock
    (the other order would deadlock). When the second page stays unreadable (its seq
    odd: a writer died there) and its lock busy with a holder that is no thread at
    all (damage), the insert used to back off and try again for ever; now it takes
    both pages in index order after a few tries, the damaged lock is reset, the page
    repaired, and the write lands. In a child with a deadline, so a regression fails
    instead of hanging."""
    store = make_store(page_size=4096, cache_size=4096 * 8, serializer="raw")
    for i in range(16):
        store.set(f"old{i}", b"v%d" % i)
    pager = store._pager
    key = next(k for k in (f"new{i}" for i in range(10000))
               if (lambda h, p1, p2, s0: p2 < p1)(*pager.where(k.encode())))
    _, p1, p2, _ = pager.where(key.encode())
    po2 = L.page_offset(store.page_size, p2)
    with open(store.path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        seq = L.SEQ.unpack_from(mm, po2 + L.OFF_SEQ)[0]
        L.SEQ.pack_into(mm, po2 + L.OFF_SEQ, seq | 1)  # a writer died there
        L.U32.pack_into(mm, po2 + L.OFF_LOCK, 0x3FFFFFF0)  # held by no thread that exists

    def child() -> None:
        if op == "set":
            store.set(key, b"landed")
        else:
            store.get_and_set(key, lambda old: b"landed")
        assert store.get(key) == b"landed"

    pid = fork(child)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the insert was still trying its second page after 20 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert store.get(key) == b"landed"
    assert all(store.get(f"old{i}") == b"v%d" % i for i in range(16))
    assert store.check() == []
