#!/usr/bin/env python3
"""Crash: writer processes SIGKILLed at random moments, over and over, while the
others keep writing, on a store with small pages (compaction and eviction run).

Each of --processes writer slots owns its own keys (so "the last acknowledged
value" of a key is well defined) but they all share pages.  A writer does a
seeded mix of set, delete and get_and_set on its keys, plus short-lived filler
writes, and reports every operation through a pipe twice: in flight, then
acknowledged.  The supervisor drains every pipe, kills a random writer every
few milliseconds, reaps it, checks its keys and starts a new writer in its slot.

Invariants: every key reads back as its last acknowledged value or the value in
flight when its writer died (checked after every kill, and for all keys at the
end), or is missing because one of its two pages had to evict live entries for
room since the key was last checked (the page's eviction counter says so; counted
as "evicted (LRU)", not a loss; the default sizes make this rare); every value read carries a valid checksum; writers die only by our
SIGKILL; recovered_pages > 0 over the run (kills did land mid-write);
store.check() == [].

    python stress/crash.py --processes 4 --seconds 60 --seed 1
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import selectors
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as C

from prefork_sessions import MmapStore
from prefork_sessions import _layout as L  # only to read the per-page eviction counters

REC = struct.Struct("<IIB")  # key index, version, op | IN_FLIGHT
SET, DELETE, UPDATE = 0, 1, 2
IN_FLIGHT = 0x80
U64 = struct.Struct("<Q")
OP_NAMES = {SET: "set", DELETE: "delete", UPDATE: "get_and_set"}


def key_name(slot: int, k: int) -> str:
    return f"w{slot}:k{k}"


def writer(store: MmapStore, slot: int, gen: int, version: int, w: int, ns: argparse.Namespace) -> None:
    """Write forever (until killed): set / delete / get_and_set on our keys, plus fillers."""
    rnd = random.Random(f"{ns.seed}:{slot}:{gen}")
    bad = 0
    while True:
        version += 1
        k = rnd.randrange(ns.keys)
        key = key_name(slot, k)
        op = rnd.choices((SET, DELETE, UPDATE), (60, 10, 30))[0]
        value = C.make_value(key, slot, version, rnd.randrange(ns.max_pad))
        os.write(w, REC.pack(k, version, op | IN_FLIGHT))
        if op == SET:
            store.set(key, value)
        elif op == DELETE:
            store.delete(key)
        else:
            def fn(old: object, key: str = key, value: dict = value) -> dict:
                nonlocal bad
                if old is not None and C.value_problem(key, old):
                    bad += 1
                return value
            store.get_and_set(key, fn)
        os.write(w, REC.pack(k, version, op))
        if bad:
            raise AssertionError(f"{key}: get_and_set saw a value that fails its checksum")
        if rnd.random() < ns.filler:
            # Short-lived churn under fresh keys: pages fill with entries that expire,
            # so writers must make room (expired entries first) and compact.
            f = f"w{slot}:g{gen}:f{version}"
            store.set(f, C.make_value(f, slot, version, rnd.randrange(ns.max_pad // 2)),
                      expire=ns.filler_life)


@dataclass
class Slot:
    """One writer slot: the current process, its pipe, and what it acknowledged."""

    index: int
    pid: int = 0
    fd: int = -1
    buf: bytes = b""
    gen: int = 0
    version: int = 0  # highest version reported so far
    acked: dict[int, int] = field(default_factory=dict)  # key -> version (0: deleted)
    in_flight: tuple[int, int] | None = None  # (key, version or 0 for a delete)
    ops: int = 0
    kills: int = 0
    landed: int = 0  # in-flight writes found applied after the kill
    checked: int = 0
    evicted: int = 0  # keys found missing where their page evicted a live entry
    evictions_seen: dict[int, int] = field(default_factory=dict)  # page -> counter at last verify
    problems: list[str] = field(default_factory=list)

    def feed(self, data: bytes) -> None:
        data = self.buf + data
        end = len(data) - len(data) % REC.size
        for off in range(0, end, REC.size):
            k, v, op = REC.unpack_from(data, off)
            self.version = max(self.version, v)
            value = 0 if op & 0x7F == DELETE else v
            if op & IN_FLIGHT:
                self.in_flight = (k, value)
            else:
                self.acked[k] = value
                self.in_flight = None
                self.ops += 1
        self.buf = data[end:]


class Supervisor:
    def __init__(self, store: MmapStore, ns: argparse.Namespace) -> None:
        self.store, self.ns = store, ns
        self.sel = selectors.DefaultSelector()
        self.slots = [Slot(i) for i in range(ns.processes)]
        self.unexpected: list[str] = []
        fd = os.open(store.path, os.O_RDONLY)
        self.view = mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # our own read-only view of the file
        os.close(fd)

    def page_evictions(self) -> dict[int, int]:
        """Each page's count of live entries evicted for room (a page header field)."""
        s = self.store
        return {p: U64.unpack_from(self.view, L.page_offset(s.page_size, p) + L.OFF_EVICTIONS)[0]
                for p in range(s.num_pages)}

    def evicted_here(self, slot: Slot, key: str, now: dict[int, int]) -> bool:
        """Did one of ``key``'s two candidate pages evict a live entry since the slot's last check?"""
        _, p1, p2, *_ = self.store._pager.locate(key.encode())
        return any(now[p] > slot.evictions_seen.get(p, 0) for p in (p1, p2))

    def start(self, slot: Slot) -> None:
        r, w = os.pipe()
        others = [s.fd for s in self.slots if s.fd >= 0]
        slot.gen += 1
        gen, version = slot.gen, slot.version

        def child() -> None:
            os.close(r)
            for fd in others:  # other writers' pipes must reach EOF when their writer dies
                os.close(fd)
            writer(self.store, slot.index, gen, version, w, self.ns)

        slot.pid = C.fork(child)
        os.close(w)
        os.set_blocking(r, False)
        slot.fd = r
        self.sel.register(r, selectors.EVENT_READ, slot)

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            slot: Slot = key.data
            try:
                data = os.read(slot.fd, 1 << 16)
            except BlockingIOError:
                continue
            if data:
                slot.feed(data)

    def kill(self, slot: Slot) -> None:
        os.kill(slot.pid, signal.SIGKILL)
        _, status = os.waitpid(slot.pid, 0)
        C._children.discard(slot.pid)
        code = os.waitstatus_to_exitcode(status)
        if code != -signal.SIGKILL:
            self.unexpected.append(f"slot {slot.index} gen {slot.gen} exited {code} before the kill")
        self.sel.unregister(slot.fd)
        os.set_blocking(slot.fd, True)
        while data := os.read(slot.fd, 1 << 16):
            slot.feed(data)
        os.close(slot.fd)
        slot.fd, slot.pid = -1, 0
        slot.kills += 1
        self.verify(slot)

    def verify(self, slot: Slot) -> None:
        """Every key of a dead writer reads as acknowledged, or as the write in flight,
        or is missing because its page had to evict live entries (LRU) since we last looked."""
        missing: list[tuple[int, str, set[int]]] = []
        for k in range(self.ns.keys):
            key = key_name(slot.index, k)
            value = self.store.get(key)
            slot.checked += 1
            if value is not None and (why := C.value_problem(key, value)):
                slot.problems.append(f"gen {slot.gen}: {why}")
                continue
            got = value["n"] if value is not None else 0
            allowed = {slot.acked.get(k, 0)}
            if slot.in_flight and slot.in_flight[0] == k:
                allowed.add(slot.in_flight[1])
            if got not in allowed:
                if got == 0:
                    missing.append((k, key, allowed))
                    continue
                slot.problems.append(
                    f"gen {slot.gen}: {key} reads version {got}, "
                    f"expected {' or '.join(str(a or 'missing') for a in sorted(allowed))}")
            elif got != slot.acked.get(k, 0):
                slot.acked[k] = got  # the in-flight write landed
                slot.landed += 1
        now = self.page_evictions()  # after the reads: an eviction before a read shows here
        for k, key, allowed in missing:
            if self.evicted_here(slot, key, now):
                slot.evicted += 1
                slot.acked[k] = 0
            else:
                slot.problems.append(
                    f"gen {slot.gen}: {key} is missing (its pages evicted nothing), expected "
                    f"{' or '.join(str(a or 'missing') for a in sorted(allowed))}")
        slot.evictions_seen = now
        slot.in_flight = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=4, help="writer processes alive at once [4]")
    p.add_argument("--threads", type=int, default=1, choices=[1],
                   help="threads per writer (1: a pipe records one writer's order) [1]")
    p.add_argument("--seconds", type=float, default=60, help="how long to keep killing [60]")
    p.add_argument("--kills", type=int, default=0, help="stop after this many kills (0: no cap) [0]")
    p.add_argument("--min-life", type=float, default=0.002, help="shortest writer life, s [0.002]")
    p.add_argument("--max-life", type=float, default=0.06, help="longest writer life, s [0.06]")
    p.add_argument("--keys", type=int, default=40, help="verified keys per writer slot [40]")
    p.add_argument("--max-pad", type=int, default=600, help="largest value padding, bytes [600]")
    p.add_argument("--filler", type=float, default=0.2,
                   help="chance of a short-lived filler write after each op [0.2]")
    p.add_argument("--filler-life", type=float, default=0.1, help="filler expiry, s [0.1]")
    p.add_argument("--cache-size", type=int, default=1 << 20, help="store bytes [1 MiB]")
    p.add_argument("--page-size", type=int, default=4 << 10, help="page bytes [4 KiB]")
    C.add_common_args(p, timeout=300)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return C.run_in_tmp(parse_args(argv), "crash", run)


