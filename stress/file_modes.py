#!/usr/bin/env python3
"""File modes and users: how the store file is created, and what it refuses to open.

  * under umask 000, 022 and 077, --processes x --threads openers race to create
    the same file: it ends 0640, owned by us, one file (no temporary left), and
    every opener sees the others' writes;
  * a forked child that drops to ``nobody`` is refused (PermissionError);
  * a symlink to a good store, a file owned by ``nobody``, and group- or
    world-writable files at the path are refused (UnsafeFileError, a
    PermissionError) and left byte-for-byte untouched: content, mode, owner, mtime.

Needs root (to chown and to drop to nobody).

    python stress/file_modes.py --processes 8 --threads 2 --rounds 5 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import random
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import _common as C

from prefork_sessions import MmapStore, UnsafeFileError

SMALL = {"cache_size": 256 << 10, "page_size": 8 << 10}
UMASKS = (0o000, 0o022, 0o077)


class Rows:
    """Table rows merged over rounds: one per case, with how many rounds came out ok."""

    def __init__(self, report: C.Report) -> None:
        self.report = report
        self.rows: dict[str, list[Any]] = {}

    def row(self, case: str, expected: str, got: str, untouched: str, result: str) -> None:
        if case not in self.rows or result != "ok":
            self.rows[case] = [expected, got, untouched, result, self.rows.get(case, [0] * 5)[4]]
        self.rows[case][4] += result == "ok"

    def flush(self) -> None:
        for case, (expected, got, untouched, result, ok) in self.rows.items():
            self.report.row(case, expected, got, untouched, result, ok)


def snapshot(path: Path) -> tuple[Any, ...]:
    """Everything 'untouched' means: type, content (or link target), mode, owner, mtime."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        content = os.readlink(path).encode()
    else:
        content = path.read_bytes()
    return (stat.S_IFMT(st.st_mode), hashlib.sha256(content).hexdigest(), len(content),
            stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)


