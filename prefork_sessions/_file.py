"""Creating and opening the store file safely.

Creation
    The file is built fully initialised where no other process can see it, given
    mode 0640 with ``fchmod`` (so the umask cannot change it), then hard-linked
    into place; two processes racing to create it both end up on the same file
    (the loser's ``link`` fails and it opens the winner's).  It is built as an
    unnamed ``O_TMPFILE`` in the target directory and linked through
    ``/proc/self/fd``: a creator killed mid-build leaves nothing behind, because
    an unnamed file vanishes with its last descriptor.  Where the file system has
    no ``O_TMPFILE`` it is built under a temporary name holding the creator's pid,
    and the next creator removes temporaries whose creator is dead.  Free space is
    checked first, and every block is allocated before the file is linked, so a
    full disk is a NoSpaceError naming both numbers, never a half-built file.

Opening
    Refused, untouched, with an error naming the path and the fix: symlinks
    (``O_NOFOLLOW``), directories, sockets and other non-regular files, files with
    more than one hard link, files of another owner or writable by group or
    others, files whose header or size does not match.  ``create=False`` opens
    only a file that exists (the command line's read-only subcommands).

The open lock
    Every store holds a shared ``flock`` on its descriptor for as long as the file
    is open (the mapping's own duplicate descriptor keeps it, and so does a forked
    child that inherited them, until it lets go).  Maintenance that replaces the
    file (``prefork-sessions resize``) takes it exclusively: it succeeds only when
    no other process has the file open, and while it is held a new opener waits
    (up to its ``lock_timeout``) instead of mapping a file about to be replaced.
    An opener that got the lock checks that the path still names the file it
    opened, and opens the replacement if not.  ``flock`` locks belong to the open
    file description and the kernel drops them when the last descriptor closes,
    so a killed process never leaves the file locked; they are independent of the
    page locks and of the OFD locks ``_locks`` uses.

Backing
    A file mapped into memory whose blocks are not allocated (a sparse copy from
    ``cp --sparse=always``, ``rsync -S`` or a restore, or a file extended with
    ``truncate``) would kill a worker with SIGBUS on the first store into a hole
    once the disk is full.  Opening therefore allocates every hole with
    ``fallocate`` (contents unchanged; NoSpaceError if the disk cannot hold it).
    Where the file system cannot allocate (EOPNOTSUPP), a file with holes is
    refused; filling the holes with zeros instead would race with live writers
    storing into them through their mappings.  glibc's ``posix_fallocate`` is not
    used for this reason: on EOPNOTSUPP it falls back to writing a zero byte into
    every block that reads as zero, which can erase a concurrent store.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass
from typing import Any
from zlib import crc32

from . import _layout as L
from . import _locks
from ._errors import (
    FileFormatError,
    LockTimeoutError,
    NoSpaceError,
    StorePathError,
    UnsafeFileError,
)

FILE_MODE = 0o640
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)  # 0: build under a named temporary instead
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)  # the file system (or kernel) lacks O_TMPFILE
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_LINKED_RETRIES = 50  # x 10 ms: a named-temporary creator links, then unlinks its temporary
_OPEN_LOCK_POLL = 0.01  # seconds between tries of a busy open lock
DEFAULT_OPEN_WAIT = 10.0  # seconds an opener waits for the open lock (MmapStore passes its lock_timeout)

log = logging.getLogger("prefork_sessions")
_warned: set[tuple[str, int, int, int, int]] = set()


def _load_fallocate() -> Any:
    """libc's fallocate with 64-bit offsets (the syscall itself, no emulation), or None."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "fallocate64", None)  # glibc; musl >= 1.2.4 has only fallocate, 64-bit
    if fn is None and ctypes.sizeof(ctypes.c_long) == 8:
        fn = getattr(libc, "fallocate", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
    return fn


_libc_fallocate = _load_fallocate()


@dataclass(frozen=True)
class Geometry:
    """The layout of one store file, as recorded in its header."""

    page_size: int
    num_pages: int
    slots: int
    seed: int


def open_or_create(
    path: str, page_size: int, num_pages: int, *, create: bool = True, exclusive: bool = False,
    wait: float = DEFAULT_OPEN_WAIT,
) -> tuple[int, Geometry]:
    """Open the store file at ``path``, creating it if missing (unless ``create`` is
    false); every block allocated, the open lock held (shared, or with ``exclusive``
    alone), waiting for it up to ``wait`` seconds.

    Returns the descriptor and the file's own geometry (which wins over the
    arguments when the file already exists; asking for more is logged as a
    warning).  Raises UnsafeFileError, FileFormatError, NoSpaceError or
    StorePathError for a file that cannot be used or made (StorePathError for a
    missing one when ``create`` is false), LockTimeoutError when the open lock
    stays busy.
    """
    for attempt in range(_LINKED_RETRIES):
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            if not create:
                raise _no_store(path) from None
            _create(path, page_size, num_pages)
            continue  # open what is now in place (ours or a racer's)
        except OSError as e:
            raise _open_error(path, e) from None
        try:
            links = os.fstat(fd).st_nlink
            if links == 0 or (links == 2 and attempt < _LINKED_RETRIES - 1):
                # 0: deleted since we opened it, look again; 2: most likely a creator
                # between linking its named temporary and removing it.
                os.close(fd)
                time.sleep(0.01 if links else 0)
                continue
            geo = _validate(fd, path)
            _take_open_lock(fd, path, exclusive, wait)
            if _replaced(fd, path):  # by a resize while we waited for the lock: open the new file
                os.close(fd)
                continue
            _back(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if create:  # an opener that may not create asks for no geometry
            _note_geometry(path, geo, page_size, num_pages)
        return fd, geo
    raise StorePathError(f"{path} keeps disappearing while being opened; is something deleting it?")


def _take_open_lock(fd: int, path: str, exclusive: bool, wait: float) -> None:
    """Hold the open lock on ``fd`` (module docstring), polling up to ``wait`` seconds."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno == errno.ENOLCK and not exclusive:
                return  # no flock on this file system: nothing to share, resize refuses instead
            raise
        if time.monotonic() >= deadline:
            raise _lock_busy(fd, path, exclusive, wait)
        time.sleep(_OPEN_LOCK_POLL)


def _replaced(fd: int, path: str) -> bool:
    """Whether ``path`` no longer names the file open on ``fd``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return True
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)


def holders(fd: int) -> list[int]:
    """The other processes with a descriptor of the file open on ``fd`` (those this
    user may look at in /proc), by pid."""
    mine = os.fstat(fd)
    found: set[int] = set()
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's
        for n in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{n}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                found.add(int(pid))
                break
    return sorted(found)


def _lock_busy(fd: int, path: str, exclusive: bool, wait: float) -> LockTimeoutError:
    pids = holders(fd)
    who = (f"pid {', '.join(map(str, pids[:10]))}{' ...' if len(pids) > 10 else ''}" if pids
           else "this process or one this user cannot see")
    if exclusive:
        return LockTimeoutError(
            f"{path} is open in {who}, and stayed open for {wait:g}s; replacing it now would lose "
            "what they write. Stop every process that uses it (the application's workers, and a "
            "gunicorn master that loads the app with preload_app), then try again."
        )
    return LockTimeoutError(
        f"{path} is held alone by {who} (a `prefork-sessions resize` replacing it) for more than "
        f"{wait:g}s; try again when that finishes, or raise lock_timeout."
    )


def temporary_path(path: str) -> str:
    """A new name beside ``path`` for a file that will replace it (``resize``), of the
    form that ``remove_stale_temporaries`` removes once its maker is dead."""
    return os.path.join(os.path.dirname(path), _temporary_name(os.path.basename(path)))


def _temporary_name(name: str) -> str:
    """``.<name>.<pid>.<token>.tmp``: the form ``_remove_stale_temporaries`` knows."""
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def remove_stale_temporaries(path: str) -> None:
    """Remove what makers of a file for ``path`` left behind when they died (as
    creation does before it builds a file)."""
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # opening the file itself reports what is wrong with its directory
    try:
        _remove_stale_temporaries(dfd, os.path.basename(path))
    finally:
        os.close(dfd)


def _no_store(path: str) -> StorePathError:
    return StorePathError(
        f"there is no store file at {path}; nothing was created. Check the path (a store file "
        "is created by MmapStore(path) with create=True, the default)."
    )


# ---------------------------------------------------------------------- refusals


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user(uid: int) -> str:
    return f"{_login(uid)} (uid {uid})"


def _per_user_path(path: str) -> str:
    """A path for this user alone: in its runtime directory when it has one."""
    run = os.environ.get("XDG_RUNTIME_DIR", "")
    try:
        if run and os.stat(run).st_uid == os.geteuid():
            return os.path.join(run, os.path.basename(path))
    except OSError:
        pass
    return f"{path}.{_login(os.geteuid())}"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: str, mode: int) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} is {_kind(mode)}, not a regular file; it was left untouched. "
        f"Point the store at a file path (e.g. {os.path.join(path, 'sessions')!r} inside a directory)."
    )


