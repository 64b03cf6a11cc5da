"""The store file: created 0640 whatever the umask, atomically, and refused when unsafe or foreign."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest
from _procs import fork, wait_ok

from prefork_sessions import FileFormatError, MmapStore, SessionStoreError, UnsafeFileError
from prefork_sessions import _layout as L

SMALL = {"cache_size": 64 << 10, "page_size": 8 << 10}


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
    with pytest.raises(UnsafeFileError, match="regular"):
        MmapStore(fifo, **SMALL)
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        MmapStore(tmp_path / "dir", **SMALL)


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
    with pytest.raises(UnsafeFileError, match="owned by uid") as err:
        MmapStore(path, **SMALL)
    assert "per-user path" in str(err.value)
    assert _snapshot(path) == before


def test_other_uid_cannot_open_our_file_for_writing(tmp_path: Path) -> None:
    """A process of another user (a forked child dropping to nobody) is refused."""
    assert os.geteuid() == 0
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "s"
    with MmapStore(path, **SMALL):
        pass
    nobody = pwd.getpwnam("nobody")

    def as_nobody() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        with pytest.raises(PermissionError):
            MmapStore(path, **SMALL)

    wait_ok([fork(as_nobody)])


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


def test_racing_creators_end_up_on_one_file(tmp_path: Path) -> None:
    """Many processes creating the same store at once all map the same, whole file."""
    path = tmp_path / "s"
    def create(i: int) -> None:
        with MmapStore(path, cache_size=4 << 20, page_size=64 << 10) as store:
            store.set(f"from{i}", i)

    wait_ok([fork(lambda i=i: create(i)) for i in range(8)])
    with MmapStore(path) as store:
        assert sorted(store.get(f"from{i}") for i in range(8)) == list(range(8))
        assert store.check() == []
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
