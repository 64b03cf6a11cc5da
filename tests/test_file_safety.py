"""The store file: created 0640 whatever the umask, atomically, and refused when unsafe or foreign."""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _procs import fork, wait_ok

from prefork_sessions import (
    FileFormatError,
    MmapStore,
    NoSpaceError,
    SessionStoreError,
    UnsafeFileError,
    _file,
)
from prefork_sessions import _layout as L
from prefork_sessions._errors import StorePathError

SMALL = {"cache_size": 64 << 10, "page_size": 8 << 10}
MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a tmpfs of a given size (bytes) under tmp_path: a disk that really fills up."""
    assert os.geteuid() == 0, "this test mounts a tmpfs and needs root (CI runs as root)"
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       check=True)
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        if subprocess.run(["umount", str(where)], check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory (mode 0755) every user can reach: pytest's tmp_path sits under a
    0700 directory, where another user is stopped before our own checks."""
    where = Path(tempfile.mkdtemp(prefix="prefork-sessions-test-", dir="/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where)


def _as_nobody(fn: Callable[[], object]) -> None:
    """Run ``fn`` in a child process of uid/gid nobody; assert it returned."""
    nobody = pwd.getpwnam("nobody")

    def child() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        fn()

    wait_ok([fork(child)])


def _free(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def _backed(path: Path) -> int:
    """Bytes of the file that have disk blocks behind them."""
    return os.stat(path).st_blocks * 512


def _fill(where: Path, leave: int) -> None:
    """Take all free space of a file system but ``leave`` bytes."""
    with open(where / "filler", "wb") as f:
        f.write(bytes(max(_free(where) - leave, 0)))


def _filled_store(path: Path, **kw: int) -> dict[str, str]:
    data = {f"key{i}": f"value {i} " * 20 for i in range(40)}
    with MmapStore(path, **kw) as store:
        for k, v in data.items():
            store.set(k, v)
    return data


def _snapshot(path: Path) -> tuple[bytes, int, float]:
    st = os.lstat(path)
    data = os.readlink(path).encode() if stat.S_ISLNK(st.st_mode) else path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
    return data, st.st_mode, st.st_mtime


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_created_with_mode_0640_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with MmapStore(tmp_path / "s", **SMALL):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary file left behind


def test_symlink_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "target"
    with MmapStore(target, **SMALL):
        pass
    link = tmp_path / "link"
    link.symlink_to(target)
    before = _snapshot(link), _snapshot(target)
    with pytest.raises(UnsafeFileError, match="symbolic link") as err:
        MmapStore(link, **SMALL)
    assert isinstance(err.value, PermissionError)
    assert (_snapshot(link), _snapshot(target)) == before


def test_dangling_symlink_is_not_followed_to_create_a_file(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFileError):
        MmapStore(link, **SMALL)
    assert not (tmp_path / "elsewhere").exists()


def test_non_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UnsafeFileError, match="a FIFO, not a regular file"):
        MmapStore(fifo, **SMALL)


def test_a_directory_at_the_path_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_text("x")
    with pytest.raises(UnsafeFileError, match="is a directory, not a regular file") as err:
        MmapStore(tmp_path / "dir", **SMALL)
    assert str(tmp_path / "dir") in str(err.value)
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["inside"]


def test_a_socket_at_the_path_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        with pytest.raises(UnsafeFileError, match="is a socket, not a regular file") as err:
            MmapStore(path, **SMALL)
        assert str(path) in str(err.value)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_file_with_two_hard_links_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _filled_store(path, **SMALL)
    os.link(path, tmp_path / "other-name")
    before = _snapshot(path)
    with pytest.raises(UnsafeFileError, match="has 2 hard links"):
        MmapStore(path, **SMALL)
    assert _snapshot(path) == before
    os.unlink(tmp_path / "other-name")
    with MmapStore(path, **SMALL) as store:
        assert store.get("key1") is not None


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "s"
    with pytest.raises(StorePathError) as err:
        MmapStore(path, **SMALL)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, SessionStoreError)
    message = str(err.value)
    assert f"{tmp_path / 'no' / 'such' / 'dir'} for the store file 's' does not exist" in message
    assert f"{tmp_path / 'no'} does not exist" in message and "mkdir -p" in message
    assert ".tmp" not in message
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("mode", [0o660, 0o646, 0o666])
def test_group_or_world_writable_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "s"
    with MmapStore(path, **SMALL) as store:
        store.set("k", "v")
    os.chmod(path, mode)
    before = _snapshot(path)
    with pytest.raises(UnsafeFileError, match="chmod 640"):
        MmapStore(path, **SMALL)
    assert _snapshot(path) == before


def test_file_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "this test needs root to give the file away (CI runs as root)"
    path = tmp_path / "s"
    with MmapStore(path, **SMALL):
        pass
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    before = _snapshot(path)
    with pytest.raises(UnsafeFileError, match="belongs to nobody") as err:
        MmapStore(path, **SMALL)
    assert "per-user path" in str(err.value)
    assert _snapshot(path) == before


def test_other_uid_cannot_open_our_file_for_writing(open_dir: Path) -> None:
    """A process of another user (a forked child dropping to nobody) is refused with
    our error, saying whose file it is and which path to use instead: what a second
    user of the demo gets on a shared machine."""
    assert os.geteuid() == 0
    open_dir.chmod(0o1777)  # like /tmp, where the demo's file lives
    path = open_dir / "s"
    with MmapStore(path, **SMALL):
        pass
    before = _snapshot(path)

    def refused() -> None:
        with pytest.raises(UnsafeFileError) as err:
            MmapStore(path, **SMALL)
        assert isinstance(err.value, PermissionError)
        message = str(err.value)
        assert f"{path} belongs to root (uid 0)" in message, message
        assert "nobody (uid 65534)" in message and f"MmapStore('{path}.nobody')" in message, message
        with MmapStore(f"{path}.nobody", **SMALL) as mine:  # the path it suggests works
            mine.set("k", "v")

    _as_nobody(refused)
    assert _snapshot(path) == before
    assert os.stat(f"{path}.nobody").st_uid == pwd.getpwnam("nobody").pw_uid


def test_a_directory_another_uid_cannot_write_is_named(open_dir: Path) -> None:
    assert os.geteuid() == 0
    path = open_dir / "s"  # nobody may enter the directory, not create files in it

    def refused() -> None:
        with pytest.raises(UnsafeFileError, match=f"nobody \\(uid 65534\\) may not create files in {open_dir}"):
            MmapStore(path, **SMALL)

    _as_nobody(refused)
    assert list(open_dir.iterdir()) == []


def test_a_path_another_uid_cannot_reach_is_named(tmp_path: Path) -> None:
    assert os.geteuid() == 0
    path = tmp_path / "s"  # under pytest's 0700 directory
    with MmapStore(path, **SMALL):
        pass

    def refused() -> None:
        with pytest.raises(UnsafeFileError, match="cannot be reached by nobody \\(uid 65534\\)"):
            MmapStore(path, **SMALL)

    _as_nobody(refused)


@pytest.mark.parametrize(
    "damage",
    ["foreign", "empty", "version", "truncated", "extended"],
)
def test_wrong_magic_version_or_size_is_refused_untouched(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s"
    with MmapStore(path, **SMALL) as store:
        store.set("k", "v")
    raw = bytearray(path.read_bytes())
    if damage == "foreign":
        raw[:8] = b"NOTOURS!"
    elif damage == "empty":
        raw = bytearray()
    elif damage == "version":
        raw[8:12] = (L.VERSION + 1).to_bytes(4, "little")
    elif damage == "truncated":
        raw = raw[: len(raw) - 4096]
    else:
        raw += b"\0" * 4096
    path.write_bytes(bytes(raw))
    os.chmod(path, 0o640)
    before = _snapshot(path)
    with pytest.raises(FileFormatError) as err:
        MmapStore(path, **SMALL)
    assert isinstance(err.value, OSError) and isinstance(err.value, SessionStoreError)
    assert str(path) in str(err.value)
    assert _snapshot(path) == before


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named-temporary"])
def test_racing_creators_end_up_on_one_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    """Many processes creating the same store at once all map the same, whole file,
    whether it is built unnamed or (where O_TMPFILE is missing) under a temporary name."""
    if not unnamed:
        monkeypatch.setattr(_file, "_O_TMPFILE", 0)
    path = tmp_path / "s"
    def create(i: int) -> None:
        with MmapStore(path, cache_size=4 << 20, page_size=64 << 10) as store:
            store.set(f"from{i}", i)

    wait_ok([fork(lambda i=i: create(i)) for i in range(8)])
    with MmapStore(path) as store:
        assert sorted(store.get(f"from{i}") for i in range(8)) == list(range(8))
        assert store.check() == []
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


# ---------------------------------------------------------------- blocks behind every page


def _sparse_copy(path: Path, how: str) -> None:
    """Replace the store file by a sparse copy of itself, as an operator might make one."""
    copy = path.with_name("copy")
    if how == "cp":
        subprocess.run(["cp", "--sparse=always", str(path), str(copy)], check=True)
    else:  # a naive restore: extend an empty file with truncate, write back only non-zero blocks
        data = path.read_bytes()
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.ftruncate(fd, len(data))
        for at in range(0, len(data), 4096):
            if any(data[at:at + 4096]):
                os.pwrite(fd, data[at:at + 4096], at)
        os.close(fd)
    os.chmod(copy, 0o640)
    os.replace(copy, path)


@pytest.mark.parametrize("how", ["cp", "truncate"])
def test_a_sparse_store_file_is_fully_backed_when_opened(tmp_path: Path, how: str) -> None:
    path = tmp_path / "s"
    data = _filled_store(path, cache_size=4 * MIB, page_size=16 << 10)
    size = path.stat().st_size
    _sparse_copy(path, how)
    assert _backed(path) < size // 2, "the copy is not sparse: the test proves nothing"
    content = path.read_bytes()
    with MmapStore(path) as store:
        assert _backed(path) >= size
        assert path.read_bytes() == content  # allocating changed no byte
        assert {k: store.get(k) for k in data} == data
        assert store.check() == []
        for i in range(300):  # stores into what were holes
            store.set(f"new{i}", "v" * 500)
        assert store.check() == []


def test_a_sparse_store_file_on_a_full_disk_is_refused_not_a_sigbus(
    small_fs: Callable[[int], Path],
) -> None:
    """On a full disk the first store into a hole would kill the worker with SIGBUS;
    opening refuses the file instead (in a child, so a SIGBUS fails the test, not pytest)."""
    where = small_fs(8 * MIB)
    path = where / "s"
    data = _filled_store(path, cache_size=4 * MIB, page_size=16 << 10)
    _sparse_copy(path, "cp")
    content = path.read_bytes()
    _fill(where, 256 << 10)

    def open_and_write() -> None:
        with pytest.raises(NoSpaceError) as err:
            store = MmapStore(path)
            for i in range(4000):
                store.set(f"new{i}", "v" * 900)
        assert isinstance(err.value, OSError)
        message = str(err.value)
        assert str(path) in message and "is sparse" in message, message
        assert "bytes free; a store into a hole" in message and f"on {where}" in message, message
        assert "smaller cache_size" in message, message

    free = _free(where)
    pid = fork(open_and_write)
    status = os.waitpid(pid, 0)[1]
    assert not os.WIFSIGNALED(status), f"the child died of {signal.Signals(os.WTERMSIG(status)).name}"
    assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_bytes() == content
    assert _free(where) == free  # the refusal did not take the disk's last blocks
    os.unlink(where / "filler")  # with room again, the same file opens and keeps its data
    with MmapStore(path) as store:
        assert {k: store.get(k) for k in data} == data


def test_a_sparse_file_whose_allocation_runs_out_of_room_is_refused(
    small_fs: Callable[[int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free space can go between the check and fallocate (another writer): fallocate's
    own ENOSPC is the same refusal.  The check is passed here by reporting more room
    than there is; the disk and its ENOSPC are real."""
    where = small_fs(8 * MIB)
    path = where / "s"
    _filled_store(path, cache_size=4 * MIB, page_size=16 << 10)
    _sparse_copy(path, "cp")
    content = path.read_bytes()
    _fill(where, 256 << 10)
    monkeypatch.setattr(_file, "_free", lambda fd: 1 << 40)
    with pytest.raises(NoSpaceError, match=f"{path} is sparse"):
        MmapStore(path)
    assert path.read_bytes() == content


def test_a_sparse_file_is_refused_where_holes_cannot_be_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4 allocates holes; a file system that cannot (NFSv3, some FUSE) answers
    EOPNOTSUPP, which is simulated here on a real sparse file."""
    path = tmp_path / "s"
    _filled_store(path, **SMALL)
    whole = tmp_path / "whole"
    shutil.copyfile(path, whole)
    os.chmod(whole, 0o640)
    _sparse_copy(path, "cp")
    before = _snapshot(path)
    monkeypatch.setattr(_file, "_fallocate", lambda fd, size: errno.EOPNOTSUPP)
    with pytest.raises(FileFormatError, match="cannot allocate the holes") as err:
        MmapStore(path, **SMALL)
    assert "cp --sparse=never" in str(err.value)
    assert _snapshot(path) == before
    with MmapStore(whole, **SMALL) as store:  # a file without holes needs no allocation
        assert store.get("key1") is not None


# ---------------------------------------------------------------- room to create the file


@pytest.mark.parametrize("cache_size", [8 * MIB, 1 << 46])
def test_creating_a_file_larger_than_the_free_space_is_refused(
    small_fs: Callable[[int], Path], cache_size: int
) -> None:
    where = small_fs(2 * MIB)
    path = where / "s"
    free = _free(where)
    with pytest.raises(NoSpaceError) as err:
        MmapStore(path, cache_size=cache_size, page_size=64 << 10)
    assert isinstance(err.value, OSError)
    size = L.file_size(64 << 10, cache_size // (64 << 10))
    assert str(err.value) == (
        f"creating the store file {path} needs {size} bytes but the file system at {where} has "
        f"{free} bytes free; free {size - free} bytes on {where} or choose a smaller cache_size."
    )
    assert list(where.iterdir()) == []
    assert _free(where) == free


def test_a_full_disk_found_while_allocating_is_refused_and_leaves_nothing(
    small_fs: Callable[[int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free space can go between the check and the allocation (another writer): the
    allocation's own ENOSPC is the same refusal.  The check is skipped here by
    reporting more room than there is; the disk itself is real."""
    where = small_fs(2 * MIB)
    path = where / "s"
    monkeypatch.setattr(_file, "_free", lambda fd: 1 << 40)
    with pytest.raises(NoSpaceError, match=f"creating the store file {path} needs"):
        MmapStore(path, cache_size=4 * MIB, page_size=64 << 10)
    assert list(where.iterdir()) == []
    assert os.statvfs(where).f_bfree == os.statvfs(where).f_blocks  # nothing held


# ---------------------------------------------------------------- a creator killed mid-build


def _creator_stopped_mid_build(path: Path, cache_size: int) -> int:
    """Fork a creator of ``path`` that stops itself (SIGSTOP) after 1000 writes of its
    fill; return its pid once it is stopped there."""
    def create() -> None:
        real_pwrite, count = os.pwrite, [0]

        def pwrite(fd: int, data: bytes, at: int) -> int:
            count[0] += 1
            if count[0] == 1000:
                os.kill(os.getpid(), signal.SIGSTOP)
            return real_pwrite(fd, data, at)

        os.pwrite = pwrite  # this child only
        MmapStore(path, cache_size=cache_size, page_size=64 << 10)

    pid = fork(create)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the creator did not stop mid-build: {status}"
    return pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_creator_killed_mid_build_leaves_nothing_behind(small_fs: Callable[[int], Path]) -> None:
    where = small_fs(48 * MIB)
    path = where / "s"
    empty = _free(where)
    pid = _creator_stopped_mid_build(path, 32 * MIB)
    assert _free(where) < empty  # it is mid-build: its file takes room
    assert list(where.iterdir()) == []  # and has no name
    _kill(pid)
    assert list(where.iterdir()) == []
    assert _free(where) == empty  # the unnamed file went with its creator
    with MmapStore(path, cache_size=32 * MIB, page_size=64 << 10) as store:
        store.set("k", "v")
        assert store.check() == []
    assert [p.name for p in where.iterdir()] == ["s"]


def test_without_o_tmpfile_the_next_creator_removes_a_dead_creators_temporary(
    small_fs: Callable[[int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the file system has no O_TMPFILE the file is built under a temporary
    name: a killed creator leaves it, and the next creator removes it (its pid is
    dead) before it checks for room, which the temporary would otherwise take."""
    monkeypatch.setattr(_file, "_O_TMPFILE", 0)  # inherited by the forked creator
    where = small_fs(48 * MIB)
    path = where / "s"
    empty = _free(where)
    pid = _creator_stopped_mid_build(path, 32 * MIB)
    names = [p.name for p in where.iterdir()]
    assert len(names) == 1 and names[0].startswith(f".s.{pid}.") and names[0].endswith(".tmp")
    _kill(pid)
    assert [p.name for p in where.iterdir()] == names  # nobody removed it yet
    with MmapStore(path, cache_size=32 * MIB, page_size=64 << 10) as store:
        store.set("k", "v")
    assert [p.name for p in where.iterdir()] == ["s"]
    assert _free(where) >= empty - 33 * MIB


def test_a_live_creators_temporary_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_file, "_O_TMPFILE", 0)
    live = tmp_path / f".s.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"being built")
    other = tmp_path / ".unrelated.1.0123abcd.tmp"
    other.write_bytes(b"not ours")
    with MmapStore(tmp_path / "s", **SMALL):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "s"])


# ---------------------------------------------------------------- asking for another geometry


def test_an_existing_file_with_less_room_is_adopted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s"
    caplog.set_level(logging.WARNING, logger="prefork_sessions")
    with MmapStore(path, cache_size=MIB, page_size=16 << 10) as store:
        store.set("k", "v")
    with MmapStore(path, cache_size=MIB // 2, page_size=16 << 10):  # less: nothing to say
        pass
    assert caplog.records == []
    with MmapStore(path, cache_size=4 * MIB, page_size=16 << 10) as store:
        assert store.cache_size == MIB and store.get("k") == "v"
    with MmapStore(path, cache_size=4 * MIB, page_size=16 << 10):  # once per process
        pass
    with MmapStore(path, cache_size=MIB, page_size=64 << 10) as store:  # another page size
        assert store.page_size == 16 << 10
    messages = [r.getMessage() for r in caplog.records]
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2, messages
    assert messages[0].startswith(
        f"{path} holds 64 pages of 16384 bytes (cache_size 1048576); cache_size=4194304, "
        "page_size=16384 was asked for and not applied"
    )
    assert "delete it" in messages[0]
    assert "cache_size=1048576, page_size=65536 was asked for" in messages[1]