def _foreign(path: str, uid: int) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} belongs to {_user(uid)}, not to this process's user {_user(os.geteuid())}; "
        "another user could read or forge sessions, so each user needs a file of its own. "
        f"Use a per-user path, e.g. MmapStore({_per_user_path(path)!r}), or run as that user."
    )


def _open_error(path: str, e: OSError) -> OSError:
    """Our typed error for an ``os.open`` of the store path that failed (or ``e`` itself)."""
    if e.errno == errno.ELOOP:
        return UnsafeFileError(
            f"{path} is a symbolic link; the store never follows links. "
            "Remove the link or point the store at a real path."
        )
    if e.errno in (errno.EISDIR, errno.ENXIO):  # a directory; a socket (or a device without driver)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return e
        return e if stat.S_ISREG(mode) else _not_regular(path, mode)
    if e.errno == errno.ENOTDIR:
        return _missing_directory(path)
    if e.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.lstat(path)
        except OSError:
            return _unreachable(path)
        if st.st_uid != os.geteuid():
            return _foreign(path, st.st_uid)
        return UnsafeFileError(
            f"{path} cannot be opened for writing by its owner {_user(st.st_uid)} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 640` on it (and `chattr -i` if it is immutable)."
        )
    return e


def _unreachable(path: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} cannot be reached by {_user(os.geteuid())}: a directory on the way denies it "
        "(no search permission). Make the directory accessible to this user, "
        f"or use a per-user path, e.g. MmapStore({_per_user_path(path)!r})."
    )


