"""Byte-level damage to a store file stays in its page, is repaired, and never raises
outside the error tree; a writer killed mid-change never costs a neighbour's data."""

from __future__ import annotations

import os
import random
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _procs import fork

from prefork_sessions import LockTimeoutError, MmapStore, SessionStoreError
from prefork_sessions import _layout as L

Make = Callable[..., MmapStore]
PAGE = 4096


def _patch(path: str, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _read(path: str, at: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(at)
        return f.read(n)


def _entry_of(path: str, key: str, value: bytes) -> int:
    """File offset of the entry holding ``key`` with ``value`` (found by its bytes)."""
    at = Path(path).read_bytes().index(key.encode() + value)
    return at - L.ENTRY_SIZE


def _page_of(store: MmapStore, eo: int) -> int:
    return (eo - L.HEADER_SIZE) // store.page_size - 1


def _slot_pointing_at(store: MmapStore, eo: int) -> int:
    page = _page_of(store, eo)
    po = L.page_offset(store.page_size, page)
    table = _read(store.path, po + L.PAGE_HDR_SIZE, store.stats()["page_size"] // 256 * 8)
    for i in range(len(table) // 8):
        if struct.unpack_from("<I", table, i * 8)[0] == eo - po:
            return po + L.PAGE_HDR_SIZE + i * 8
    raise AssertionError("no slot points at the entry")


def test_repair_does_not_trust_zeroed_counts(make_store: Make) -> None:
    """What struct.pack_into leaves when a kill lands inside it: the page's counts
    zeroed, seq odd.  Repair walks the entries themselves and keeps every one."""
    store = make_store(page_size=PAGE, cache_size=PAGE, serializer="raw")
    values = {f"k{i}": bytes([65 + i]) * 200 for i in range(8)}
    for k, v in values.items():
        store.set(k, v)
    po = L.page_offset(PAGE, 0)
    seq = L.SEQ.unpack(_read(store.path, po + L.OFF_SEQ, L.SEQ.size))[0]
    _patch(store.path, po + L.OFF_SEQ, L.SEQ.pack(seq + 1) + bytes(L.COUNTS.size))
    store.set("other", b"x")  # locks the page: repair
    assert {k: store.get(k) for k in values} == values
    assert store.stats()["recovered_pages"] == 1
    assert store.check() == []


def test_a_busy_spare_fails_the_set_and_keeps_the_old_value(make_store: Make, pager_impl: str) -> None:
    """A set that must rebuild its page waits for the spare before it changes
    anything: when the spare stays busy it raises LockTimeoutError and the key
    keeps its value (the old code had already dropped it)."""
    store = make_store(page_size=PAGE, cache_size=PAGE, serializer="raw", lock_timeout=0.2)
    for i in range(11):
        store.set(f"k{i}", bytes([65 + i]) * 300)
    r, w = os.pipe()

    def hold_spare() -> None:
        other = MmapStore(store.path, serializer="raw", page_size=PAGE, cache_size=PAGE)
        assert other._pager.lock(L.SPARE_LOCK, 5.0) == 0
        os.write(w, b"x")
        time.sleep(60)  # killed below

    pid = fork(hold_spare)
    os.close(w)
    assert os.read(r, 1) == b"x", "the child could not take the spare"
    try:
        with pytest.raises(LockTimeoutError):
            store.set("k3", b"N" * 2500)  # needs room: eviction through the spare
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert {f"k{i}": store.get(f"k{i}") for i in range(11)} == {f"k{i}": bytes([65 + i]) * 300 for i in range(11)}
    store.set("k3", b"N" * 2500)  # the spare is free again
    assert store.get("k3") == b"N" * 2500
    assert store.check() == []


def test_a_bad_length_field_stays_in_its_page(make_store: Make) -> None:
    """One corrupted length field, then ordinary writes that compact that page:
    every key of every other page is intact (the old code copied the unchecked
    entry through the spare over its neighbours: 54 of 135 keys lost)."""
    store = make_store(page_size=PAGE, cache_size=PAGE * 24, serializer="raw")
    values = {f"key{i}": f"{i:04}".encode() * 40 for i in range(135)}
    for k, v in values.items():
        store.set(k, v)
    eo = _entry_of(store.path, "key7", values["key7"])
    page = _page_of(store, eo)
    _patch(store.path, eo + 12, struct.pack("<I", 60000))  # value length far past the page
    home = [k for k in values if page in store._pager.where(k.encode())[1:3] and k != "key7"]
    for i in range(40):  # ordinary writes to that page's keys: it fills with dead bytes and compacts
        store.set(home[i % len(home)], b"z" * 300)
    problems = store.check()
    assert all(p.startswith(f"page {page}:") for p in problems), problems
    for k, v in values.items():
        if page not in store._pager.where(k.encode())[1:3]:
            assert store.get(k) == v, k
    assert store.stats()["evictions"] == 0
    assert store.check() == []


def test_a_slot_pointing_at_a_superseded_entry_is_never_served(make_store: Make) -> None:
    """Change one slot offset to point at a key's old, dead entry: readers must not
    serve the old value (a demoted user reading back as admin)."""
    store = make_store(page_size=PAGE, cache_size=PAGE)
    store.set("role", "admin-admin-admin")
    store.set("role", "user-user-user-user")
    old = _entry_of(store.path, "role", b'"admin-admin-admin"')
    new = _entry_of(store.path, "role", b'"user-user-user-user"')
    so = _slot_pointing_at(store, new)
    _patch(store.path, so, struct.pack("<I", old - L.page_offset(PAGE, 0)))
    assert store.get("role") == "user-user-user-user"
    assert store.check() == []


def test_a_damaged_dead_flag_never_resurrects_an_older_value(make_store: Make) -> None:
    """Clear the dead flag of a key's old entry: repair keeps only the latest entry
    of each key, so the old value cannot come back."""
    store = make_store(page_size=PAGE, cache_size=PAGE)
    store.set("role", "admin-admin-admin")
    store.set("role", "user-user-user-user")
    old = _entry_of(store.path, "role", b'"admin-admin-admin"')
    _patch(store.path, old + L.OFF_DEAD, b"\0")
    store.check()
    assert store.get("role") == "user-user-user-user"


DAMAGE = [
    ("slot offset past the page", lambda s, eo, so: _patch(s.path, so, struct.pack("<I", 0xFFFFFFF0))),
    ("slot offset misaligned", lambda s, eo, so: _patch(s.path, so, struct.pack("<I", eo + 3 - L.page_offset(PAGE, _page_of(s, eo))))),
    ("slot offset into the slot table", lambda s, eo, so: _patch(s.path, so, struct.pack("<I", 8))),
    ("key length huge", lambda s, eo, so: _patch(s.path, eo + 16, struct.pack("<H", 0xFFFF))),
    ("key bytes not UTF-8", lambda s, eo, so: _patch(s.path, eo + L.ENTRY_SIZE, b"\xff")),
    ("page bump zero", lambda s, eo, so: _patch(s.path, L.page_offset(PAGE, _page_of(s, eo)) + L.OFF_BUMP, bytes(4))),
    ("page bump past the page", lambda s, eo, so: _patch(s.path, L.page_offset(PAGE, _page_of(s, eo)) + L.OFF_BUMP, struct.pack("<I", 1 << 30))),
    ("entry count wrapped", lambda s, eo, so: _patch(s.path, L.page_offset(PAGE, _page_of(s, eo)) + L.OFF_ENTRIES, struct.pack("<I", 0xFFFFFFFF))),
    ("entry count zero", lambda s, eo, so: _patch(s.path, L.page_offset(PAGE, _page_of(s, eo)) + L.OFF_ENTRIES, bytes(4))),
    ("dead bytes at the limit", lambda s, eo, so: _patch(s.path, L.page_offset(PAGE, _page_of(s, eo)) + L.OFF_DEADBYTES, b"\xff" * 4)),
    ("used slots at the limit", lambda s, eo, so: _patch(s.path, L.page_offset(PAGE, _page_of(s, eo)) + L.OFF_USED, b"\xff" * 4)),
    ("dead flag set on a live entry", lambda s, eo, so: _patch(s.path, eo + L.OFF_DEAD, b"\1")),
    ("spare marked valid for a sound page", lambda s, eo, so: _patch(s.path, L.SPARE_STATE_OFF, L.SPARE_STATE.pack(L.SPARE_VALID, _page_of(s, eo), PAGE, 0))),
]


@pytest.mark.parametrize("what", [d[0] for d in DAMAGE])
def test_damage_to_one_slot_or_entry_raises_nothing_and_is_repaired(make_store: Make, what: str) -> None:
    store = make_store(page_size=PAGE, cache_size=PAGE * 4, expire=3600)
    values = {f"k{i}": f"value-{i}-" * 10 for i in range(30)}
    for k, v in values.items():
        store.set(k, v)
    eo = _entry_of(store.path, "k5", f'"{values["k5"]}"'.encode())
    damage = dict(DAMAGE)[what]
    damage(store, eo, _slot_pointing_at(store, eo))
    page = _page_of(store, eo)
    ops: list[Callable[[], object]] = [
        lambda: store.keys(), lambda: len(store), lambda: store.purge(), lambda: store.set("k5", "new"),
        lambda: store.get("k5"), lambda: store.get_and_set("k5", lambda v: "again"), lambda: store.delete("k5"),
        lambda: "k5" in store,
    ]
    for op in ops:
        op()  # raises nothing: the first locked call repairs the page
    store.check()  # may report (and repair) what no operation had a reason to look at: counters
    assert store.check() == []
    assert store.get("k5") is None  # deleted last
    for k, v in values.items():
        if k != "k5" and page not in store._pager.where(k.encode())[1:3]:
            assert store.get(k) == v, k  # other pages never lose anything


RANDOM_OPS: list[Callable[[MmapStore, str], object]] = [
    lambda s, k: s.get(k), lambda s, k: s.set(k, b"n"), lambda s, k: s.delete(k), lambda s, k: s.keys(),
    lambda s, k: s.purge(), lambda s, k: s.get_and_set(k, lambda v: b"u"),
]


@pytest.mark.parametrize("seed", range(4))
def test_random_byte_damage_stays_in_its_page(make_store: Make, seed: int) -> None:
    """Random bytes of one page overwritten, many times over: every call either works or
    raises one of our errors, the keys of the other pages keep their values, and after
    check() the file is sound."""
    rnd = random.Random(seed)
    for case in range(60):
        store = make_store(f"s{case}", page_size=PAGE, cache_size=PAGE * 4, serializer="raw")
        values = {f"k{i}": rnd.randbytes(rnd.randrange(1, 200)) for i in range(24)}
        for k, v in values.items():
            store.set(k, v)
        assert store.stats()["evictions"] == 0
        page = rnd.randrange(4)
        po = L.page_offset(PAGE, page)
        for _ in range(rnd.choice((1, 1, 2, 8))):
            at = rnd.choice((rnd.randrange(64), rnd.randrange(64, 192), rnd.randrange(192, PAGE)))
            _patch(store.path, po + at, rnd.randbytes(rnd.choice((1, 2, 4))))
        for k in rnd.sample(list(values), 10):
            try:
                rnd.choice(RANDOM_OPS)(store, k)
            except SessionStoreError:
                pass
            values.pop(k)
        store.check()
        assert store.check() == []
        for k, v in values.items():
            if page not in store._pager.where(k.encode())[1:3]:
                assert store.get(k) == v, (case, k)
        store.close()


def test_both_pagers_read_damaged_pages_alike(tmp_path: Path) -> None:
    """The C pager and the reference agree on every damaged page: the same whole
    entries from walk(), the same probe results from find() (DAMAGED included), and
    the same page after rebuild() repairs it."""
    import mmap as mmap_mod

    from prefork_sessions import _pager, _speedups
    from prefork_sessions._locks import Locked
    from prefork_sessions._store import _Host

    assert _speedups.LAYOUT == {name: getattr(L, name) for name in _speedups.LAYOUT}  # one definition
    assert _speedups.LOCKED == {state.name: state.value for state in Locked}
    rnd = random.Random(5)
    path = tmp_path / "s"
    store = MmapStore(path, page_size=PAGE, cache_size=PAGE * 4, serializer="raw")
    keys = [f"k{i}".encode() for i in range(30)]
    for k in keys:
        store.set(k, rnd.randbytes(rnd.randrange(200)))
    snapshot = path.read_bytes()
    geo = (store._seed, store.num_pages, PAGE, store._nslots, store._max_used)

    def rebuilt(pager: Any, mm: mmap_mod.mmap, data: bytes, page: int) -> bytes:
        """The page as ``pager`` rebuilds it from ``data``, slot ticks (a clock) zeroed."""
        mm[:] = data
        pager.lock(page, 5.0)
        try:
            pager.rebuild(page)
        finally:
            pager.unlock(page)
        po = L.page_offset(PAGE, page)
        image = bytearray(mm[po + L.OFF_COUNTS:po + PAGE])
        for i in range(store._nslots):
            at = L.PAGE_HDR_SIZE - L.OFF_COUNTS + (i << L.SLOT_SHIFT) + L.SLOT_TICK
            image[at:at + 4] = bytes(4)
        return bytes(image)

    for case in range(300):
        data = bytearray(snapshot)
        for _ in range(rnd.choice((1, 2, 6))):
            at = L.page_offset(PAGE, rnd.randrange(4)) + rnd.randrange(PAGE)
            data[at:at + 4] = rnd.randbytes(4)
        path.write_bytes(bytes(data))
        with open(path, "r+b") as f:
            mm = mmap_mod.mmap(f.fileno(), 0)
            host = _Host(str(path), 5.0, mm, os.dup(f.fileno()), PAGE, store._nslots, store._codec)  # owns its fd
            c, py = _speedups.Pager(mm, *geo, host, 5.0), _pager.Pager(mm, *geo, host, 5.0)
            try:
                for page in range(4):
                    po = L.page_offset(PAGE, page)
                    assert c.walk(po, page) == py.walk(po, page), (case, page)
                    for k in keys:
                        h, p1, p2, s0 = py.where(k)
                        for p in (p1, p2):
                            q = L.page_offset(PAGE, p)
                            assert c.find(q, k, h, s0) == py.find(q, k, h, s0), (case, k)
                for page in range(4):  # and repair it to the same page, byte for byte
                    assert rebuilt(c, mm, data, page) == rebuilt(py, mm, data, page), (case, page)
            finally:
                c.close()
                py.close()
                mm.close()
    store.close()


@pytest.mark.parametrize("field_at", [28, 32, 40], ids=["hash seed", "file id", "creation time"])
def test_a_damaged_file_header_is_refused_and_left_untouched(tmp_path: Path, field_at: int) -> None:
    """The header is written once; a changed byte in it (a new hash seed would send
    every key to other pages, and every repair would then empty its page) makes
    opening fail with FileFormatError, and no byte of the file changes."""
    from prefork_sessions import FileFormatError

    path = tmp_path / "s"
    with MmapStore(path, page_size=PAGE, cache_size=PAGE * 4) as store:
        store.set("k", "v")
    data = bytearray(path.read_bytes())
    data[field_at] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="fails its checksum"):
        MmapStore(path, page_size=PAGE, cache_size=PAGE * 4)
    assert path.read_bytes() == bytes(data)
