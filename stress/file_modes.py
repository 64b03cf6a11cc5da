#!/usr/bin/env python3
"""File modes and users: how the store file is created, and what it refuses to open.

  * under umask 000, 022 and 077, --processes x --threads openers race to create
    the same file: it ends 0640, owned by us, one file (no temporary left), and
    every opener sees the others' writes;
  * a forked child that drops to ``nobody`` is refused with UnsafeFileError (a
    PermissionError) naming the file's owner;
  * a symlink to a good store, a file owned by ``nobody``, group- or
    world-writable files, a directory, a socket, a FIFO and a store file with a
    second hard link at the path are refused (UnsafeFileError) and left
    byte-for-byte untouched: content, mode, owner, mtime; a path in a missing
    directory is refused with StorePathError and creates nothing;
  * a sparse copy of a store (``cp --sparse=always``) opens fully backed, data intact;
  * a creator SIGKILLed at a random point of building the file leaves nothing
    behind (the file is unnamed until complete), and where O_TMPFILE is not
    used the next creator removes the dead one's temporary; then a new file is
    created whole.

Needs root (to chown and to drop to nobody).

    python stress/file_modes.py --processes 8 --threads 2 --rounds 5 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import random
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import _common as C

from prefork_sessions import MmapStore, UnsafeFileError, _file
from prefork_sessions._errors import StorePathError

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
    elif stat.S_ISDIR(st.st_mode):
        content = "\0".join(sorted(os.listdir(path))).encode()
    elif stat.S_ISREG(st.st_mode):
        content = path.read_bytes()
    else:  # a FIFO or socket: nothing to read without side effects
        content = b""
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
    with MmapStore(path, **SMALL) as store:
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


def refused(name: str, path: Path, watch: list[Path], report: C.Report, rows: Rows,
            error: type[OSError] = UnsafeFileError) -> None:
    """Opening ``path`` must raise ``error`` (UnsafeFileError: a PermissionError); ``watch`` untouched."""
    before = [snapshot(p) for p in watch]
    expected = error.__name__
    try:
        MmapStore(path, **SMALL).close()
        got, ok = "opened it", False
    except error as e:
        why = str(e).replace(str(path), "").split(";")[0].strip()
        got, ok = f"{expected}: {why[:50]}", error is not UnsafeFileError or isinstance(e, PermissionError)
    except Exception as e:  # noqa: BLE001 - the wrong refusal is a failure
        got, ok = f"{type(e).__name__}: {e}", False
    untouched = [snapshot(p) for p in watch] == before
    rows.row(name, expected, got, "yes" if untouched else "NO",
               "ok" if ok and untouched else "WRONG")
    report.check(f"{name}: refused with {expected}", ok, got)
    report.check(f"{name}: left byte-for-byte untouched", untouched,
                 f"before {before}, after {[snapshot(p) for p in watch]}")


def sparse_copy(base: Path, rnd: random.Random, report: C.Report, rows: Rows) -> None:
    path = base / "sparse"
    make_store(path, rnd)
    with MmapStore(path, **SMALL) as store:
        before = {k: store.get(k) for k in store}
    subprocess.run(["cp", "--sparse=always", str(path), f"{path}.copy"], check=True)
    os.replace(f"{path}.copy", path)
    size = path.stat().st_size
    holes = path.stat().st_blocks * 512 < size
    with MmapStore(path, **SMALL) as store:
        backed = path.stat().st_blocks * 512 >= size
        same = {k: store.get(k) for k in store} == before and store.check() == []
    ok = holes and backed and same
    rows.row("sparse copy (cp --sparse=always)", "opened, fully backed",
             f"holes before: {holes}, backed after: {backed}, data intact: {same}", "-",
             "ok" if ok else "WRONG")
    report.check("sparse copy: the copy had holes (else this proves nothing)", holes, "")
    report.check("sparse copy: fully backed once opened", backed, f"{path.stat().st_blocks * 512}/{size}")
    report.check("sparse copy: every key reads back, check() clean", same, "")


def killed_creator(base: Path, rnd: random.Random, unnamed: bool, report: C.Report, rows: Rows) -> None:
    """SIGKILL a creator at a random write of its fill: nothing may stay behind for good."""
    d = base / f"killed-{'unnamed' if unnamed else 'named'}"
    d.mkdir()
    path = d / "store"
    geometry = {"cache_size": 4 << 20, "page_size": 64 << 10}
    stop_at = rnd.randrange(1, (4 << 20) // 4096)

    def create() -> None:
        real_pwrite, count = os.pwrite, [0]

        def pwrite(fd: int, data: bytes, at: int) -> int:
            count[0] += 1
            if count[0] == stop_at:
                os.kill(os.getpid(), signal.SIGSTOP)
            return real_pwrite(fd, data, at)

        os.pwrite = pwrite  # in this child only
        MmapStore(path, **geometry).close()

    saved = _file._O_TMPFILE
    if not unnamed:
        _file._O_TMPFILE = 0  # as on a file system without O_TMPFILE; the child inherits it
    try:
        pid = C.fork(create)
        _, status = os.waitpid(pid, os.WUNTRACED)
        stopped = os.WIFSTOPPED(status)
        os.kill(pid, signal.SIGKILL)
        C.wait([pid], 30)
        left = sorted(p.name for p in d.iterdir())
        with MmapStore(path, **geometry) as store:
            store.set("k", "v")
            sound = store.check() == [] and store.get("k") == "v"
    finally:
        _file._O_TMPFILE = saved
    after = sorted(p.name for p in d.iterdir())
    expected_left = [] if unnamed else [f".store.{pid}."]
    left_ok = left == [] if unnamed else len(left) == 1 and left[0].startswith(expected_left[0])
    ok = stopped and left_ok and after == ["store"] and sound
    name = f"creator killed at write {stop_at}, {'O_TMPFILE' if unnamed else 'named temporary'}"
    rows.row(f"creator killed mid-build, {'O_TMPFILE' if unnamed else 'named temporary'}",
             "nothing left" if unnamed else "temporary removed by next creator",
             f"left after kill: {len(left)} file(s); after next creator: {after}", "-",
             "ok" if ok else "WRONG")
    report.check(f"{name}: it was stopped mid-build", stopped, f"status {status}")
    report.check(f"{name}: what the kill left", left_ok, f"{left}")
    report.check(f"{name}: the next creator made one whole file", after == ["store"] and sound,
                 f"{after}, check() clean: {sound}")


def other_user(tmp: Path, rnd: random.Random, report: C.Report, rows: Rows) -> None:
    d = tmp / "other-user"
    d.mkdir()
    os.chmod(d, 0o755)  # nobody can reach the file: the store itself must refuse
    path = d / "store"
    make_store(path, rnd)
    before = snapshot(path)
    nobody = pwd.getpwnam("nobody")
    # Either our owner check names the owner, or (when --dir lies under a directory
    # nobody may not enter) the refusal says the path cannot be reached.
    named = (f"belongs to {pwd.getpwuid(os.stat(path).st_uid).pw_name}", "cannot be reached by nobody")

    def child() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        try:
            MmapStore(path, **SMALL).close()
        except UnsafeFileError as e:
            os._exit(0 if any(n in str(e) for n in named) else 6)
        except PermissionError:
            os._exit(7)  # refused, but not with our error naming the owner
        os._exit(5)  # opened: the invariant broke

    codes = C.wait([C.fork(child)], 30)
    code = next(iter(codes.values()))
    untouched = snapshot(path) == before
    got = {0: "UnsafeFileError naming the owner or path", 5: "opened it", 6: "UnsafeFileError, owner unnamed",
           7: "a bare PermissionError", None: "hung"}.get(code, f"exit {code}")
    rows.row("child as nobody opens our 0640 file", "UnsafeFileError", got,
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
        os.chmod(tmp, 0o755)  # so that nobody reaches the files and the store itself must refuse
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

        directory = base / "a-directory"
        directory.mkdir()
        refused("a directory", directory, [directory], report, rows)
        fifo = base / "fifo"
        os.mkfifo(fifo, 0o600)
        refused("a FIFO", fifo, [fifo], report, rows)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(base / "socket"))
            refused("a socket", base / "socket", [base / "socket"], report, rows)
        linked = base / "linked"
        make_store(linked, rnd)
        os.link(linked, base / "linked-too")
        refused("a store file with a second hard link", linked, [linked], report, rows)
        refused("a path in a missing directory", base / "missing" / "store", [base], report, rows,
                error=StorePathError)
        report.check("a path in a missing directory: nothing created", not (base / "missing").exists(), "")
        sparse_copy(base, rnd, report, rows)
        killed_creator(base, rnd, True, report, rows)
        killed_creator(base, rnd, False, report, rows)
    rows.flush()
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
