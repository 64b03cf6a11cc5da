#!/usr/bin/env python3
"""Crash: writer processes SIGKILLed over and over, in every kind of store operation,
while the others keep writing; keys nobody touches must survive every kill.

Each of --processes writer slots owns its own keys (so "the last acknowledged
value" of a key is well defined) but they all share pages.  A writer runs a
seeded mix of set (insert and overwrite), get_and_set, delete, purge, check()
and filler writes (short-lived ones, so purge and expiry have work; never-expiring
ones, so pages fill with live entries and must evict; together they make pages
compact often), plus set and clear() on a second, small store file (clear wipes
every key, so it gets a file of its own: the first file's expectations stay
exact).  It reports every operation through a pipe twice: in flight, then
acknowledged, with a timestamp.  It also shows in a shared status byte the
operation it is in and the internal phases it is inside: making room, evicting
live entries, compacting, repairing a page a dead writer left mid-change.

The supervisor hunts: it picks an operation or phase (the ones with fewest kills
first, or at random) and orders it through shared memory; each writer, entering
that step, arms a POSIX timer that SIGKILLs it at a random instant within the
step's usual length (the kernel delivers it wherever the process is: a kill from
outside, timed by a supervisor that a loaded machine deschedules, would miss steps
of tens of microseconds).  For --random-kills of the kills the supervisor SIGKILLs
a random writer at a random instant itself.  The page a victim left mid-change is
repaired by its next locker (--checkers processes walk the whole file with check()
and purge(), so within milliseconds), and a writer starting a repair also arms its
timer with --repair-kills chance: writers die while repairing what the previous
victim left, and the next one repairs that.  After each death the supervisor reaps
the writer, counts the kill under the operation and the phases that were in
flight (as the pipe and the status byte say), verifies, and starts a new writer in
the slot.

Bystanders: before the writers start, the supervisor writes --bystanders-per-page
keys into every page (written once, never by a writer).  After every kill, and at
the end, each must read back as exactly its value.  One may vanish only through
LRU eviction: a page's eviction counter bounds how many keys last seen in it may
be missing since the counter was read before they were last seen (an evicted
bystander is written again).

Invariants: no bystander lost; every key of the killed writer reads as its last
acknowledged value or the one in flight, or is missing because one of its pages
evicted since it was last checked; a key of the clear() file may also be missing
when a clear() was in flight or ended after its last write began (timestamps,
CLOCK_MONOTONIC); every value read is one its writer wrote; writers die only by
a SIGKILL (ours, or its own timer); concurrent check() calls find nothing (but a key that moved between
its two pages while check() walked them); recovered_pages > 0 and every operation and
phase got at least --min-kills kills (neither with --min-kills 0, for smoke runs);
store.check() == [] on both files at the end.

--impl both (the default) runs the whole program once per implementation, each in
a fresh interpreter (PREFORK_SESSIONS_PURE=1 for python), then prints both tables
side by side; --seconds and --timeout apply to each.

    python stress/crash.py --impl both --seconds 60 --seed 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import random
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common as C

if TYPE_CHECKING:
    from prefork_sessions import MmapStore

PURE_ENV = "PREFORK_SESSIONS_PURE"
IMPLS = ("c", "python")

# What a writer is doing: the low nibble of its status byte, and the op of a pipe record.
IDLE = 0
SET_INSERT, SET_OVERWRITE, GAS, DELETE, PURGE, CHECK, CLEAR, B_SET, FILLER, JUNK, ADD, TOUCH = range(1, 13)
# Phases inside an operation: the high bits of the status byte.
MAKE_ROOM, EVICT, COMPACT, REPAIR = 0x10, 0x20, 0x40, 0x80
LABELS = {
    SET_INSERT: "set (insert)",
    SET_OVERWRITE: "set (overwrite)",
    GAS: "get_and_set",
    DELETE: "delete",
    PURGE: "purge",
    CHECK: "check()",
    CLEAR: "clear() (second file)",
    B_SET: "set (second file)",
    FILLER: "filler set (expires)",
    JUNK: "filler set (never expires)",
    ADD: "add (filler, expires)",
    TOUCH: "touch",
    IDLE: "between operations",
    MAKE_ROOM: "  in: making room",
    EVICT: "  in: evicting live entries",
    COMPACT: "  in: compaction",
    REPAIR: "  in: repair of a dead writer's page",
}
OPS = [SET_INSERT, SET_OVERWRITE, GAS, DELETE, PURGE, CHECK, CLEAR, B_SET, FILLER, JUNK, ADD, TOUCH]
PHASES = [MAKE_ROOM, EVICT, COMPACT, REPAIR]
# The phases are the page-rewrite steps a pager tells its tracer (``Pager.trace``,
# ``_upkeep.Step``): MAKE_ROOM is a rebuild for a new entry, REPAIR one without;
# EVICT (inside MAKE_ROOM) begins once live entries are chosen to go and ends with
# the rebuild; COMPACT is the copy through the spare (inside either).
# Writer op mix (relative weights).  Long operations (purge, check, clear) are rare:
# the supervisor hunts for them, so they still get their share of kills.
MIX = {SET_INSERT: 30, GAS: 18, DELETE: 10, FILLER: 12, JUNK: 10, B_SET: 5, ADD: 5, TOUCH: 5,
       PURGE: 0.5, CHECK: 0.1, CLEAR: 1.5}
# A checker owns no keys: it walks the whole file, so a page a dead writer left
# mid-change is repaired (and a kill can land in that repair) within milliseconds.
CHECKER_MIX = {CHECK: 3, PURGE: 1}

REC = struct.Struct("<IIBQ")  # key index, version, op | IN_FLIGHT, CLOCK_MONOTONIC ns
IN_FLIGHT = 0x80
NOKEY = 0xFFFFFFFF
U64 = struct.Struct("<Q")
PR_SET_TIMERSLACK = 29
MOVED = " is in pages "  # check()'s words for a key in two pages: racy while writers move keys


def key_name(slot: int, k: int) -> str:
    return f"w{slot}:k{k}"


def b_key_name(slot: int, k: int) -> str:
    return f"w{slot}:c{k}"


# --------------------------------------------------------------------------- writer


class SelfKill:
    """A POSIX timer that SIGKILLs this process: the kernel delivers it at whatever
    instruction the process is at.  For steps too short for the supervisor to see in
    time on a loaded machine (a repair is tens of microseconds)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # 1 ns, not 50 us: the delay is the one asked for
        sev = ctypes.create_string_buffer(64)  # struct sigevent: sigval, signo, notify (SIGEV_SIGNAL = 0)
        struct.pack_into("<qii", sev, 0, 0, signal.SIGKILL, 0)
        self._timer = ctypes.c_void_p()
        if self._libc.timer_create(time.CLOCK_MONOTONIC, sev, ctypes.byref(self._timer)):
            raise OSError(ctypes.get_errno(), "timer_create")

    def arm(self, seconds: float) -> None:
        """SIGKILL after ``seconds`` (0: disarm)."""
        ns = round(seconds * 1e9)
        spec = struct.pack("<qqqq", 0, 0, ns // 10**9, ns % 10**9)  # struct itimerspec: interval, value
        if self._libc.timer_settime(self._timer, 0, spec, None):
            raise OSError(ctypes.get_errno(), "timer_settime")


class Probe:
    """In a writer: marks the store's page-rewrite steps in the writer's status byte
    while they run (a tracer on the pager of each store it watches), and arms the
    writer's SIGKILL inside the step the supervisor ordered (and inside some repairs,
    unordered)."""

    def __init__(self, status: mmap.mmap, orders: mmap.mmap, idx: int, rnd: random.Random,
                 ns: argparse.Namespace) -> None:
        from prefork_sessions._upkeep import Step

        # The C pager passes the step as an int: an IntEnum key matches it.
        self.bits: dict[int, int] = {Step.MAKE_ROOM: MAKE_ROOM, Step.EVICT: EVICT, Step.COMPACT: COMPACT, Step.REPAIR: REPAIR}
        self.status, self.orders, self.idx, self.rnd = status, orders, idx, rnd
        self.repair_kills, self.phase_time = ns.repair_kills, ns.phase_time
        self.timer = SelfKill()
        self.armed_by = -1  # the op or phase whose end disarms the timer
        self.traced: dict[int, object] = {}  # id(store) -> the pager our tracer is on

    def arm(self, by: int, seconds: float) -> None:
        if self.armed_by < 0:
            self.timer.arm(seconds)
            self.armed_by = by

    def disarm(self, by: int) -> None:
        if self.armed_by == by:
            self.timer.arm(0)
            self.armed_by = -1

    def step(self, step: int, entering: bool) -> None:
        """The pagers' tracer.  The C pager calls it with the page and the spare
        locked: an armed kill then lands anywhere in the C code of the step."""
        bit = self.bits[step]
        idx = self.idx
        if entering:
            self.status[idx] |= bit
            if self.orders[idx] == bit or (bit == REPAIR and self.rnd.random() < self.repair_kills):
                self.arm(bit, self.rnd.uniform(1e-6, self.phase_time))
        else:
            self.disarm(bit)
            self.status[idx] &= ~bit

    def watch(self, store: MmapStore) -> None:
        """Put the tracer on ``store``'s pager if it is not on it yet: every open
        (``reopen()``, or the lazy reopen after fork) builds a new pager."""
        pager = store._pager
        if self.traced.get(id(store)) is not pager:
            pager.trace(self.step)
            self.traced[id(store)] = pager


def writer(sup: Supervisor, slot: Slot) -> None:
    """Write forever (until killed, or until the supervisor is gone)."""
    import prefork_sessions

    ns, store, bstore, status, idx = sup.ns, sup.store, sup.bstore, sup.status, slot.index
    assert prefork_sessions.ACCELERATED == (ns.impl == "c"), "writer got the other implementation"
    if not slot.checker:  # the supervisor and the checker first: they must be prompt
        os.nice(ns.nice)
    rnd = random.Random(f"{ns.seed}:{slot.index}:{slot.gen}")
    probe = Probe(status, sup.orders, idx, random.Random(rnd.random()), ns)
    for st in (store, bstore):  # the parent's pagers went at fork: open our own now, and trace them
        st.reopen()
        probe.watch(st)
    present = {k: v != 0 for k, v in slot.acked.items()}
    version = slot.version
    w = slot.wfd
    mix = CHECKER_MIX if slot.checker else MIX
    ops, weights = list(mix), list(mix.values())
    bad: list[str] = []
    sup_pid = sup.pid
    durations = sup.durations  # as the supervisor measured them when it forked us

    def report(k: int, op: int) -> None:
        os.write(w, REC.pack(k, version, op, time.monotonic_ns()))

    while os.getppid() == sup_pid:  # an orphan stops (the supervisor was killed)
        version += 1
        op = rnd.choices(ops, weights)[0]
        k = NOKEY
        if op in (SET_INSERT, GAS, DELETE, TOUCH):
            k = rnd.randrange(ns.keys)
            if op in (DELETE, TOUCH) and not present.get(k):
                op = SET_INSERT
            if op == SET_INSERT and present.get(k):
                op = SET_OVERWRITE
            key = key_name(idx, k)
            value = C.make_value(key, idx, version, rnd.randrange(ns.max_pad))
        elif op == B_SET:
            k = rnd.randrange(ns.clear_keys)
            key = b_key_name(idx, k)
            value = C.make_value(key, idx, version, rnd.randrange(ns.max_pad // 3))
        elif op in (FILLER, JUNK, ADD):
            key = f"w{idx}:g{slot.gen}:f{version}"
            value = C.make_value(key, idx, version, rnd.randrange(ns.max_pad))
        probe.watch(store)  # a store that reopened since has a new, untraced pager
        probe.watch(bstore)
        report(k, op | IN_FLIGHT)
        status[idx] = op
        if sup.orders[idx] == op:
            probe.arm(op, rnd.uniform(1e-6, durations[op]))
        if op in (SET_INSERT, SET_OVERWRITE):
            store.set(key, value)
        elif op == DELETE:
            store.delete(key)
        elif op == GAS:
            def fn(old: object, key: str = key, value: dict[str, Any] = value) -> dict[str, Any]:
                if old is not None and (why := C.value_problem(key, old)):
                    bad.append(why)
                return value
            store.get_and_set(key, fn)
        elif op == B_SET:
            bstore.set(key, value)
        elif op == FILLER:
            store.set(key, value, expire=rnd.uniform(0.02, ns.filler_life))
        elif op == JUNK:
            store.set(key, value, expire=0)
        elif op == ADD:  # a fresh key: the add must store it
            if not store.add(key, value, expire=rnd.uniform(0.02, ns.filler_life)):
                raise AssertionError(f"add({key!r}) of a fresh key stored nothing")
        elif op == TOUCH:  # the value stays the acknowledged one; only its expiry is rewritten
            store.touch(key, expire=0)  # False only if its page evicted it: checked by the verifier
        elif op == PURGE:
            store.purge()
        elif op == CLEAR:
            bstore.clear()
        elif op == CHECK:
            found = [p for p in store.check() if MOVED not in p]
            if found:
                raise AssertionError(f"check() while writing: {found[:5]}")
        probe.disarm(op)
        status[idx] = IDLE
        report(k, op)
        if op in (SET_INSERT, SET_OVERWRITE, GAS, DELETE):
            present[k] = op != DELETE
        if bad:
            raise AssertionError(f"get_and_set saw a value that is not one we wrote: {bad[0]}")


# --------------------------------------------------------------------------- supervisor


@dataclass
class Slot:
    """One writer slot: the current process, its pipe, and what it acknowledged."""

    index: int
    checker: bool = False  # runs check() and purge() only, owns no keys
    pid: int = 0
    fd: int = -1
    wfd: int = -1  # the write end, in the child only
    buf: bytes = b""
    gen: int = 0
    version: int = 0  # highest version reported so far
    acked: dict[int, int] = field(default_factory=dict)  # key -> version (0: deleted)
    b_acked: dict[int, tuple[int, int]] = field(default_factory=dict)  # clear-file key -> (version, start ns)
    in_flight: tuple[int, int, int, int] | None = None  # (op, key, version, start ns)
    ev_seen: dict[int, int] = field(default_factory=dict)  # page -> evictions before the last reads
    b_ev_seen: dict[int, int] = field(default_factory=dict)


@dataclass
class Tally:
    """What one run counted (one implementation)."""

    kills: Counter[int] = field(default_factory=Counter)  # op or phase -> kills landed in it
    acked: Counter[int] = field(default_factory=Counter)  # op -> acknowledged
    bystanders_lost: int = 0
    pages_lost: int = 0  # (verify, page) pairs where every bystander was gone
    own_lost: int = 0  # a killed writer's acknowledged value gone
    wrong: int = 0  # values that are not the expected one
    evicted: int = 0  # missing keys explained by their page's eviction counter
    bystanders_evicted: int = 0  # of which bystanders (written again)
    cleared: int = 0  # clear-file keys missing after a clear()
    landed: int = 0  # in-flight writes found applied after the kill
    verified: int = 0  # key reads checked
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, what: str) -> None:
        if len(self.problems) < 40:
            self.problems.append(what)


class Supervisor:
    def __init__(self, store: MmapStore, bstore: MmapStore, ns: argparse.Namespace) -> None:
        self.store, self.bstore, self.ns = store, bstore, ns
        self.pid = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.slots = [Slot(i, checker=i >= ns.processes) for i in range(ns.processes + ns.checkers)]
        self.status = mmap.mmap(-1, len(self.slots))  # shared with every writer (MAP_SHARED)
        self.orders = mmap.mmap(-1, len(self.slots))  # what the supervisor wants each writer to die in
        self.durations: dict[int, float] = {op: 3e-3 if op in (PURGE, CHECK) else 2e-4 for op in OPS}
        self.tally = Tally()
        self.views = [self._view(s) for s in (store, bstore)]
        self.clear_end = 0  # latest end (ns) of a clear() that ended or whose writer died
        self.bystanders: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {}  # key -> value, pages
        self.by_ev_seen: dict[int, int] = {}
        self.exited: list[Slot] = []  # writers whose pipe reached EOF before we killed them
        self.died_in = ""  # what the last victim was doing

    @staticmethod
    def _view(store: MmapStore) -> mmap.mmap:
        fd = os.open(store.path, os.O_RDONLY)
        try:
            return mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # our own read-only view of the file
        finally:
            os.close(fd)

    def page_evictions(self, which: int) -> dict[int, int]:
        """Each page's count of live entries evicted for room (a page header field)."""
        from prefork_sessions import _layout as L

        s, view = (self.store, self.bstore)[which], self.views[which]
        return {p: U64.unpack_from(view, L.page_offset(s.page_size, p) + L.OFF_EVICTIONS)[0]
                for p in range(s.num_pages)}

    # ------------------------------------------------------------------ bystanders

    def place_bystanders(self) -> None:
        """Write ``--bystanders-per-page`` keys into every page of the first file."""
        per_page = self.ns.bystanders_per_page
        count: Counter[int] = Counter()
        rnd = random.Random(f"{self.ns.seed}:bystanders")
        for i in range(1000 * self.store.num_pages):
            if len(count) == self.store.num_pages and min(count.values()) >= per_page:
                break
            key = f"by{i}"
            _, p1, _, _ = self.store._pager.where(key.encode())
            if count[p1] >= per_page:
                continue
            value = C.make_value(key, -1, 0, rnd.randrange(40, self.ns.max_pad // 2))
            self.store.set(key, value, expire=0)
            pages = self.pages_of(key)
            count[pages[0]] += 1
            self.bystanders[key] = (value, pages)
        self.by_ev_seen = self.page_evictions(0)

    def pages_of(self, key: str) -> tuple[int, ...]:
        """The page the first file holds a key in, or both candidates when the
        lock-free probe could not tell (writers kept the page busy) or found it in neither."""
        from prefork_sessions import _layout as L

        pager, kb = self.store._pager, key.encode()
        h, p1, p2, s0 = pager.where(kb)
        for p in (p1, p2):
            if pager.holds(L.page_offset(self.store.page_size, p), kb, h, s0) == 1:
                return (p,)
        return (p1, p2)

    def rewrite_bystander(self, key: str) -> None:
        value, _ = self.bystanders[key]
        self.store.set(key, value, expire=0)
        self.bystanders[key] = (value, self.pages_of(key))

    # ------------------------------------------------------------------ writers

    def start(self, slot: Slot) -> None:
        r, w = os.pipe()
        others = [s.fd for s in self.slots if s.fd >= 0]
        slot.gen += 1
        self.status[slot.index] = IDLE

        def child() -> None:
            os.close(r)
            for fd in others:  # other writers' pipes must reach EOF when their writer dies
                os.close(fd)
            slot.wfd = w
            writer(self, slot)

        slot.pid = C.fork(child)
        os.close(w)
        os.set_blocking(r, False)
        slot.fd = r
        self.sel.register(r, selectors.EVENT_READ, slot)

    def feed(self, slot: Slot, data: bytes) -> None:
        data = slot.buf + data
        end = len(data) - len(data) % REC.size
        for off in range(0, end, REC.size):
            k, v, opf, t = REC.unpack_from(data, off)
            op = opf & 0x7F
            slot.version = max(slot.version, v)
            if opf & IN_FLIGHT:
                slot.in_flight = (op, k, v, t)
                continue
            start = slot.in_flight[3] if slot.in_flight else t
            slot.in_flight = None
            self.tally.acked[op] += 1
            self.durations[op] += ((t - start) / 1e9 - self.durations[op]) / 16  # for the writers' timers
            if op in (SET_INSERT, SET_OVERWRITE, GAS):
                slot.acked[k] = v
            elif op == DELETE:
                slot.acked[k] = 0
            elif op == B_SET:
                slot.b_acked[k] = (v, start)
            elif op == CLEAR:
                self.clear_end = max(self.clear_end, t)
        slot.buf = data[end:]

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            slot: Slot = key.data
            try:
                data = os.read(slot.fd, 1 << 16)
            except BlockingIOError:
                continue
            if data:
                self.feed(slot, data)
            else:  # the writer is gone: its own SIGKILL (see SelfKill), or it failed
                self.sel.unregister(slot.fd)
                self.exited.append(slot)

    def drain_all(self) -> None:
        """Read every pipe empty (every record written so far is seen)."""
        for slot in self.slots:
            while slot.fd >= 0:
                try:
                    data = os.read(slot.fd, 1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    break
                self.feed(slot, data)

    def hunt(self, rnd: random.Random) -> Slot:
        """The next writer to reap.  For ``--random-kills`` of the kills: a random one
        after a random delay.  Otherwise pick what to kill in (fewest kills first, or
        at random) and order it: each writer arms its own SIGKILL for a random instant
        within its next such step (see ``SelfKill``); the first to die is the one (if
        two did, the other is reaped next round); if none died within the hunt
        window, a random one."""
        ns = self.ns
        if rnd.random() < ns.random_kills:
            deadline = time.monotonic() + rnd.uniform(ns.min_gap, ns.max_gap)
        else:
            kinds = OPS + PHASES
            target = min(kinds, key=lambda kind: (self.tally.kills[kind], rnd.random()))
            if rnd.random() < 0.5:
                target = rnd.choice(kinds)
            self.orders[:] = bytes([target]) * len(self.orders)
            deadline = time.monotonic() + ns.hunt_window
        while (left := deadline - time.monotonic()) > 0 and not self.exited:
            self.pump(left)
        self.orders[:] = bytes(len(self.orders))  # one armed already still dies: reaped next round
        return self.exited[0] if self.exited else rnd.choice(self.slots)

    def kill(self, slot: Slot) -> None:
        os.kill(slot.pid, signal.SIGKILL)
        _, status = os.waitpid(slot.pid, 0)
        died_ns = time.monotonic_ns()
        C._children.discard(slot.pid)
        code = os.waitstatus_to_exitcode(status)
        if code != -signal.SIGKILL:
            self.tally.unexpected.append(f"slot {slot.index} gen {slot.gen} exited {code} before the kill")
        if slot in self.exited:
            self.exited.remove(slot)
        else:
            self.sel.unregister(slot.fd)
        os.set_blocking(slot.fd, True)
        while data := os.read(slot.fd, 1 << 16):
            self.feed(slot, data)
        os.close(slot.fd)
        slot.fd, slot.pid = -1, 0
        op = slot.in_flight[0] if slot.in_flight else IDLE
        phases = self.status[slot.index]
        self.tally.kills[op] += 1
        self.tally.kills[-1] += 1  # all kills
        for bit in PHASES:
            if phases & bit:
                self.tally.kills[bit] += 1
        self.died_in = " / ".join([LABELS[op].strip(), *(LABELS[b].split(": ")[1] for b in PHASES if phases & b)])
        if op == CLEAR:  # it may have wiped pages until it died
            self.clear_end = max(self.clear_end, died_ns)
        if slot.checker:  # nothing of its own to verify
            slot.in_flight = None

    # ------------------------------------------------------------------ verifying

    def verify(self, dead: list[Slot], when: str) -> None:
        """The dead writers' keys and every bystander, against what is allowed."""
        t = self.tally
        ev0, bev0 = self.page_evictions(0), self.page_evictions(1)
        dead = [s for s in dead if not s.checker]
        own = [(s, k, self.store.get(key_name(s.index, k))) for s in dead for k in range(self.ns.keys)]
        bown = [(s, k, self.bstore.get(b_key_name(s.index, k))) for s in dead for k in range(self.ns.clear_keys)]
        by = [(key, self.store.get(key)) for key in self.bystanders]
        self.drain_all()  # every clear() that could have touched what we read is now known
        ev1, bev1 = self.page_evictions(0), self.page_evictions(1)
        t.verified += len(own) + len(bown) + len(by)
        clearing = any(s.in_flight and s.in_flight[0] == CLEAR for s in self.slots)

        def evicted(store: MmapStore, key: str, now: dict[int, int], seen: dict[int, int]) -> bool:
            _, p1, p2, _ = store._pager.where(key.encode())
            return any(now[p] > seen.get(p, 0) for p in (p1, p2))

        def version(key: str, value: Any) -> int | None:
            if value is None:
                return 0
            if why := C.value_problem(key, value):
                t.wrong += 1
                t.problem(f"{when}: {why}")
                return None
            return int(value["n"])

        for s, k, value in own:
            key = key_name(s.index, k)
            got = version(key, value)
            if got is None:
                continue
            allowed = {s.acked.get(k, 0)}
            if s.in_flight and s.in_flight[1] == k and s.in_flight[0] in (SET_INSERT, SET_OVERWRITE, GAS, DELETE):
                allowed.add(0 if s.in_flight[0] == DELETE else s.in_flight[2])
            if got in allowed:
                if got != s.acked.get(k, 0):
                    s.acked[k] = got  # the in-flight write landed
                    t.landed += 1
            elif got == 0 and evicted(self.store, key, ev1, s.ev_seen):
                t.evicted += 1
                s.acked[k] = 0
            elif got == 0:
                t.own_lost += 1
                t.problem(f"{when}: {key} is missing (its pages evicted nothing), expected version "
                          f"{' or '.join(str(a or 'missing') for a in sorted(allowed))}")
                s.acked[k] = 0
            else:
                t.wrong += 1
                t.problem(f"{when}: {key} reads version {got}, expected "
                          f"{' or '.join(str(a or 'missing') for a in sorted(allowed))}")
                s.acked[k] = got
        for s, k, value in bown:
            key = b_key_name(s.index, k)
            got = version(key, value)
            if got is None:
                continue
            acked, start = s.b_acked.get(k, (0, 0))
            allowed = {acked}
            if s.in_flight and s.in_flight[0] == B_SET and s.in_flight[1] == k:
                allowed.add(s.in_flight[2])
                if got == s.in_flight[2]:
                    acked, start = got, s.in_flight[3]
                    s.b_acked[k] = (acked, start)
            if got in allowed:
                continue
            if got == 0 and (clearing or self.clear_end >= start):
                t.cleared += 1
            elif got == 0 and evicted(self.bstore, key, bev1, s.b_ev_seen):
                t.evicted += 1
            elif got == 0:
                t.own_lost += 1
                t.problem(f"{when}: {key} (clear() file) is missing; no clear() or eviction since it was written")
            else:
                t.wrong += 1
                t.problem(f"{when}: {key} (clear() file) reads version {got}, expected "
                          f"{' or '.join(str(a or 'missing') for a in sorted(allowed))}")
            s.b_acked[k] = (got, start)
        for s in dead:
            s.ev_seen, s.b_ev_seen = ev0, bev0
            s.in_flight = None

        budget = {p: ev1[p] - self.by_ev_seen.get(p, 0) for p in ev1}
        held = Counter(pages[0] for _, pages in self.bystanders.values() if len(pages) == 1)
        gone: Counter[int] = Counter()
        for key, value in by:
            expected, pages = self.bystanders[key]
            if value == expected:
                continue
            if value is not None:
                t.wrong += 1
                t.problem(f"{when}: bystander {key} reads {str(value)[:100]}")
            elif (p := next((p for p in pages if budget[p] > 0), None)) is not None:
                budget[p] -= 1
                t.evicted += 1
                t.bystanders_evicted += 1
            else:
                t.bystanders_lost += 1
                gone[pages[0]] += 1
                t.problem(f"{when}: bystander {key} (page {'/'.join(map(str, pages))}) is missing; "
                          "its page evicted nothing")
            self.rewrite_bystander(key)
        self.by_ev_seen = ev0
        t.pages_lost += sum(n >= held[page] for page, n in gone.items())

    # ------------------------------------------------------------------ the end

    def round(self, rnd: random.Random) -> None:
        """One kill (or a writer's own timed SIGKILL), the verification, the restart."""
        slot = self.hunt(rnd)
        self.kill(slot)
        self.verify([slot], f"kill {self.tally.kills[-1]} (in {self.died_in})")
        self.start(slot)

    def stop_all(self) -> None:
        for slot in self.slots:
            if slot.pid:
                self.kill(slot)
        self.verify(self.slots, "final sweep")


# --------------------------------------------------------------------------- the table


def summary(t: Tally, stats: dict[str, Any], bstats: dict[str, Any], end_problems: list[str],
            kills_per_minute: float) -> list[tuple[str, Any]]:
    """The rows of the table, for one implementation."""
    rows: list[tuple[str, Any]] = [(LABELS[op], t.kills[op]) for op in OPS + [IDLE] + PHASES]
    rows += [
        ("kills (all)", t.kills[-1]),
        ("kills per minute", round(kills_per_minute)),
        ("operations acknowledged", sum(t.acked.values())),
        ("untouched keys lost (must be 0)", t.bystanders_lost),
        ("  pages that lost all their bystanders", t.pages_lost),
        ("acknowledged values lost (must be 0)", t.own_lost),
        ("wrong values read (must be 0)", t.wrong),
        ("unexpected writer deaths (must be 0)", len(t.unexpected)),
        ("check() problems at the end (must be 0)", len(end_problems)),
        ("key reads verified", t.verified),
        ("in-flight writes found applied", t.landed),
        ("missing keys explained by LRU eviction", t.evicted),
        ("  of which bystanders (written again)", t.bystanders_evicted),
        ("missing after a clear() (second file)", t.cleared),
        ("store evictions (counter)", stats["evictions"] + bstats["evictions"]),
        ("store expirations (counter)", stats["expirations"] + bstats["expirations"]),
        ("recovered pages", stats["recovered_pages"] + bstats["recovered_pages"]),
    ]
    return rows


def table(title: str, columns: dict[str, list[tuple[str, Any]]]) -> C.Report:
    report = C.Report(title, ["operation in flight / outcome", *columns])
    for i, (label, _) in enumerate(next(iter(columns.values()))):
        report.row(label, *(col[i][1] for col in columns.values()))
    return report


def add_checks(report: C.Report, impl: str, rows: dict[str, Any], min_kills: int) -> None:
    p = f"[{impl}] "
    report.check(p + "no untouched (bystander) key lost", rows["untouched keys lost (must be 0)"] == 0,
                 f"{rows['untouched keys lost (must be 0)']} lost, "
                 f"{rows['  pages that lost all their bystanders']} whole pages")
    report.check(p + "every killed writer's key reads as acknowledged or in flight",
                 rows["acknowledged values lost (must be 0)"] == 0,
                 f"{rows['acknowledged values lost (must be 0)']} acknowledged values lost")
    report.check(p + "every value read is the expected one", rows["wrong values read (must be 0)"] == 0,
                 f"{rows['wrong values read (must be 0)']} wrong values")
    report.check(p + "writers died only by our SIGKILL", rows["unexpected writer deaths (must be 0)"] == 0,
                 f"{rows['unexpected writer deaths (must be 0)']} died on their own (tracebacks on stderr)")
    report.check(p + "store.check() == [] at the end (both files)",
                 rows["check() problems at the end (must be 0)"] == 0,
                 f"{rows['check() problems at the end (must be 0)']} problems")
    if min_kills > 0:  # --min-kills 0 (a smoke run): a few seconds cannot promise one
        report.check(p + "recovered_pages > 0 (kills landed mid-change)", rows["recovered pages"] > 0,
                     "no kill landed mid-change: run longer (--seconds)")
    short = [LABELS[k].strip() for k in OPS + PHASES if rows[LABELS[k]] < min_kills]
    report.check(p + f"every operation and phase got >= {min_kills} kills", not short,
                 "too few kills in: " + ", ".join(short) + " (run longer, or see the notes)")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["c", "python", "both"], default="both",
                   help="which pager: c, python (PREFORK_SESSIONS_PURE=1), or both, one after the other [both]")
    p.add_argument("--processes", type=int, default=4, help="writer processes alive at once [4]")
    p.add_argument("--checkers", type=int, default=1,
                   help="processes that only run check() and purge() (and so repair pages promptly) [1]")
    p.add_argument("--seconds", type=float, default=60, help="how long to keep killing, per implementation [60]")
    p.add_argument("--kills", type=int, default=0, help="stop after this many kills (0: no cap) [0]")
    p.add_argument("--random-kills", type=float, default=0.25,
                   help="share of kills at a random instant of a random writer, not hunted [0.25]")
    p.add_argument("--min-gap", type=float, default=0.001, help="shortest wait before a random kill, s [0.001]")
    p.add_argument("--max-gap", type=float, default=0.02, help="longest wait before a random kill, s [0.02]")
    p.add_argument("--hunt-window", type=float, default=0.05,
                   help="how long to wait for a writer to die in the ordered operation, s [0.05]")
    p.add_argument("--repair-kills", type=float, default=0.3,
                   help="chance that a writer starting a repair arms its SIGKILL unordered [0.3]")
    p.add_argument("--phase-time", type=float, default=300e-6,
                   help="the longest delay of a SIGKILL armed at the start of a phase, s (about a "
                        "repair's length) [0.0003]")
    p.add_argument("--nice", type=int, default=5, help="writers' niceness increment (0: as the supervisor) [5]")
    p.add_argument("--keys", type=int, default=40, help="verified keys per writer slot [40]")
    p.add_argument("--clear-keys", type=int, default=8, help="verified keys per writer slot in the clear() file [8]")
    p.add_argument("--bystanders-per-page", type=int, default=2, help="untouched keys in every page [2]")
    p.add_argument("--max-pad", type=int, default=600, help="largest value padding, bytes [600]")
    p.add_argument("--filler-life", type=float, default=0.3, help="longest expiring-filler life, s [0.3]")
    p.add_argument("--cache-size", type=int, default=512 << 10, help="store bytes [512 KiB]")
    p.add_argument("--page-size", type=int, default=4 << 10, help="page bytes [4 KiB]")
    p.add_argument("--clear-cache-size", type=int, default=64 << 10, help="clear() file bytes [64 KiB]")
    p.add_argument("--min-kills", type=int, default=1,
                   help="fail unless every operation and phase got this many kills, and some kill "
                        "landed mid-change (0: neither, for short smoke runs) [1]")
    p.add_argument("--summary", default=None, help=argparse.SUPPRESS)  # --impl both: a child's rows, as JSON
    C.add_common_args(p, timeout=300)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.impl == "both":
        return run_both(ns, argv if argv is not None else sys.argv[1:])
    # Before prefork_sessions is first imported: it picks its pager at import time.
    if ns.impl == "python":
        os.environ[PURE_ENV] = "1"
    else:
        os.environ.pop(PURE_ENV, None)
    return C.run_in_tmp(ns, "crash", run)


def run(ns: argparse.Namespace, tmp: Path) -> int:
    import prefork_sessions
    from prefork_sessions import MmapStore

    if prefork_sessions.ACCELERATED != (ns.impl == "c"):
        print(f"--impl {ns.impl}: prefork_sessions.ACCELERATED is {prefork_sessions.ACCELERATED}"
              + (" (the C extension did not load: build it with pip install -e .)" if ns.impl == "c" else ""),
              file=sys.stderr)
        return 2
    store = MmapStore(tmp / "store", cache_size=ns.cache_size, page_size=ns.page_size, lock_timeout=20)
    bstore = MmapStore(tmp / "clear_store", cache_size=ns.clear_cache_size, page_size=ns.page_size,
                       lock_timeout=20)
    sup = Supervisor(store, bstore, ns)
    sup.place_bystanders()
    rnd = random.Random(ns.seed)
    for slot in sup.slots:
        sup.start(slot)
    start = time.monotonic()
    while time.monotonic() - start < ns.seconds and not (ns.kills and sup.tally.kills[-1] >= ns.kills):
        sup.round(rnd)
    sup.stop_all()  # the last generation dies the same way; then every key is verified
    elapsed = time.monotonic() - start

    end_problems = [f"store: {p}" for p in store.check()] + [f"clear() file: {p}" for p in bstore.check()]
    sup.verify(sup.slots, "after check()")  # check() locked (and so repaired) every page: nothing may change
    t = sup.tally
    rows = summary(t, store.stats(), bstore.stats(), end_problems, t.kills[-1] / elapsed * 60)
    name = "C pager" if ns.impl == "c" else "pure-Python pager"
    report = table(
        f"crash ({name}): {ns.processes} writers + {ns.checkers} checker, {t.kills[-1]:,} SIGKILLs in {elapsed:.1f} s, "
        f"{store.num_pages} pages of {store.page_size} B with {len(sup.bystanders)} bystanders, "
        f"{ns.keys} keys per writer, seed {ns.seed}",
        {ns.impl: rows},
    )
    if t.problems:
        report.note("first problems:\n  " + "\n  ".join(t.problems[:12]))
    if end_problems:
        report.note("check() at the end:\n  " + "\n  ".join(end_problems[:8]))
    add_checks(report, ns.impl, dict(rows), ns.min_kills)
    if ns.summary:
        Path(ns.summary).write_text(json.dumps({"rows": rows, "problems": t.problems[:12],
                                                "unexpected": t.unexpected[:3]}))
    for view in sup.views:
        view.close()
    store.close()
    bstore.close()
    return report.finish()


def run_both(ns: argparse.Namespace, argv: list[str]) -> int:
    """Each implementation in a fresh interpreter (the pager is chosen at import), then both tables."""
    columns: dict[str, list[tuple[str, Any]]] = {}
    codes: dict[str, int] = {}
    rest, skip = [], False
    for a in argv:  # drop "--impl both" / "--impl=both"
        if not skip and not a.startswith("--impl"):
            rest.append(a)
        skip = a == "--impl"
    with tempfile.TemporaryDirectory(prefix="stress-crash-both-", dir=ns.dir) as tmp:
        for impl in IMPLS:
            out = Path(tmp) / f"{impl}.json"
            print(f"=== --impl {impl}", flush=True)
            try:
                p = subprocess.run([sys.executable, __file__, *rest, "--impl", impl, "--summary", str(out)],
                                   check=False, timeout=ns.timeout + 60)
                codes[impl] = p.returncode
            except subprocess.TimeoutExpired:
                codes[impl] = C.TIMEOUT_EXIT
            print(flush=True)
            if out.exists():
                columns[impl] = [(label, n) for label, n in json.loads(out.read_text())["rows"]]
    if not columns:
        print("no implementation produced a table", file=sys.stderr)
        return 1
    report = table(f"crash: both implementations, {ns.seconds:g} s each, seed {ns.seed}", columns)
    for impl in IMPLS:
        report.check(f"[{impl}] every invariant held (its report above)", codes.get(impl) == 0,
                     f"exit {codes.get(impl)}")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
