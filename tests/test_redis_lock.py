"""RedisStore.get_and_set's per-key lock on a real redis-server: exact counts from forked
processes and threads, the commands an update costs (from the server's INFO commandstats),
a holder killed mid-callback, a callback that outlives its lease, one that raises, a plain
write under a running callback, and waits bounded by lock_timeout and the socket timeout.

Timings appear only as generous upper bounds (or as lock_timeout/lock_lease settings
whose LockTimeoutError would fail the test): they prove "not forever", never a speed."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from _procs import fork, wait_ok

from prefork_sessions import InvalidArgumentError, LockTimeoutError, RedisStore, SerializationError

# Commands only a client sends (our scripts never call them), and the ones the scripts
# call inside Redis, which INFO commandstats counts as well.
CLIENT_ONLY = {"evalsha", "eval", "blpop"}
INSIDE_SCRIPTS = {"get", "set", "del", "exists", "pttl", "pexpire", "time",
                  "lpop", "lpush", "rpush", "lrem", "zadd", "zrem", "zscore"}
BOOKKEEPING = {"info", "hello", "client|setinfo", "script|load", "ping"}


@pytest.fixture
def make(redis_url: str) -> Iterator[Any]:
    """RedisStores on the worker's server under a fresh prefix (closed at teardown)."""
    made: list[RedisStore] = []
    prefix = f"lock:{uuid.uuid4().hex}:"

    def make_store(**kw: Any) -> RedisStore:
        store = RedisStore(redis_url, prefix=prefix, **kw)
        made.append(store)
        return store

    yield make_store
    for store in made:
        store.close()


def commandstats(store: RedisStore) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stat["calls"]
            for name, stat in store.client.info("commandstats").items()}


def sent_per_update(store: RedisStore, before: dict[str, int], updates: int) -> tuple[float, dict[str, int]]:
    """Commands the clients sent per update since ``before``, and every command's delta."""
    after = commandstats(store)
    delta = {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}
    unexpected = set(delta) - CLIENT_ONLY - INSIDE_SCRIPTS - BOOKKEEPING
    assert not unexpected, f"get_and_set sent commands outside its two scripts and BLPOP: {delta}"
    return sum(delta.get(name, 0) for name in CLIENT_ONLY) / updates, delta


def increment(v: Any) -> Any:
    return (v or 0) + 1


def test_eight_processes_count_exactly_with_at_most_three_commands_per_update(make: Any) -> None:
    store = make()
    store.get_and_set("c", increment)  # the scripts are loaded
    before = commandstats(store)

    def child() -> None:
        store.reopen()
        for _ in range(150):
            store.get_and_set("c", increment)

    wait_ok([fork(child) for _ in range(8)])
    assert store.get("c") == 1 + 8 * 150
    per_update, delta = sent_per_update(store, before, 8 * 150)
    assert delta.get("blpop", 0) > 0, f"no update ever waited: nothing was contended ({delta})"
    assert per_update <= 3, delta


def test_an_uncontended_update_is_two_commands(make: Any) -> None:
    store = make()
    store.get_and_set("c", increment)
    before = commandstats(store)
    for _ in range(50):
        store.get_and_set("c", increment, keep_expiry=True)
    per_update, delta = sent_per_update(store, before, 50)
    assert per_update == 2 and "blpop" not in delta, delta
    assert store.get("c") == 51


def test_processes_and_threads_together_count_exactly(make: Any) -> None:
    store = make()

    def child() -> None:
        store.reopen()

        def work() -> None:
            for _ in range(60):
                store.get_and_set("c", increment)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    wait_ok([fork(child) for _ in range(3)])
    assert store.get("c") == 3 * 3 * 60


def test_a_holder_killed_mid_callback_delays_the_others_by_one_lease_and_loses_nothing(
    make: Any,
) -> None:
    lease = 1.0
    store = make(lock_lease=lease, lock_timeout=30)
    store.set("c", 0)
    entered_r, entered_w = os.pipe()

    def holder() -> None:
        store.reopen()

        def hold(v: Any) -> Any:
            os.write(entered_w, b"x")
            time.sleep(3600)
            return v + 1000

        store.get_and_set("c", hold)

    victim = fork(holder)
    assert os.read(entered_r, 1) == b"x"  # the victim holds the lock now

    def other() -> None:
        store.reopen()
        for _ in range(20):
            store.get_and_set("c", increment)

    started = time.monotonic()
    others = [fork(other) for _ in range(4)]
    time.sleep(0.2)  # the others queue up behind the victim (or not yet: then they wait on the lock)
    os.kill(victim, signal.SIGKILL)
    os.waitpid(victim, 0)
    wait_ok(others)  # none raised LockTimeoutError (lock_timeout=30): the lease freed the key
    assert store.get("c") == 4 * 20  # the victim wrote nothing, and no other update was lost
    assert time.monotonic() - started < lease + 20  # about one lease, generously: not forever
    os.close(entered_r)
    os.close(entered_w)