def _missing_directory(path: str) -> StorePathError:
    directory = os.path.dirname(os.path.abspath(path))
    missing = directory
    while not os.path.isdir(os.path.dirname(missing)) and os.path.dirname(missing) != missing:
        missing = os.path.dirname(missing)
    what = "does not exist" if not os.path.lexists(missing) else "is not a directory"
    return StorePathError(
        f"the directory {directory} for the store file {os.path.basename(path)!r} does not exist "
        f"({missing} {what}); nothing was created. Create it (mkdir -p {directory}) "
        "or choose a path in an existing directory."
    )


def _mount_point(path: str) -> str:
    """The mount point of the file system holding ``path`` (a directory)."""
    path = os.path.realpath(path)
    dev = os.stat(path).st_dev
    while path != "/":
        parent = os.path.dirname(path)
        if os.stat(parent).st_dev != dev:
            break
        path = parent
    return path


def _no_room(path: str, directory: str, needed: int, free: int, what: str) -> NoSpaceError:
    return NoSpaceError(
        f"{what} {path} needs {needed} bytes but the file system at {_mount_point(directory)} has "
        f"{free} bytes free; free {max(needed - free, 0)} bytes on {_mount_point(directory)} or "
        "choose a smaller cache_size."
    )


def _free(fd: int) -> int:
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


# ---------------------------------------------------------------------- creation


def _create(path: str, page_size: int, num_pages: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise _missing_directory(path) from None
    except PermissionError:
        raise _unreachable(path) from None
    try:
        _remove_stale_temporaries(dfd, name)  # first: a dead creator's temporary holds space
        size = L.file_size(page_size, num_pages)
        if _free(dfd) < size:
            raise _no_room(path, directory, size, _free(dfd), "creating the store file")
        fd, tmp = _new_file(dfd, path, name)
        try:
            _build(fd, path, directory, page_size, num_pages, size)
            try:
                if tmp is None:
                    os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=dfd, dst_dir_fd=dfd)
                else:
                    os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                pass  # a racer created it first: both of us now open the same file
        finally:
            os.close(fd)
            if tmp is not None:
                os.unlink(tmp, dir_fd=dfd)
    finally:
        os.close(dfd)


