"""Smoke runs of stress/bench_store.py --quick: every store produces every figure, the
counters end exact, the report names the pager, a wrong count is reported loudly.

No timing assertions.  Every default peer must be installed (.ci/run installs them): a
missing one fails, naming the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

import prefork_sessions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "stress", "bench_store.py")

RAW = ["MmapStore (raw)", "lmdb (raw)", "Cache::FastMmap (raw_values)"]
SESSION = ["MmapStore (json)", "lmdb (orjson)", "Cache::FastMmap (JSON::XS)", "Cache::FastMmap (Storable)"]
RAW_ROWS = ["insert into a fresh file", "overwrite, sustained: median pass", "overwrite, sustained: last pass",
            "get, shuffled", "get_and_set, counters", "contended, one counter"]
SESSION_ROWS = RAW_ROWS[:4]
TARGETS = ["insert into a fresh file: MmapStore / lmdb (raw)", "overwrite, sustained: median pass: MmapStore / lmdb",
           "get, shuffled: MmapStore / lmdb (raw)", "get_and_set, counters: MmapStore / lmdb (raw)",
           "contended, one counter: MmapStore / lmdb (raw)", "get, shuffled: MmapStore / Cache::FastMmap",
           "insert into a fresh file: MmapStore / Cache::FastMmap", "contended, one counter: MmapStore / Cache::FastMmap",
           "retention at 85% fill: MmapStore"]
NUMBER, RATIO = re.compile(r"^[\d,]+$"), re.compile(r"^\d+\.\d\dx$")


def perl_has(module: str) -> bool:
    return bool(shutil.which("perl")) and subprocess.run(
        ["perl", f"-M{module}", "-e", "1"], check=False, capture_output=True).returncode == 0


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, BENCH, "--quick", *args], check=False, capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)


def tables(out: str) -> list[list[list[str]]]:
    """Every markdown table in the output, as rows of stripped cells (separator rows dropped)."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in out.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def table_with(out: str, label: str) -> list[list[str]]:
    for t in tables(out):
        if label in t[0]:
            return t
    raise AssertionError(f"no table with a {label!r} column\n{out}")


def assert_figures(out: str, labels: list[str], rows: list[str]) -> None:
    t = table_with(out, labels[0])
    head = t[0]
    assert head[1:1 + len(labels)] == labels, head
    for title in rows:
        row = next((r for r in t[1:] if r[0].startswith(title)), None)
        assert row is not None, f"no {title!r} row\n{out}"
        for label, cell in zip(head[1:], row[1:]):
            pattern = RATIO if label.startswith("Mmap/") else NUMBER
            assert pattern.match(cell), f"{title} / {label}: {cell!r}\n{out}"
    peers = len(labels) - 1 if labels[0].startswith("MmapStore") else 0
    assert len(head) == 1 + len(labels) + peers, f"one ratio column per peer: {head}"


def test_quick_run_reports_every_figure_and_exact_counters() -> None:
    assert perl_has("Cache::FastMmap") and perl_has("JSON::XS"), (
        "benchmark peers missing: install them as .ci/run does "
        "(apt-get install libcache-fastmmap-perl libjson-xs-perl; pip install '.[test]')")
    p = run_bench()
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert re.match(r"Machine: .+, \d+ cores .*Linux .*Python 3\.\d+.*; files in \S+ \(\w+\)", out), out
    pager = "C (prefork_sessions.ACCELERATED is True)" if prefork_sessions.ACCELERATED else "pure Python"
    assert f"MmapStore pager: {pager}" in out, out
    assert_figures(out, RAW, RAW_ROWS)
    assert_figures(out, SESSION, SESSION_ROWS)
    assert ("Counters exact in every round: 10 x 100 and contended 800 of 800 for "
            "MmapStore (raw), lmdb (raw), Cache::FastMmap (raw_values)") in out, out
    assert "FAIL: COUNTER" not in out and "[error]" not in out, out
    ret = table_with(out, "% kept")
    assert any(r[:2] == ["MmapStore (raw)", "85%"] and r[4].endswith("%") for r in ret), out
    assert any(r[:2] == ["Cache::FastMmap (raw_values)", "85%"] for r in ret), out
    for what in TARGETS:
        assert re.search(rf"\[(PASS|FAIL)\] {re.escape(what)}.*: \d+\.\d\d[x%] \(target >= ", out), what


@pytest.fixture(scope="module")
def json_report() -> dict[str, Any]:
    p = run_bench("--only", "mmapstore,lmdb", "--json", "--keys", "200")
    assert p.returncode == 0, p.stderr
    report: dict[str, Any] = json.loads(p.stdout)
    return report


