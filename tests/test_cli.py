"""The ``prefork-sessions`` command line (issue 12), run as real processes on real files:
``python -m prefork_sessions`` and the console script, every subcommand, files in use by
forked writers, damaged files, hostile paths, round trips through a file and a real
redis-server; and the store methods it is built on (verify, pages, items, the open lock)."""

from __future__ import annotations

import base64
import gc
import hashlib
import math
import os
import pickle
import pty
import re
import select
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from _procs import fork, wait_ok

from prefork_sessions import LockTimeoutError, MmapStore, RedisStore, StorePathError
from prefork_sessions import _layout as L

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "COLUMNS": "80"}  # inspect fits its picture to the terminal's width
Make = Callable[..., MmapStore]


def cli(*args: str | os.PathLike[str], stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """``python -m prefork_sessions ARGS`` with ``stdin``; stdout and stderr captured as bytes."""
    return subprocess.run([sys.executable, "-m", "prefork_sessions", *map(os.fspath, args)], input=stdin,
                          capture_output=True, timeout=timeout, check=False, env=ENV)


def ok(*args: str | os.PathLike[str], stdin: bytes = b"") -> str:
    done = cli(*args, stdin=stdin)
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    return done.stdout.decode()


def refused(done: subprocess.CompletedProcess[bytes], status: int = 2) -> str:
    """The one stderr line of a command that refused, with no traceback."""
    err = done.stderr.decode()
    assert done.returncode == status, (done.returncode, done.stdout, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("prefork-sessions: "), err
    return err


def close(*stores: MmapStore) -> None:
    """Close stores and let go of their mappings now (their descriptors hold the open lock)."""
    for store in stores:
        store.close()
    gc.collect()


def make_file(path: Path, **kw: Any) -> MmapStore:
    kw.setdefault("cache_size", 256 << 10)
    kw.setdefault("page_size", 16 << 10)
    return MmapStore(path, serializer="raw", **kw)


def wait_until(condition: Callable[[], bool], what: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit:g}s"
        time.sleep(0.01)


def expire_soon(store: MmapStore, keys: list[str]) -> None:
    """Store ``keys`` with a tiny lifetime and wait until they have expired."""
    for key in keys:
        store.set(key, b"short-lived", expire=0.01)
    wait_until(lambda: all(store.ttl(k) is None for k in keys), "expiry")


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """A closed store file holding JSON, text, a pickle, binary keys and values, expiries."""
    path = tmp_path / "sessions"
    store = make_file(path)
    store.set("user:1", orjson.dumps({"visits": 3, "name": "ann"}), expire=3600)
    store.set("user:2", b"plain text", expire=0)
    store.set(b"\xff\x00bin", b"\x00\x01\xfe\xff", expire=600)
    store.set("cache:p", pickle.dumps({"a": (1, 2)}))
    for i in range(40):
        store.set(f"item:{i}", b"v" * (i * 10), expire=1000 + i)
    expire_soon(store, ["gone:1", "gone:2"])
    close(store)
    return path


# ---------------------------------------------------------------------- entry points


def test_console_script_is_declared_and_runs_like_the_module(sample: Path) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"prefork-sessions": "prefork_sessions._cli:main"}
    script = Path(sys.executable).parent / "prefork-sessions"
    assert script.exists(), f"{script} is missing: `pip install -e .` installs the console script"
    by_script = subprocess.run([script, "stats", sample, "--json"], capture_output=True, timeout=60, check=True)
    assert orjson.loads(by_script.stdout) == orjson.loads(ok("stats", sample, "--json"))
    usage = subprocess.run([script, "--help"], capture_output=True, timeout=60, check=True).stdout.decode()
    for command in ("stats", "keys", "get", "delete", "purge", "check", "repair", "inspect", "resize",
                    "export", "import"):
        assert command in usage


# ---------------------------------------------------------------------- stats


def test_stats_text_and_json_count_what_the_file_holds(sample: Path) -> None:
    found = orjson.loads(ok("stats", sample, "--json"))
    with MmapStore(sample, serializer="raw", create=False) as store:
        own = store.stats()
    assert found["entries"] == own["entries"] == 46
    assert found["expired"] == 2  # gone:1 and gone:2, not yet purged
    for field in ("bytes_used", "capacity", "evictions", "expirations", "recovered_pages", "pages", "page_size"):
        assert found[field] == own[field], field
    assert found["path"] == str(sample) and found["cache_size"] == 256 << 10
    text = ok("stats", sample)
    assert "46, 2 of them expired and not yet purged" in text
    assert f"{own['bytes_used']:,} of {own['capacity']:,}" in text and "16 pages of 16,384 bytes" in text


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Parse the Prometheus text exposition format (version 0.0.4) strictly: every line
    a HELP, a TYPE or a sample; HELP and TYPE once per family, before its samples;
    samples of the declared family only; label values unescaped.  Returns families."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    families: dict[str, dict[str, Any]] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and name not in families, line
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name == current and families[name]["type"] is None and not families[name]["samples"], line
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            families[name]["type"] = kind
        else:
            found = re.fullmatch(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)", line)
            assert found and found[1] == current and families[current]["type"], line
            labels = {k: v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                      for k, v in re.findall(_LABEL, found[2] or "")}
            families[current]["samples"].append((labels, float(found[found.lastindex or 0])))
    return families


def test_prometheus_output_parses_and_escapes_the_path_label(tmp_path: Path) -> None:
    odd = tmp_path / 'a "quoted"\\dir\nwith newline'
    odd.mkdir()
    path = odd / "store"
    store = make_file(path)
    store.set("k", b"v")
    expire_soon(store, ["e"])
    close(store)
    done = cli("stats", path, "--prometheus")
    assert done.returncode == 0, done.stderr
    families = parse_exposition(done.stdout.decode())
    expect = {"entries": 2, "expired_entries": 1, "evictions_total": 0, "expirations_total": 0,
              "recovered_pages_total": 0, "pages": 16, "page_size_bytes": 16384}
    for name, value in expect.items():
        family = families[f"prefork_sessions_{name}"]
        assert family["samples"] == [({"path": str(path)}, value)], name
        assert family["type"] == ("counter" if name.endswith("_total") else "gauge")
        assert family["help"]
    assert families["prefork_sessions_capacity_bytes"]["samples"][0][1] > 0
    assert families["prefork_sessions_used_bytes"]["samples"][0][1] > 0


# ---------------------------------------------------------------------- keys, get, delete, purge


def test_keys_lists_live_keys_with_prefix_and_hex(sample: Path) -> None:
    keys = ok("keys", sample).splitlines()
    assert sorted(keys) == sorted(["user:1", "user:2", repr(b"\xff\x00bin"), "cache:p",
                                   *(f"item:{i}" for i in range(40))])
    assert sorted(ok("keys", sample, "--prefix", "user:").splitlines()) == ["user:1", "user:2"]
    hexed = ok("keys", sample, "--hex", "--prefix", "ff").splitlines()
    assert hexed == [b"\xff\x00bin".hex()]
    assert "<4 bytes, not text" in ok("get", sample, "--hex", hexed[0])


def test_get_decodes_json_shows_text_and_never_unpickles_by_default(tmp_path: Path, sample: Path) -> None:
    assert orjson.loads(ok("get", sample, "user:1")) == {"visits": 3, "name": "ann"}
    assert ok("get", sample, "user:2") == "plain text\n"
    raw = cli("get", sample, "--hex", b"\xff\x00bin".hex(), "--raw")
    assert raw.returncode == 0 and raw.stdout == b"\x00\x01\xfe\xff"

    marker = tmp_path / "unpickled"

    class Opens:  # unpickling this calls open(marker, "w"): it shows whether get unpickled
        def __reduce__(self) -> tuple[Any, ...]:
            return open, (str(marker), "w")

    store = make_file(sample)
    store.set("evil", pickle.dumps(Opens()))
    close(store)
    shown = ok("get", sample, "evil")
    assert "a pickle of" in shown and "not unpickled" in shown and not marker.exists()
    assert "TextIOWrapper" in ok("get", sample, "evil", "--unpickle") and marker.exists()

    assert "no live entry for key missing" in refused(cli("get", sample, "missing"), 1)
    assert "no live entry" in refused(cli("get", sample, "gone:1"), 1)  # expired
    assert "not hexadecimal" in refused(cli("get", sample, "--hex", "zz"))


def test_delete_removes_a_key_and_says_when_there_was_none(sample: Path) -> None:
    assert ok("delete", sample, "user:1") == "deleted user:1\n"
    assert "user:1" not in ok("keys", sample).splitlines()
    assert "nothing deleted" in refused(cli("delete", sample, "user:1"), 1)
    ok("delete", sample, "--hex", b"\xff\x00bin".hex())
    with MmapStore(sample, serializer="raw", create=False) as store:
        assert store.get(b"\xff\x00bin") is None and store.get("user:2") == b"plain text"


def test_purge_removes_only_expired_entries(sample: Path) -> None:
    before = orjson.loads(ok("stats", sample, "--json"))
    assert ok("purge", sample) == f"removed 2 expired entries from {sample}\n"
    after = orjson.loads(ok("stats", sample, "--json"))
    assert (after["entries"], after["expired"], after["expirations"]) == (before["entries"] - 2, 0, 2)
    assert ok("purge", sample) == f"removed 0 expired entries from {sample}\n"


# ---------------------------------------------------------------------- check and repair


def _damage_value(path: Path, value: bytes) -> int:
    """Flip a byte in the middle of ``value`` in the file; the page it is in."""
    data = path.read_bytes()
    at = data.index(value)
    with open(path, "r+b") as f:
        f.seek(at + len(value) // 2)
        f.write(bytes([data[at + len(value) // 2] ^ 0xFF]))
    page_size = L.HEADER.unpack_from(data)[3]
    return (at - L.HEADER_SIZE) // page_size - 1


def test_check_reports_damage_without_repairing_and_repair_fixes_it(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = make_file(path)
    for i in range(60):
        store.set(f"key:{i}", f"value {i} ".encode() * 20)
    close(store)
    assert ok("check", path) == f"{path}: sound (16 pages checked)\n"
    page = _damage_value(path, b"value 17 " * 20)
    for _ in range(2):  # check repairs nothing: the second run finds the same
        done = cli("check", path)
        assert done.returncode == 1, done
        text = done.stdout.decode()
        assert text.startswith(f"page {page}: ") and "a repair would lose 1 of" in text and "'key:17'" in text
        assert f"prefork-sessions repair {path}" in text
    found = orjson.loads(cli("check", path, "--json").stdout)
    assert found["sound"] is False and len(found["problems"]) == 1
    repaired = ok("repair", path)
    assert repaired.startswith(f"page {page}: ") and "repaired, 1 of" in repaired and "lost (key 'key:17')" in repaired
    assert ok("check", path) == f"{path}: sound (16 pages checked)\n"
    assert ok("repair", path) == f"{path}: sound, nothing to repair\n"
    with MmapStore(path, serializer="raw", create=False) as store:
        assert store.get("key:17") is None
        assert all(store.get(f"key:{i}") == f"value {i} ".encode() * 20 for i in range(60) if i != 17)


def test_verify_reports_what_check_repairs(make_store: Make) -> None:
    store = make_store(serializer="raw", cache_size=16 << 10)  # one page
    store.set("k", b"A" * 100)
    store.set("other", b"B" * 100)
    with open(store.path, "r+b") as f:
        at = f.read().index(b"A" * 100)
        f.seek(at + 50)
        f.write(b"Z")
    found = store.verify()
    assert len(found) == 1 and "page 0:" in found[0] and "a repair would lose 1 of 2 entries (key 'k')" in found[0]
    assert store.verify() == found  # nothing was repaired
    assert store.pages()[0].problems
    repaired = store.check()
    assert len(repaired) == 1 and "repaired, 1 of 2 entries lost (key 'k')" in repaired[0]
    assert store.verify() == [] and store.get("other") == b"B" * 100


def test_pages_and_items_read_every_entry(make_store: Make) -> None:
    store = make_store(serializer="raw")
    store.set("forever", b"1", expire=0)
    store.set(b"\xfe", b"\xff" * 10, expire=500)
    expire_soon(store, ["old"])
    items = {k: (v, ttl) for k, v, ttl in store.items()}
    assert set(items) == {"forever", b"\xfe"}
    assert items["forever"] == (b"1", math.inf)
    assert items[b"\xfe"][0] == b"\xff" * 10 and 0 < items[b"\xfe"][1] <= 500
    pages = store.pages()
    assert len(pages) == store.num_pages
    assert sum(p.entries for p in pages) == 3 and sum(p.expired for p in pages) == 1
    assert sum(p.bytes_used for p in pages) == store.stats()["bytes_used"]
    assert all(p.lru_idle is None for p in pages if not p.entries)
    assert all(p.lru_idle is not None and p.lru_idle >= p.mru_idle >= 0 for p in pages if p.entries)


# ---------------------------------------------------------------------- inspect


def test_inspect_draws_every_page_and_marks_damage(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = make_file(path)
    for i in range(80):
        store.set(f"key:{i}", f"value {i} ".encode() * 30)
    close(store)
    page = _damage_value(path, b"value 5 " * 30)
    text = ok("inspect", path)
    fill_row = text.split("fill, each character one page:\n")[1].splitlines()[0]
    cells = fill_row.split()[1]
    assert len(cells) == 16 and cells[page] == "!" and all(c in "▁▂▃▄▅▆▇█" for i, c in enumerate(cells) if i != page)
    assert f"damaged: 1 page ({page})" in text
    plain = ok("inspect", path, "--ascii")
    assert plain.isascii() and "fill, each character one page:\n" in plain
    found = orjson.loads(ok("inspect", path, "--json"))
    assert len(found["pages"]) == 16 and sum(p["entries"] for p in found["pages"]) == 79  # not the damaged one
    assert found["pages"][page]["problems"] and not any(p["problems"] for p in found["pages"] if p["page"] != page)


def test_inspect_aggregates_thousands_of_pages(tmp_path: Path) -> None:
    path = tmp_path / "big"
    store = make_file(path, cache_size=5000 * 4096, page_size=4096)
    for i in range(500):
        store.set(f"key:{i}", b"x" * 100)
    close(store)
    text = ok("inspect", path)
    assert "5,000 pages" in text and "each character 5 consecutive pages" in text
    fill = text.split("fill, each character")[1].split("\n\n")[0].splitlines()[1:-1]
    assert len(fill) <= 16 and sum(len(row.split()[1]) for row in fill) == 1000


# ---------------------------------------------------------------------- resize


def _contents(path: Path) -> dict[str | bytes, tuple[bytes, float]]:
    with MmapStore(path, serializer="raw", create=False) as store:
        return {k: (v, ttl) for k, v, ttl in store.items()}


def test_resize_keeps_every_key_value_and_expiry(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = make_file(path)
    for i in range(100):
        store.set(f"s:{i}", os.urandom(i * 7), expire=0 if i % 3 == 0 else 100 + i * 10)
    store.set(b"\x80bytes-key", b"\xff", expire=50)
    expire_soon(store, ["expired"])
    close(store)
    os.chmod(path, 0o600)
    before, started = _contents(path), time.monotonic()
    inode = path.stat().st_ino
    for size, pages in (("1M", 64), ("160K", 10)):
        done = ok("resize", path, "--cache-size", size)
        assert done.startswith(f"resized {path}: ") and f"{pages} pages of 16,384 bytes" in done
        after = _contents(path)
        elapsed = time.monotonic() - started
        assert set(after) == set(before) and b"\x80bytes-key" in after and "expired" not in after
        for key, (value, ttl) in before.items():
            assert after[key][0] == value, key
            if ttl == math.inf:
                assert after[key][1] == math.inf
            else:
                assert ttl - elapsed - 0.01 <= after[key][1] <= ttl, (key, ttl, after[key][1])
        st = path.stat()
        assert st.st_ino != inode and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == L.file_size(16384, pages)
        inode = st.st_ino
    assert os.listdir(tmp_path) == ["store"]  # no temporary left behind
    with MmapStore(path, create=False) as store:
        assert store.num_pages == 10 and store.check() == []


def test_resize_refuses_while_another_process_has_the_file_open(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = make_file(path)
    store.set("k", b"v")
    inode = path.stat().st_ino
    err = refused(cli("resize", path, "--cache-size", "1M", "--wait", "0.2"))
    assert f"is open in pid {os.getpid()}" in err and "Stop every process that uses it" in err
    assert path.stat().st_ino == inode and os.listdir(tmp_path) == ["store"]
    store.set("k2", b"written after the refusal")
    close(store)
    ok("resize", path, "--cache-size", "1M")
    assert _contents(path).keys() == {"k", "k2"}


def test_resize_refuses_a_size_that_cannot_hold_the_entries(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = make_file(path)
    for i in range(100):
        store.set(f"k{i}", b"x" * 1000)
    close(store)
    data = path.read_bytes()
    err = refused(cli("resize", path, "--cache-size", "32K"), 1)
    assert "do not fit in 2 pages" in err and "the file was left as it was" in err
    assert path.read_bytes() == data and os.listdir(tmp_path) == ["store"]


def test_an_opener_waits_for_a_resize_and_opens_the_new_file(tmp_path: Path) -> None:
    """The open lock: while a maintenance process holds the file alone, a new opener
    waits, then opens what the path names by then (the replacement)."""
    path = tmp_path / "store"
    close(make_file(path))
    alone = MmapStore(path, create=False, exclusive=True)
    code = f"from prefork_sessions import MmapStore; print(MmapStore({str(path)!r}, create=False).num_pages)"
    opener = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        ino = path.stat().st_ino

        def opened() -> bool:  # it has the file open: now it can only be waiting for the lock
            try:
                return any(os.stat(f"/proc/{opener.pid}/fd/{fd}").st_ino == ino
                           for fd in os.listdir(f"/proc/{opener.pid}/fd"))
            except OSError:
                return False

        wait_until(opened, "the opener opening the file")
        assert opener.poll() is None
        close(make_file(tmp_path / "new", cache_size=1 << 20))
        os.rename(tmp_path / "new", path)
        close(alone)
        out, _ = opener.communicate(timeout=30)
    finally:
        opener.kill()
    assert opener.returncode == 0 and out == b"64\n"


def test_exclusive_open_fails_while_the_file_is_open(tmp_path: Path) -> None:
    store = make_file(tmp_path / "store")
    with pytest.raises(LockTimeoutError, match="Stop every process that uses it"):
        MmapStore(tmp_path / "store", exclusive=True, lock_timeout=0.05)
    close(store)
    close(MmapStore(tmp_path / "store", exclusive=True, lock_timeout=0.05))


# ---------------------------------------------------------------------- export and import


def _records(text: bytes) -> dict[str | bytes, tuple[bytes, float]]:
    out: dict[str | bytes, tuple[bytes, float]] = {}
    for line in text.splitlines():
        rec = orjson.loads(line)
        key = rec["key"] if "key" in rec else base64.b64decode(rec["key_b64"])
        value = rec["value"].encode() if "value" in rec else base64.b64decode(rec["value_b64"])
        out[key] = (value, math.inf if rec["ttl"] is None else rec["ttl"])
    return out


def _odd_store(path: Path) -> MmapStore:
    store = make_file(path)
    store.set("text", "ünïcode ✓".encode())
    store.set("binary", bytes(range(256)), expire=300)
    store.set(b"\xff\xfe-bytes-key", b"\x00\x80", expire=0)
    store.set(b"bytes-but-utf8", b"v", expire=700)
    store.set("json", orjson.dumps({"a": [1, 2]}), expire=12.5)
    expire_soon(store, ["expired"])
    return store


def test_export_then_import_into_a_new_file_reproduces_keys_bytes_and_lifetimes(tmp_path: Path) -> None:
    close(_odd_store(tmp_path / "src"))
    done = cli("export", tmp_path / "src")
    assert done.returncode == 0 and done.stderr == f"exported 5 entries from {tmp_path / 'src'}\n".encode()
    exported = _records(done.stdout)
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    b64 = base64.b64encode(b"\xff\xfe-bytes-key").decode()
    assert {"key_b64", "value_b64", "ttl"} == set(next(r for r in lines if r.get("key_b64") == b64))
    assert set(next(r for r in lines if r.get("key") == "binary")) == {"key", "value_b64", "ttl"}
    started = time.monotonic()
    imported = ok("import", tmp_path / "dst", "--cache-size", "512K", "--page-size", "16K", stdin=done.stdout)
    assert imported == f"imported 5 entries into {tmp_path / 'dst'}\n"
    after = _contents(tmp_path / "dst")
    assert set(after) == set(exported) == {"text", "binary", b"\xff\xfe-bytes-key", b"bytes-but-utf8", "json"}
    for key, (value, ttl) in exported.items():
        assert after[key][0] == value
        if ttl == math.inf:
            assert after[key][1] == math.inf
        else:
            assert ttl - (time.monotonic() - started) - 0.01 <= after[key][1] <= ttl, key
    with MmapStore(tmp_path / "dst", create=False) as store:
        assert store.num_pages == 32 and store.page_size == 16384
    again = _records(ok("export", tmp_path / "dst").encode())
    assert {k: v for k, (v, _) in again.items()} == {k: v for k, (v, _) in exported.items()}


def test_import_into_redis(tmp_path: Path, redis_url: str) -> None:
    close(_odd_store(tmp_path / "src"))
    dump = cli("export", tmp_path / "src").stdout
    exported = _records(dump)
    prefix = f"cli-test-{os.getpid()}:"
    assert ok("import", "--redis-url", redis_url, "--prefix", prefix, stdin=dump).startswith("imported 5 entries")
    with RedisStore(redis_url, serializer="raw", prefix=prefix) as redis_store:
        for key, (value, ttl) in exported.items():
            assert redis_store.get(key) == value
            left = redis_store.ttl(key)
            if ttl == math.inf:
                assert left == math.inf
            else:
                assert left is not None and 0 < left <= math.ceil(ttl * 1000) / 1000, key
        assert len(redis_store) == 5
        redis_store.clear()
    with RedisStore(redis_url, serializer="raw") as default:  # no --prefix: RedisStore's own
        assert default.get("text") is None
        ok("import", "--redis-url", redis_url, stdin=dump)
        assert default.get("text") == "ünïcode ✓".encode()
        assert ok("import", "--redis-url", redis_url, "--no-overwrite", stdin=dump).startswith(
            "imported 0 entries into redis://127.0.0.1")
        default.clear()


def test_import_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    good = b'{"key": "a", "value": "1", "ttl": null}\n'
    target = tmp_path / "new"
    cases = {
        b"{not json\n": "line 2 of the input: not JSON",
        b'["a"]\n': "not a JSON object",
        b'{"key": "a", "value": "1", "ttl": 5, "extra": 1}\n': "unknown field 'extra'",
        b'{"key": "a", "key_b64": "YQ==", "value": "1", "ttl": 5}\n': 'give one of "key"',
        b'{"key": "a", "value_b64": "***", "ttl": 5}\n': '"value_b64" is not base64',
        b'{"key": "a", "value": "1", "ttl": "soon"}\n': '"ttl" must be a number',
        b'{"key": 5, "value": "1", "ttl": 1}\n': '"key" must be a string',
    }
    for bad, message in cases.items():
        err = refused(cli("import", target, stdin=good + bad))
        assert message in err and "nothing was imported" in err
        assert not target.exists()
    assert "--redis-url URL" in refused(cli("import", stdin=good))


def test_import_into_an_existing_file_keeps_its_keys_with_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = make_file(path)
    store.set("a", b"old")
    close(store)
    lines = b'{"key": "a", "value": "new", "ttl": null}\n{"key": "b", "value": "2", "ttl": 0}\n'
    assert ok("import", path, "--no-overwrite", stdin=lines) == (
        f"imported 0 entries into {path}; 1 skipped (expired); 1 skipped (the key exists; --no-overwrite)\n")
    assert _contents(path)["a"][0] == b"old"
    ok("import", path, stdin=lines)
    assert _contents(path) == {"a": (b"new", math.inf)}
    assert "apply only to a file import creates" in refused(cli("import", path, "--cache-size", "1M", stdin=lines))


def test_progress_is_shown_only_on_a_terminal(sample: Path) -> None:
    assert b"\r" not in cli("export", sample).stderr
    main, tty = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "prefork_sessions", "export", os.fspath(sample)],
                                stdout=subprocess.DEVNULL, stderr=tty)
        os.close(tty)
        shown = b""
        while True:
            ready, _, _ = select.select([main], [], [], 30)
            assert ready, "no output on the terminal"
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(30) == 0
    finally:
        os.close(main)
    assert b"\rexporting " in shown and b"exported 44 entries" in shown


# ---------------------------------------------------------------------- files in use


WRITER_LIMIT = 60.0  # seconds: a writer stops by itself then, if nobody told it to earlier


def _final(me: int, i: int) -> bytes | None:
    """What writer ``me`` leaves under its key ``i``: every fourth key deleted."""
    return None if i % 4 == 1 else f"final {me} {i}".encode()


def _writer(path: Path, me: int, stop: Path) -> None:
    """Overwrite and delete its own keys, with short-lived ones between (for purge),
    until ``stop`` exists; then leave its keys as ``_final`` says, and say so in a
    file ``done{me}`` beside ``stop``."""
    store = MmapStore(path, serializer="raw", create=False)
    deadline = time.monotonic() + WRITER_LIMIT
    n = 0
    while not stop.exists() and time.monotonic() < deadline:
        for _ in range(100):
            i = n % 200
            store.set(f"w{me}:{i}", f"{n}".encode() * 5, expire=600)
            store.set(f"t{me}:{n}", b"brief", expire=0.001)
            if i % 4 == 1:
                store.delete(f"w{me}:{i}")
            n += 1
        time.sleep(0.002)  # leave the commands some of the machine's two cores
    for i in range(200):
        final = _final(me, i)
        if final is None:
            store.delete(f"w{me}:{i}")
        else:
            store.set(f"w{me}:{i}", final, expire=600)
    store.close()
    (stop.parent / f"done{me}").touch()


def test_stats_keys_check_and_purge_on_a_file_that_processes_are_writing(tmp_path: Path) -> None:
    path, stop = tmp_path / "store", tmp_path / "stop"
    close(make_file(path, cache_size=2 << 20))
    writers = [fork(lambda me=me: _writer(path, me, stop)) for me in range(3)]  # type: ignore[misc]
    try:
        with MmapStore(path, serializer="raw", create=False) as store:
            wait_until(lambda: all(f"w{me}:2" in store for me in range(3)), "the writers starting")
        purged = 0
        for _ in range(2):
            found = orjson.loads(ok("stats", path, "--json"))
            assert found["recovered_pages"] == 0 and found["entries"] >= found["expired"] >= 0
            for key in ok("keys", path, "--prefix", "w").splitlines():
                assert re.fullmatch(r"w[0-2]:\d+", key), key
            assert ok("check", path) == f"{path}: sound (128 pages checked)\n"
            removed = re.fullmatch(rf"removed (\d+) expired (entry|entries) from {re.escape(str(path))}\n",
                                   ok("purge", path))
            assert removed
            purged += int(removed[1])
        assert not list(tmp_path.glob("done*")), "a writer stopped before the commands ran"
        assert purged > 0
    finally:
        stop.touch()
        wait_ok(writers)
    with MmapStore(path, serializer="raw", create=False) as store:
        for me in range(3):
            assert [store.get(f"w{me}:{i}") for i in range(200)] == [_final(me, i) for i in range(200)]
        assert store.stats()["evictions"] == 0 and store.verify() == []


# ---------------------------------------------------------------------- what never happens


READ_ONLY = (("stats",), ("keys",), ("get", "{}", "k"), ("delete", "{}", "k"), ("purge",), ("check",), ("repair",),
             ("inspect",), ("export",), ("resize", "{}", "--cache-size", "1M"))


def _argv(command: tuple[str, ...], path: Path | str) -> list[str]:
    if len(command) == 1:
        return [command[0], os.fspath(path)]
    return [a.replace("{}", os.fspath(path)) for a in command]


@pytest.mark.parametrize("command", READ_ONLY, ids=lambda c: c[0])
def test_subcommands_never_create_a_file(tmp_path: Path, command: tuple[str, ...]) -> None:
    path = tmp_path / "no-dir" / "store" if command[0] == "stats" else tmp_path / "missing"
    assert f"there is no store file at {path}; nothing was created" in refused(cli(*_argv(command, path)))
    assert os.listdir(tmp_path) == []


def _hostile(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / kind
    if kind == "symlink":
        close(make_file(tmp_path / "real"))
        path.symlink_to(tmp_path / "real")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "foreign":
        path.write_bytes(os.urandom(70000))
        path.chmod(0o640)
    elif kind == "empty":
        path.touch(0o640)
    elif kind in ("truncated", "damaged-header", "writable-by-others", "other-user"):
        close(make_file(path))
        if kind == "truncated":
            os.truncate(path, path.stat().st_size - 4096)
        elif kind == "damaged-header":
            with open(path, "r+b") as f:
                f.seek(20)
                f.write(b"\x01")
        elif kind == "writable-by-others":
            path.chmod(0o666)
        elif os.geteuid() == 0:
            os.chown(path, 65534, 65534)
        else:
            return Path("/etc/hostname")  # root's, and readable: as foreign to this user as it gets
    elif kind == "undecodable-name":
        path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff\xfe"))
        path.write_bytes(b"x" * 100)
        path.chmod(0o640)
    return path


HOSTILE = {
    "symlink": "is a symbolic link", "directory": "is a directory", "fifo": "is a FIFO",
    "foreign": "is not a prefork_sessions store file", "empty": "is not a prefork_sessions store file",
    "truncated": "damaged or truncated", "damaged-header": "fails its checksum",
    "writable-by-others": "writable by group or others", "other-user": "belongs to",
    "undecodable-name": "is not a prefork_sessions store file",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_paths_give_one_line_and_touch_nothing(tmp_path: Path, kind: str) -> None:
    path = _hostile(tmp_path, kind)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
    listing = sorted(os.listdir(tmp_path))
    for command in (("stats",), ("check",)):  # they all open alike: READ_ONLY checks each on a missing file
        err = refused(cli(*_argv(command, path)))
        assert HOSTILE[kind] in err, err
    assert HOSTILE[kind] in refused(cli("import", path, stdin=b'{"key": "a", "value": "b", "ttl": null}'))
    assert sorted(os.listdir(tmp_path)) == listing
    if digest is not None:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = make_file(path, cache_size=2 << 20)
    for i in range(3000):  # 600 KB of keys: more than a pipe holds
        store.set(f"{i}:" + "k" * 200, b"")
    close(store)
    proc = subprocess.Popen([sys.executable, "-m", "prefork_sessions", "keys", os.fspath(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(30) == 1 and b"Traceback" not in err and err == b""


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("resize", tmp_path / "x", "--cache-size", "lots").returncode == 2
    assert cli("nonsense").returncode == 2
    with pytest.raises(StorePathError):
        MmapStore(tmp_path / "x", create=False)
    assert os.listdir(tmp_path) == []