def run(ns: argparse.Namespace, tmp: Path) -> int:
    store = MmapStore(tmp / "store", cache_size=ns.cache_size, page_size=ns.page_size, lock_timeout=20)
    sup = Supervisor(store, ns)
    rnd = random.Random(ns.seed)
    for slot in sup.slots:
        sup.start(slot)
    start = time.monotonic()
    kills = 0
    while time.monotonic() - start < ns.seconds and not (ns.kills and kills >= ns.kills):
        deadline = time.monotonic() + rnd.uniform(ns.min_life, ns.max_life)
        while (left := deadline - time.monotonic()) > 0:
            sup.pump(left)
        slot = rnd.choice(sup.slots)
        sup.kill(slot)
        kills += 1
        sup.start(slot)
    for slot in sup.slots:  # the last generation dies the same way
        sup.kill(slot)
    elapsed = time.monotonic() - start

    final: list[str] = []
    for slot in sup.slots:  # every key of every slot, after all the kills
        before = len(slot.problems)
        sup.verify(slot)
        final += slot.problems[before:]
    stats_before = store.stats()
    problems = store.check()
    after_check = []
    for slot in sup.slots:  # check() locked (and so repaired) every page: nothing may change
        before = len(slot.problems)
        sup.verify(slot)
        after_check += slot.problems[before:]
    stats = store.stats()

    report = C.Report(
        f"crash: {ns.processes} writers, {kills} SIGKILLs in {elapsed:.1f} s, {ns.keys} keys each, "
        f"{store.num_pages} pages of {store.page_size} B, seed {ns.seed}",
        ["writer slot", "lives", "ops acked", "in-flight landed", "keys verified",
         "evicted (LRU)", "wrong reads"],
    )
    for slot in sup.slots:
        report.row(slot.index, slot.gen, slot.ops, slot.landed, slot.checked, slot.evicted,
                   len(slot.problems))
    report.row("all", sum(s.gen for s in sup.slots), sum(s.ops for s in sup.slots),
               sum(s.landed for s in sup.slots), sum(s.checked for s in sup.slots),
               sum(s.evicted for s in sup.slots), sum(len(s.problems) for s in sup.slots))
    report.note(
        f"store: recovered_pages {stats['recovered_pages']:,} (before check(): "
        f"{stats_before['recovered_pages']:,}), evictions {stats['evictions']:,}, "
        f"expirations {stats['expirations']:,}, entries {stats['entries']:,}, "
        f"bytes_used {stats['bytes_used']:,} of {stats['capacity']:,}")
    problems_all = [p for s in sup.slots for p in s.problems]
    if problems_all:
        report.note("first wrong reads:\n  " + "\n  ".join(problems_all[:8]))
    report.check("every key reads as its last acknowledged value or the one in flight",
                 not problems_all,
                 f"{len(problems_all)} wrong reads ({len(final)} in the final sweep, "
                 f"{len(after_check)} after check()); evictions {stats['evictions']}")
    report.check("writers died only by our SIGKILL", not sup.unexpected,
                 "; ".join(sup.unexpected[:3]) + " (tracebacks above on stderr)")
    report.check("recovered_pages > 0 (kills landed mid-write)", stats["recovered_pages"] > 0,
                 "no kill landed mid-write: run longer (--seconds) or with more writers")
    report.check("store.check() == []", problems == [], "; ".join(problems[:5]))
    sup.view.close()
    store.close()
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