def test_json_report_counts_every_increment(json_report: dict[str, Any]) -> None:
    r = json_report
    assert r["errors"] == [] and r["count_failures"] == []
    assert r["accelerated"] is prefork_sessions.ACCELERATED
    cfg = r["config"]
    for label in ("MmapStore (raw)", "lmdb (raw)"):
        for rnd in r["rounds"][label]:
            assert rnd["contended"]["count"] == rnd["contended"]["expected"] == cfg["procs"] * cfg["contended"]
            assert rnd["get_and_set"]["count"] == cfg["counters"] * cfg["increments"]
            assert rnd["get_and_set"]["exact"] is True
            assert len(rnd["overwrite"]["passes"]) == cfg["passes"] == 10
        assert set(r["summary"][label]) == {"insert", "overwrite", "overwrite_last", "get", "get_and_set",
                                            "contended"}
        assert all(x > 0 for x in r["summary"][label].values())
    assert set(r["ratios"]["lmdb (raw)"]) == set(r["summary"]["lmdb (raw)"])
    assert set(r["ratios"]["lmdb (orjson)"]) == {"insert", "overwrite", "overwrite_last", "get"}


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_store_under_test", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_a_wrong_count_is_reported_loudly(json_report: dict[str, Any]) -> None:
    bench = load_bench()
    r = json.loads(json.dumps(json_report))
    r["rounds"]["lmdb (raw)"][0]["contended"]["count"] -= 1
    failures = bench.count_failures(r["rounds"])
    want = r["config"]["procs"] * r["config"]["contended"]
    assert failures == [f"lmdb (raw) contended, one counter, round 1: count {want - 1:,}, expected {want:,}"]
    r["count_failures"] = failures
    assert f"!!! FAIL: COUNTER NOT EXACT: {failures[0]}" in bench.render(r)


def test_pure_python_pager_is_named() -> None:
    env = dict(os.environ, PREFORK_SESSIONS_PURE="1")
    p = run_bench("--only", "mmapstore", "--keys", "100", env=env)
    assert p.returncode == 0, p.stderr
    assert ("MmapStore pager: pure Python (PREFORK_SESSIONS_PURE=1; prefork_sessions.ACCELERATED is False)"
            in p.stdout), p.stdout
    assert_figures(p.stdout, ["MmapStore (raw)"], RAW_ROWS)


def test_opt_in_peers_diskcache_and_redis() -> None:
    assert shutil.which("redis-server"), "redis-server missing: apt-get install redis-server"
    p = run_bench("--only", "diskcache,redis", "--keys", "100")
    assert p.returncode == 0, p.stdout + p.stderr
    assert_figures(p.stdout, ["diskcache (raw)", "redis (raw)"], RAW_ROWS)
    assert "contended 800 of 800 for diskcache (raw), redis (raw)" in p.stdout, p.stdout


