"""Smoke run of stress/bench_store.py --quick: it finishes and prints the table.

No timing assertions: only that every store produced numbers.  Every peer must
be installed (.ci/run installs them): a missing one fails, naming the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "stress", "bench_store.py")

LABELS = {
    "mmapstore": ["MmapStore (raw)", "MmapStore (json)"],
    "fastmmap": ["Cache::FastMmap (raw_values)", "Cache::FastMmap (Storable)"],
    "diskcache": ["diskcache"],
    "lmdb": ["lmdb"],
    "redis": ["redis"],
}
NUMBER_ROW = r"\|\s+{label}(?: \[[^]]*\])?\s+\|\s+[\d,]+\s+\|\s+\d+\.\d\d\s+\|"


def _has_fastmmap() -> bool:
    if not shutil.which("perl"):
        return False
    return subprocess.run(["perl", "-MCache::FastMmap", "-e", "1"], check=False, capture_output=True).returncode == 0


def available() -> tuple[list[str], list[str]]:
    have = {
        "mmapstore": True,
        "fastmmap": _has_fastmmap(),
        "diskcache": importlib.util.find_spec("diskcache") is not None,
        "lmdb": importlib.util.find_spec("lmdb") is not None,
        "redis": shutil.which("redis-server") is not None and importlib.util.find_spec("redis") is not None,
    }
    return [s for s, ok in have.items() if ok], [s for s, ok in have.items() if not ok]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, BENCH, "--quick", *args], check=False, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def test_quick_run_prints_table_for_every_store() -> None:
    stores, missing = available()
    assert not missing, (
        f"benchmark peers missing: {', '.join(missing)}; install them as .ci/run does "
        "(apt-get install libcache-fastmmap-perl redis-server; pip install '.[test]')"
    )
    p = run_bench("--only", ",".join(stores))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("Machine: "), out
    assert "[skipped]" not in out, out
    for store in stores:
        for label in LABELS[store]:
            for op_row in ("set (insert)", "get (hits)", "80/20 get/set, 2 procs", "get_and_set incr"):
                assert op_row in out
            rows = re.findall(NUMBER_ROW.format(label=re.escape(label)), out)
            assert len(rows) == 6, f"{label}: expected 6 rows of numbers\n{out}"
    assert re.search(r"\| MmapStore \(raw\)\s+\|\s+85% \|\s+[\d,]+ \|\s+[\d,]+ \|\s+\d+\.\d\d%", out), out
    assert re.search(r"\[(PASS|FAIL)\] get \(hits\) vs Cache::FastMmap \(raw_values\): \d+\.\d\dx", out), out


def test_quick_json_output_is_machine_readable() -> None:
    p = run_bench("--only", "mmapstore,lmdb", "--json", "--keys", "200")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["errors"] == []
    for label in ("MmapStore (raw)", "MmapStore (json)", "lmdb"):
        for op in ("set", "update", "get", "mix1", "mix2", "incr"):
            assert report["summary"][label][op]["ops_per_s"] > 0
    assert report["ratios"]["lmdb"]["get"] > 0
    assert report["retention"]["MmapStore (raw)"]["0.85"]["inserted"] > 0
