"""Creating and opening the store file safely.

Creation is atomic: the file is built fully initialised under a temporary name
in the same directory, given mode 0640 with ``fchmod`` (so the umask cannot
change it), then hard-linked into place.  Two processes racing to create it both
end up on the same file: the loser's ``link`` fails and it opens the winner's.
Opening refuses symlinks, non-regular files, files of another owner, files
writable by group or others, and files whose header does not match; such files
are left untouched.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from dataclasses import dataclass

from . import _layout as L
from ._errors import FileFormatError, UnsafeFileError

FILE_MODE = 0o640


@dataclass(frozen=True)
class Geometry:
    """The layout of one store file, as recorded in its header."""

    page_size: int
    num_pages: int
    slots: int
    seed: int


def open_or_create(path: str, page_size: int, num_pages: int) -> tuple[int, Geometry]:
    """Open the store file at ``path``, creating it if missing.

    Returns the descriptor and the file's own geometry (which wins over the
    arguments when the file already exists).  Raises UnsafeFileError or
    FileFormatError for a file that cannot be used.
    """
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            _create(path, page_size, num_pages)
            continue  # open what is now in place (ours or a racer's)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFileError(
                    f"{path} is a symbolic link; the store never follows links. "
                    "Remove the link or point the store at a real path."
                ) from None
            raise
        try:
            return fd, _validate(fd, path)
        except BaseException:
            os.close(fd)
            raise
    raise FileNotFoundError(f"{path} keeps disappearing while being opened; is something deleting it?")


def _create(path: str, page_size: int, num_pages: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, FILE_MODE)
        # Write every byte rather than leave a sparse file, so blocks are allocated
        # now, not on first touch through the mapping (a costly fault on the hot
        # path, and SIGBUS instead of a clean error when the disk is full).  Write it
        # 4 KiB at a time: the page cache then holds small folios, and the
        # write-protect fault a disk filesystem takes on the first store into each
        # page costs a fraction of what it costs on a large folio (measured on ext4:
        # a 1 KiB insert took 20-31 us on a file written in 1 MiB chunks, 10-11 us
        # in 4 KiB chunks).
        size = L.file_size(page_size, num_pages)
        zeros = bytes(4096)
        for at in range(0, size, len(zeros)):
            os.pwrite(fd, zeros[:size - at], at)
        slots = L.slots_for(page_size)
        header = L.HEADER.pack(
            L.MAGIC, L.VERSION, L.HEADER_SIZE, page_size, num_pages, slots,
            secrets.randbits(32), secrets.randbits(64), time.time(),
        )
        os.pwrite(fd, header, 0)
        page_header = L.empty_page_header(slots)
        for page in range(num_pages):
            os.pwrite(fd, page_header, L.page_offset(page_size, page))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # a racer created it first: both of us now open the same file
    finally:
        os.close(fd)
        os.unlink(tmp)


def _validate(fd: int, path: str) -> Geometry:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path} is not a regular file; point the store at a file path.")
    if st.st_uid != os.geteuid():
        raise UnsafeFileError(
            f"{path} is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()}); "
            "another user could read or forge sessions. Use a per-user path, e.g. "
            "MmapStore(f'/run/user/{os.getuid()}/myapp_session_data')."
        )
    if st.st_mode & 0o022:
        raise UnsafeFileError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "anyone could forge sessions. Run `chmod 640` on it or delete it."
        )
    raw = os.pread(fd, L.HEADER.size, 0)
    if len(raw) < L.HEADER.size or raw[:8] != L.MAGIC:
        raise FileFormatError(
            f"{path} is not a prefork_sessions store file (bad magic); it was left untouched. "
            "Delete it or choose another path."
        )
    _, version, header_size, page_size, num_pages, slots, seed, _, _ = L.HEADER.unpack(raw)
    if version != L.VERSION or header_size != L.HEADER_SIZE:
        raise FileFormatError(
            f"{path} has store format version {version}; this prefork_sessions reads version "
            f"{L.VERSION}. Delete the file (sessions will be lost) or use a matching version."
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