def test_a_failed_retention_run_keeps_the_ops_figures(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    real = bench.run_worker

    def failing_retention(cmd: list[str], deadline: float, env: dict[str, str] | None = None) -> Any:
        if "retention" in cmd:
            raise RuntimeError("injected")
        return real(cmd, deadline, env)

    monkeypatch.setattr(bench, "run_worker", failing_retention)
    monkeypatch.setattr(bench.signal, "signal", lambda *a: None)  # main() would take pytest's SIGTERM
    code = bench.main(["--quick", "--only", "mmapstore", "--json", "--keys", "100"])
    r = json.loads(capsys.readouterr().out)
    assert code == 1
    assert r["errors"] == ["MmapStore (raw) (retention): RuntimeError: injected"]
    assert set(r["summary"]) == {"MmapStore (raw)", "MmapStore (json)"} and r["retention"] == {}


# --------------------------------------------------------------------------- stress/bench_redis.py

BENCH_REDIS = os.path.join(ROOT, "stress", "bench_redis.py")
REDIS_PROCS = 3


@pytest.fixture(scope="module")
def redis_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny bounded run of every row and the HTTP suite, as JSON."""
    assert shutil.which("redis-server"), "redis-server missing: apt-get install redis-server"
    p = subprocess.run(
        [sys.executable, BENCH_REDIS, "--processes", str(REDIS_PROCS), "--seconds", "0.3", "--rounds", "2",
         "--http-seconds", "0.5", "--http-warmup", "0", "--http-sessions", "4", "--json", "--timeout", "120",
         "--dir", str(tmp_path_factory.mktemp("bench_redis"))],
        check=False, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report: dict[str, Any] = json.loads(p.stdout)
    return report


def load_redis_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(os.path.join(ROOT, "stress"))  # its _common and bench_store
    spec = importlib.util.spec_from_file_location("bench_redis_under_test", BENCH_REDIS)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_redis_bench_measures_every_row(redis_report: dict[str, Any]) -> None:
    r = redis_report
    assert r["failures"] == [], r["failures"]
    assert r["skipped"] == {}, f"benchmark peers missing, install them as .ci/run does: {r['skipped']}"
    rows = ["counter-get_and_set", "counter-watch", "counter-get+set", "session-get_and_set", "session-watch",
            "session-get+set", "session-ours", "session-flask-session", "session-django-redis-sessions"]
    assert list(r["summary"]) == rows
    for key in rows:
        assert len(r["rounds"][key]) == 2
        for rnd in r["rounds"][key]:
            assert len(rnd["per_process"]) == REDIS_PROCS and all(n > 0 for n in rnd["per_process"]), (key, rnd)
            assert rnd["rate"] > 0 and rnd["server_calls"] > 0 and rnd["problems"] == []
        s = r["summary"][key]
        assert s["updates"] == sum(x["updates"] for x in r["rounds"][key])
        assert s["sent_per_update"] >= 1 and s["server_calls_per_update"] >= 1
    for key in ("counter-get_and_set", "counter-watch", "session-get_and_set", "session-watch", "session-ours"):
        assert r["summary"][key]["lost"] == 0, key
    for key in ("counter-get+set", "session-get+set", "session-flask-session"):
        assert r["summary"][key]["sent_per_update"] == 2.0, key  # one GET, one SET: nothing else
        assert r["summary"][key]["retries"] is None
    for key in ("counter-watch", "session-watch"):
        s = r["summary"][key]  # WATCH GET MULTI SET EXEC per attempt
        assert s["calls_per_update"]["watch"] >= 1 and s["sent_per_update"] >= 5 and s["retries"] >= 0
    assert r["rounds"]["counter-get+set"][0]["stored"][0] <= r["rounds"]["counter-get+set"][0]["updates"]


def test_redis_bench_marks_every_target(redis_report: dict[str, Any]) -> None:
    targets = [t["target"] for t in redis_report["targets"]]
    assert targets == [
        "counter-get_and_set: 0 lost updates", "session-get_and_set: 0 lost updates",
        "session-ours: 0 lost updates", "counter-get_and_set: <= 3 commands sent per update",
        "session-get_and_set: <= 3 commands sent per update",
        "counter-get_and_set >= 1.5x counter-watch (updates/s)",
        "session-get_and_set >= 1.5x session-watch (updates/s)", "session-ours >= 3.0x session-watch (updates/s)",
        "HTTP redis-demo >= 1.5x redis-flask-session (requests/s)"]
    assert all(isinstance(t["ok"], bool) and t["value"] >= 0 for t in redis_report["targets"])
    http = redis_report["http"]["variants"]
    assert set(http) == {"redis-flask-session", "redis-demo"} and all(v["rate"] > 0 for v in http.values())
    m = redis_report["machine"]
    assert m["cores"] >= 1 and m["python"] and re.match(r"\d+\.\d+", m["versions"]["redis-server"]), m


def test_redis_bench_table_and_broken_invariants_reported_loudly(redis_report: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_redis_bench(monkeypatch)
    out = bench.render(redis_report).render()
    t = table_with(out, "updates/s")
    assert t[0] == ["row", "updates/s", "x WATCH loop", "commands sent / update", "server calls / update",
                    "retries / update", "lost updates", "updates"]
    assert [r[0] for r in t[1:]] == [bench.ROWS[k].label + (" (baseline)" if k.endswith("-watch") else "")
                                     for k in redis_report["summary"]]
    for row in t[1:]:
        assert NUMBER.match(row[1]) and NUMBER.match(row[7]), row
        assert row[2].endswith("x") and float(row[3]) >= 1, row
    assert re.search(r"\| session-ours >= 3\.0x session-watch \(updates/s\) \| \d+\.\d\dx \| (PASS|FAIL) \|", out)
    assert "Machine: " in out and "redis-server " in out, out

    r = json.loads(json.dumps(redis_report))
    r["rounds"]["session-ours"][1]["lost"] = 5
    r["rounds"]["counter-get+set"][0]["sent"] += 1
    bad, _ = bench.failures(r["rounds"], {k: bench.summarise(rs) for k, rs in r["rounds"].items()})
    assert [name for name, _ in bad] == ["counter-get+set: client and server count the same commands",
                                         "session-ours: no update lost"]
    assert bad[1] == ("session-ours: no update lost", "5 lost")
    r["failures"] = bad
    assert "FAIL session-ours: no update lost: 5 lost" in bench.render(r).render()