def racing_openers(path: Path, proc: int, ns: argparse.Namespace) -> None:
    """A child: --threads threads each open (maybe create) the store and write one key."""
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            with MmapStore(path, **SMALL) as store:
                store.set(f"opener:{proc}:{t}", proc * 100 + t)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(ns.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def create_under_umask(tmp: Path, umask: int, ns: argparse.Namespace, report: C.Report, rows: Rows) -> None:
    d = tmp / f"umask{umask:03o}"
    d.mkdir()
    path = d / "store"
    old = os.umask(umask)
    try:  # the children inherit the umask
        pids = [C.fork(lambda p=p: racing_openers(path, p, ns)) for p in range(ns.processes)]
    finally:
        os.umask(old)
    codes = C.wait(pids, 60)
    ok = sum(c == 0 for c in codes.values())
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    names = sorted(p.name for p in d.iterdir())
    with MmapStore(path) as store:
        seen = sum(store.get(f"opener:{p}:{t}") == p * 100 + t
                   for p in range(ns.processes) for t in range(ns.threads))
        problems = store.check()
    n = ns.processes * ns.threads
    rows.row(f"create, umask {umask:03o}", "0640, ours, one file",
               f"{mode:04o}, uid {st.st_uid}, {len(names)} file(s), {seen}/{n} writes seen", "-",
               "ok" if mode == 0o640 and st.st_uid == os.geteuid() and names == ["store"]
               and seen == n and ok == len(pids) else "WRONG")
    report.check(f"umask {umask:03o}: every opener succeeded", ok == len(pids), f"exit codes {codes}")
    report.check(f"umask {umask:03o}: mode 0640", mode == 0o640, f"mode {mode:04o}")
    report.check(f"umask {umask:03o}: owned by euid", st.st_uid == os.geteuid(), f"uid {st.st_uid}")
    report.check(f"umask {umask:03o}: one file, no temporary left", names == ["store"], f"{names}")
    report.check(f"umask {umask:03o}: all openers share one file", seen == n and problems == [],
                 f"{seen}/{n} writes seen; check(): {problems[:3]}")


def make_store(path: Path, rnd: random.Random) -> None:
    with MmapStore(path, **SMALL) as store:
        for i in range(rnd.randrange(5, 50)):
            store.set(f"k{i}", rnd.randbytes(rnd.randrange(1, 500)).hex())


def refused(name: str, path: Path, watch: list[Path], report: C.Report, rows: Rows) -> None:
    """Opening ``path`` must raise UnsafeFileError (a PermissionError); ``watch`` untouched."""
    before = [snapshot(p) for p in watch]
    try:
        MmapStore(path, **SMALL).close()
        got, ok = "opened it", False
    except UnsafeFileError as e:
        why = str(e).replace(str(path), "").split(";")[0].strip()
        got, ok = f"UnsafeFileError: {why[:50]}", isinstance(e, PermissionError)
    except Exception as e:  # noqa: BLE001 - the wrong refusal is a failure
        got, ok = f"{type(e).__name__}: {e}", False
    untouched = [snapshot(p) for p in watch] == before
    rows.row(name, "UnsafeFileError", got, "yes" if untouched else "NO",
               "ok" if ok and untouched else "WRONG")
    report.check(f"{name}: refused with UnsafeFileError (a PermissionError)", ok, got)
    report.check(f"{name}: left byte-for-byte untouched", untouched,
                 f"before {before}, after {[snapshot(p) for p in watch]}")


def other_user(tmp: Path, rnd: random.Random, report: C.Report, rows: Rows) -> None:
    d = tmp / "other-user"
    d.mkdir()
    os.chmod(d, 0o755)  # nobody can reach the file: the store itself must refuse
    path = d / "store"
    make_store(path, rnd)
    before = snapshot(path)
    nobody = pwd.getpwnam("nobody")

    def child() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        try:
            MmapStore(path, **SMALL).close()
        except PermissionError:
            os._exit(0)
        os._exit(5)  # opened: the invariant broke

    codes = C.wait([C.fork(child)], 30)
    code = next(iter(codes.values()))
    untouched = snapshot(path) == before
    got = {0: "PermissionError", 5: "opened it", None: "hung"}.get(code, f"exit {code}")
    rows.row("child as nobody opens our 0640 file", "PermissionError", got,
               "yes" if untouched else "NO", "ok" if code == 0 and untouched else "WRONG")
    report.check("a process of another uid is refused", code == 0, got)
    report.check("the other uid left our file untouched", untouched, "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=8, help="racing creator processes per umask [8]")
    p.add_argument("--threads", type=int, default=2, help="opener threads per process [2]")
    p.add_argument("--rounds", type=int, default=5, help="repeat every case this many times [5]")
    C.add_common_args(p, timeout=120)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if os.geteuid() != 0:
        print("file_modes needs root: it chowns files to nobody and drops a child to nobody",
              file=sys.stderr)
        return 2
    C.hard_timeout(ns.timeout, "file_modes")
    with tempfile.TemporaryDirectory(prefix="stress-modes-", dir=ns.dir) as tmp:
        return run(ns, Path(tmp))


def run(ns: argparse.Namespace, tmp: Path) -> int:
    rnd = random.Random(ns.seed)
    report = C.Report(
        f"file_modes: {ns.processes} processes x {ns.threads} threads racing per umask, "
        f"{ns.rounds} round(s), seed {ns.seed}",
        ["case", "expected", "got (last round, or a wrong one)", "untouched", "result", "rounds ok"],
    )

    nobody = pwd.getpwnam("nobody")
    rows = Rows(report)
    for r in range(ns.rounds):
        base = tmp / f"round{r}"
        base.mkdir()
        for umask in UMASKS:
            create_under_umask(base, umask, ns, report, rows)
        other_user(base, rnd, report, rows)

        target = base / "target"
        make_store(target, rnd)
        link = base / "link"
        link.symlink_to(target)
        refused("symlink to a good store", link, [link, target], report, rows)

        dangling = base / "dangling"
        dangling.symlink_to(base / "nowhere")
        refused("dangling symlink", dangling, [dangling], report, rows)
        report.check("dangling symlink: nothing created at its target",
                     not (base / "nowhere").exists(), "the store followed the link")

        foreign = base / "foreign"
        make_store(foreign, rnd)
        os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
        refused("file owned by nobody", foreign, [foreign], report, rows)

        for mode in (0o660, 0o646, 0o666):
            loose = base / f"mode{mode:03o}"
            make_store(loose, rnd)
            os.chmod(loose, mode)
            refused(f"file with mode {mode:04o}", loose, [loose], report, rows)
    rows.flush()
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