def test_a_callback_that_outlives_its_lease_runs_again_on_the_fresh_value(make: Any) -> None:
    store = make(lock_lease=0.3, lock_timeout=30)
    store.set("c", 0)
    seen: list[int] = []
    entered = threading.Event()

    def slow(v: int) -> int:
        seen.append(v)
        if len(seen) == 1:
            entered.set()
            time.sleep(1.0)  # past the lease: another caller takes the key meanwhile
        return v + 1

    def others() -> None:
        entered.wait()
        for _ in range(5):
            store.get_and_set("c", increment)

    helper = threading.Thread(target=others)
    helper.start()
    assert store.get_and_set("c", slow) == seen[-1] + 1
    helper.join()
    assert len(seen) >= 2 and seen[0] == 0  # the first run's result was never written
    assert store.get("c") == 6


def test_a_callback_that_raises_lets_go_of_the_lock_at_once(make: Any) -> None:
    # A lock left behind would hold the next caller for the 60 s lease, far past its
    # 5 s lock_timeout: LockTimeoutError would fail the test.
    store = make(lock_lease=60, lock_timeout=5)
    store.set("c", 1)
    for bad in (lambda v: 1 / 0, lambda v: object()):  # fn raises; its result cannot be stored
        with pytest.raises((ZeroDivisionError, SerializationError)):
            store.get_and_set("c", bad)
        assert store.get("c") == 1
        pid = fork(lambda: store.reopen() or store.get_and_set("c", increment))
        wait_ok([pid])
        assert store.get("c") == 2
        store.set("c", 1)


def test_a_raising_holder_hands_the_lock_to_its_waiter(make: Any) -> None:
    store = make(lock_lease=60, lock_timeout=5)
    store.set("c", 1)
    entered, go = threading.Event(), threading.Event()
    refused: list[BaseException] = []

    def refuse(v: Any) -> Any:
        entered.set()
        go.wait()
        raise ValueError("refused")

    def holder() -> None:
        try:
            store.get_and_set("c", refuse)
        except ValueError as e:
            refused.append(e)

    held = threading.Thread(target=holder)
    held.start()
    entered.wait()
    waiting = threading.Thread(target=lambda: store.get_and_set("c", increment))
    waiting.start()
    time.sleep(0.2)  # the waiter queues (if it has not yet, it finds the lock free later)
    go.set()
    held.join()
    waiting.join()  # a lock left held would cost it LockTimeoutError (lease 60 s > 5 s)
    assert len(refused) == 1 and store.get("c") == 2


def test_a_plain_write_under_a_running_callback_is_not_lost(make: Any) -> None:
    store = make()
    store.set("k", 0)
    seen: list[int] = []
    where = store.redis_key("k")

    def fn(v: int) -> int:
        seen.append(v)
        if len(seen) == 1:
            store.client.set(where, b"100")  # a writer that takes no lock
        return v + 1

    assert store.get_and_set("k", fn) == 101
    assert seen == [0, 100] and store.get("k") == 101
    store.delete("k")
    store.set("k", 5)
    seen.clear()

    def vanish(v: Any) -> Any:
        seen.append(v)
        if len(seen) == 1:
            store.client.delete(where)
        return "absent" if v is None else v + 1

    assert store.get_and_set("k", vanish) == "absent" and seen == [5, None]


def test_a_waiter_gives_up_after_lock_timeout_and_leaves_the_line(make: Any) -> None:
    holder_store = make(lock_lease=60)
    impatient = make(lock_timeout=0.5)
    holder_store.set("c", 0)
    entered, go = threading.Event(), threading.Event()

    def hold(v: int) -> int:
        entered.set()
        go.wait()
        return v + 1

    t = threading.Thread(target=lambda: holder_store.get_and_set("c", hold))
    t.start()
    entered.wait()
    with pytest.raises(LockTimeoutError, match="lock_timeout=0.5"):
        impatient.get_and_set("c", increment)
    go.set()
    t.join()
    # The holder's release found no live waiter to hand the key to: a fresh caller gets it
    # at once (a handoff to the one that gave up would hold it for the 60 s lease).
    patient = make(lock_timeout=5)
    assert patient.get_and_set("c", increment) == 2


def test_waits_stay_below_the_socket_timeout(make: Any) -> None:
    # Each BLPOP must end before socket_timeout, or redis-py would raise TimeoutError
    # (StoreUnavailableError here) while the holder is merely slow.
    holder_store = make()
    waiter_store = make(socket_timeout=0.3)
    holder_store.set("c", 0)
    entered = threading.Event()

    def slow(v: int) -> int:
        entered.set()
        time.sleep(1.5)
        return v + 1

    t = threading.Thread(target=lambda: holder_store.get_and_set("c", slow))
    t.start()
    entered.wait()
    assert waiter_store.get_and_set("c", increment) == 2
    t.join()


@pytest.mark.parametrize("name", ["lock_timeout", "lock_lease"])
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "1", True, None], ids=repr)
def test_bad_lock_settings_are_refused(redis_url: str, name: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=name):
        RedisStore(redis_url, **{name: value})
