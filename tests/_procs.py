"""Forked test processes: run a function in a child, and reap children by exit code."""

from __future__ import annotations

import os
from collections.abc import Callable


def fork(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child that exits 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def wait_ok(pids: list[int]) -> None:
    """Reap the children and assert each exited 0."""
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, f"child {pid} failed"