def _new_file(dfd: int, path: str, name: str) -> tuple[int, str | None]:
    """A new, empty, private file in the directory: (fd, temporary name or None if unnamed)."""
    try:
        if _O_TMPFILE and os.path.isdir("/proc/self/fd"):
            try:
                return os.open(".", _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dfd), None
            except OSError as e:
                if e.errno not in _NO_TMPFILE:
                    raise
        tmp = _temporary_name(name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(tmp, flags, 0o600, dir_fd=dfd), tmp
    except PermissionError:
        raise UnsafeFileError(
            f"{_user(os.geteuid())} may not create files in {os.path.dirname(os.path.abspath(path))}, "
            f"so the store file {path} cannot be created. Make the directory writable for this user, "
            f"or use a per-user path, e.g. MmapStore({_per_user_path(path)!r})."
        ) from None
    except OSError as e:
        if e.errno in _NO_ROOM:
            directory = os.path.dirname(os.path.abspath(path))
            raise NoSpaceError(
                f"no room for a new file in {directory} (the file system at {_mount_point(directory)} "
                f"has no free inodes or blocks), so the store file {path} cannot be created; "
                "free space there or choose another path."
            ) from None
        raise


def _remove_stale_temporaries(dfd: int, name: str) -> None:
    """Remove ``.<name>.<pid>.<token>.tmp`` files of ours whose creator is dead (killed mid-build)."""
    prefix = f".{name}."
    try:
        entries = os.listdir(dfd)
    except PermissionError:
        return  # a directory we may search and write but not list: nothing we can find
    for entry in entries:
        parts = entry[len(prefix):].split(".")
        if not (entry.startswith(prefix) and len(parts) == 3 and parts[2] == "tmp" and parts[0].isdigit()):
            continue
        try:
            os.kill(int(parts[0]), 0)
            continue  # its creator is alive (or the pid was reused: left for a later creator)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a live process of another user
        try:
            st = os.lstat(entry, dir_fd=dfd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(entry, dir_fd=dfd)
        except FileNotFoundError:
            pass  # another creator removed it first


def _build(fd: int, path: str, directory: str, page_size: int, num_pages: int, size: int) -> None:
    os.fchmod(fd, FILE_MODE)
    free = _free(fd)  # before allocating: a failed fallocate may hold what it got until close
    err = _fallocate(fd, size)
    if err in _NO_ROOM:
        raise _no_room(path, directory, size, free, "creating the store file")
    # Write every byte as well, 4 KiB at a time: the page cache then holds small
    # folios, and the write-protect fault a disk filesystem takes on the first
    # store into each page costs a fraction of what it costs on a large folio
    # (measured on ext4: a 1 KiB insert took 20-31 us on a file written in 1 MiB
    # chunks, 10-11 us in 4 KiB chunks).  Where fallocate is unsupported, these
    # writes allocate the blocks (this file is still private, so that is safe).
    zeros = bytes(4096)
    try:
        for at in range(0, size, len(zeros)):
            os.pwrite(fd, zeros[:size - at], at)
        slots = L.slots_for(page_size)
        header = L.pack_header(page_size, num_pages, slots, secrets.randbits(32), secrets.randbits(64), time.time(),
                               _locks.protocol())
        os.pwrite(fd, header, 0)
        page_header = L.empty_page_header(slots, _locks.template())
        for page in range(L.SPARE_LOCK, num_pages):
            os.pwrite(fd, page_header, L.page_offset(page_size, page))
    except OSError as e:
        if e.errno in _NO_ROOM:
            raise _no_room(path, directory, size, free, "creating the store file") from None
        raise


# ---------------------------------------------------------------------- opening


def _fallocate(fd: int, size: int) -> int:
    """Allocate every block of [0, size) (contents unchanged); 0 or the errno."""
    if _libc_fallocate is None:
        return errno.EOPNOTSUPP
    while _libc_fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return err
    return 0


def _first_hole(fd: int, size: int) -> int:
    """Offset of the first hole, ``size`` if none (or if the file system cannot tell)."""
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:
        return size


def _back(fd: int, path: str) -> None:
    """Make sure every page of the file has a block behind it, or refuse the file."""
    st = os.fstat(fd)
    if _first_hole(fd, st.st_size) >= st.st_size:
        return
    directory = os.path.dirname(os.path.abspath(path))
    missing = max(st.st_size - st.st_blocks * 512, 0)
    free = _free(fd)
    # Checked first so that a file too big for the disk does not take its last free
    # blocks (what fallocate allocates before it fails stays allocated).
    err = errno.ENOSPC if missing > free else _fallocate(fd, st.st_size)
    if err == 0:
        return
    if err in _NO_ROOM:
        raise NoSpaceError(
            f"{path} is sparse: about {missing} of its {st.st_size} bytes have no disk blocks, and the "
            f"file system at {_mount_point(directory)} has {free} bytes free; a store into a hole "
            f"would crash the process (SIGBUS). Free {missing} bytes on {_mount_point(directory)}, "
            "or delete the file and choose a smaller cache_size."
        )
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise FileFormatError(
            f"{path} is sparse (a copy made with holes, e.g. by `cp --sparse=always`, `rsync -S` or a "
            f"restore), and the file system at {_mount_point(directory)} cannot allocate the holes; a "
            "store into one could crash the process (SIGBUS) when the disk is full. It was left "
            "untouched. While no process uses it, replace it with a full copy "
            f"(`cp --sparse=never {path} {path}.full && mv {path}.full {path}`), or delete it."
        )
    raise OSError(err, f"cannot allocate the blocks of the store file: {os.strerror(err)}", path)


def _validate(fd: int, path: str) -> Geometry:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    if st.st_uid != os.geteuid():
        raise _foreign(path, st.st_uid)
    if st.st_mode & 0o022:
        raise UnsafeFileError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "anyone could forge sessions. Run `chmod 640` on it or delete it."
        )
    if st.st_nlink != 1:
        raise UnsafeFileError(
            f"{path} has {st.st_nlink} hard links; through another name it could be read, changed or "
            "kept after deletion. Remove the other links (`find / -samefile` lists them) or delete it."
        )
    raw = os.pread(fd, L.OFF_HEADER_CRC + L.U32.size, 0)
    if len(raw) < L.OFF_HEADER_CRC + L.U32.size or raw[:len(L.MAGIC)] != L.MAGIC:
        raise FileFormatError(
            f"{path} is not a prefork_sessions store file (bad magic); it was left untouched. "
            "Delete it or choose another path."
        )
    _, version, header_size, page_size, num_pages, slots, seed, _, _, locking = L.HEADER.unpack_from(raw)
    if version != L.VERSION or header_size != L.HEADER_SIZE:
        raise FileFormatError(
            f"{path} has store format version {version}; this prefork_sessions reads version "
            f"{L.VERSION}. Delete the file (sessions will be lost) or use a matching version."
        )
    if crc32(raw[:L.OFF_HEADER_CRC]) != L.U32.unpack_from(raw, L.OFF_HEADER_CRC)[0]:
        raise FileFormatError(
            f"{path}: its header (geometry and hash seed) fails its checksum, so the file was "
            "damaged from outside; it was left untouched. Restore it from a backup, or delete it "
            "(sessions will be lost)."
        )
    if locking.rstrip(b"\0") != _locks.protocol():
        theirs = locking.rstrip(b"\0").decode(errors="replace")
        raise FileFormatError(
            f"{path} was made by a process that locks pages as {theirs!r}; this one locks them as "
            f"{_locks.protocol().decode()!r}, and every process on one file must lock alike "
            "(same C library and architecture). Use the file from matching machines only, or give "
            "this one its own path; it was left untouched."
        )
    sane = (
        L.MIN_PAGE_SIZE <= page_size <= L.MAX_PAGE_SIZE and num_pages >= 1
        and slots >= L.MIN_SLOTS and L.data_start(slots) + L.ENTRY_SIZE < page_size
    )
    if not sane or st.st_size != L.file_size(page_size, num_pages):
        raise FileFormatError(
            f"{path} is {st.st_size} bytes but its header describes {num_pages} pages of "
            f"{page_size} bytes; the file is damaged or truncated and was left untouched. "
            "Delete it (sessions will be lost)."
        )
    return Geometry(page_size, num_pages, slots, seed)


def _note_geometry(path: str, geo: Geometry, page_size: int, num_pages: int) -> None:
    """Log (once per process and file) that an existing file has less room or another
    page size than asked for: its own geometry is used, as every process must agree.

    A log record, not ``warnings.warn``: this is a deployment condition for the
    operator (gunicorn and most apps route logging), not a bug in the calling code,
    and it must not become an exception where warnings are errors (pytest
    ``filterwarnings = error``, ``python -W error``)."""
    have, want = geo.page_size * geo.num_pages, page_size * num_pages
    if want <= have and page_size == geo.page_size:
        return
    seen = (path, geo.page_size, geo.num_pages, page_size, num_pages)
    if seen in _warned:
        return
    _warned.add(seen)
    log.warning(
        "%s holds %d pages of %d bytes (cache_size %d); cache_size=%d, page_size=%d was asked for and "
        "not applied, because an existing file keeps its geometry. To change it, stop every process "
        "using the file, delete it (its sessions are lost) and start again: it is recreated at the "
        "size asked for.",
        path, geo.num_pages, geo.page_size, have, want, page_size,
    )
