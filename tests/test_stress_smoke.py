"""Smoke runs of the stress/ programs: each briefly, as a subprocess, so CI exercises them.

Only that a program exits 0 (every invariant it checks held) and printed its
table; no timing assertions (bench_http's targets are printed, not enforced).
Each run has its own --dir under tmp_path and picks free loopback ports, so the
tests run in parallel under pytest-xdist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STRESS = ROOT / "stress"

SMOKE = {
    "concurrent_writers": ["--processes", "2", "--threads", "2", "--ops", "400"],
    "fork_safety": ["--processes", "2", "--threads", "2", "--ops", "100", "--depth", "2"],
    # Every kind of operation on each implementation; --min-kills 0: a few seconds on a
    # loaded machine cannot promise a kill in each (the full run checks that).
    "crash": ["--impl", "c", "--processes", "3", "--seconds", "3", "--min-kills", "0"],
    "crash_python": ["--impl", "python", "--processes", "3", "--seconds", "3", "--min-kills", "0"],
    "file_modes": ["--processes", "2", "--threads", "2"],
    "gunicorn_load": ["--clients", "4", "--requests", "30", "--max-requests", "10",
                      "--min-workers-seen", "2", "--kill-every", "0.1", "0.2"],
    "bench_http": ["--suite", "werkzeug", "--seconds", "1", "--warmup", "0", "--rounds", "1",
                   "--sessions", "4", "--inprocess", "200"],
    # One engine of each framework against its signed-cookie baseline, sessions checked.
    "bench_http_flask": ["--suite", "flask", "--only", "flask-ours", "--seconds", "1", "--warmup", "0",
                         "--rounds", "1", "--sessions", "4", "--inprocess", "0"],
    "bench_http_django": ["--suite", "django", "--only", "django-ours", "--seconds", "1", "--warmup",
                          "0", "--rounds", "1", "--sessions", "4", "--inprocess", "0"],
    # Every backend once, counters checked (lost increments fail an atomic backend).
    "bench_cache": ["--quick"],
    "bench_http_python_loader": ["--loader", "python", "--only", "read", "--seconds", "1",
                                 "--warmup", "0", "--rounds", "1", "--sessions", "2",
                                 "--connections", "2", "--inprocess", "0"],
}
TABLE_HEAD = {
    "concurrent_writers": "| process ",
    "fork_safety": "| scenario ",
    "crash": "| operation in flight / outcome ",
    "crash_python": "| operation in flight / outcome ",
    "file_modes": "| case ",
    "gunicorn_load": "| client ",
    "bench_http": "| variant ",
    "bench_http_python_loader": "| variant ",
    "bench_http_flask": "| variant ",
    "bench_http_django": "| variant ",
    "bench_cache": "| backend ",
}
PROGRAM = {"crash_python": "crash", "bench_http_python_loader": "bench_http",
           "bench_http_flask": "bench_http", "bench_http_django": "bench_http"}


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke(name: str, tmp_path: Path) -> None:
    program = STRESS / f"{PROGRAM.get(name, name)}.py"
    p = subprocess.run(
        [sys.executable, str(program), *SMOKE[name], "--seed", "7", "--timeout", "150",
         "--dir", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=200,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = p.stdout
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{out}\n--- stderr\n{p.stderr[-4000:]}"
    assert TABLE_HEAD[name] in out, out
    assert "\n|--" in out, out
    assert "invariants held" in out, out
