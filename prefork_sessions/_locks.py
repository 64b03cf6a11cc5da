"""The page locks: a process-shared robust pthread mutex in every page's header.

Protocol
========
Each page header (and the spare page's) starts with a ``pthread_mutex_t``
(``_layout.OFF_LOCK``, ``LOCK_SIZE`` bytes reserved) initialised once, when the
file is built, as process-shared, robust and error-checking (``template()``).
Every process that maps the file locks pages with ``pthread_mutex_*`` on those
bytes, the C pager directly and the reference pager through ctypes; the file's
header records the protocol (``protocol()``) and a file made under another one
is refused on open.

* Free lock: one atomic instruction to take and one to give back, no syscall.
  A busy lock is waited for in the kernel (a futex) and the release wakes the
  waiter; ``pthread_mutex_clocklock`` on CLOCK_MONOTONIC bounds the wait.
* Threads: the owner is a thread, so threads of one process exclude each other
  through the same lock; a thread that locks a page it holds gets EDEADLK, not
  a hang.
* A holder that dies (SIGKILL included) is on the kernel's robust list: the
  kernel marks the lock owner-died and wakes a waiter, whose lock call returns
  EOWNERDEAD.  That locker marks the lock consistent at once and then goes by
  the page's ``seq`` exactly as before (odd: repair the page; ``_layout``
  invariant 1).  A kill anywhere, even between the two steps, leaves a lock
  that the next locker takes.
* A damaged lock (bytes changed from outside, not by a holder): its type word
  differs from the template's (``fixed_words``) or the mutex call refuses it
  (``WEDGED``), or it stays busy with a holder that cannot be one, a
  thread id that does not exist or a process that does not map the file
  (``holder_alive``, looked at once a wait passes ``HOLDER_CHECK_AFTER``).
  ``reset()`` rewrites it from the template, serialised among resetters by an
  open-file-description lock on the lock's first byte, wakes every waiter, and
  the page's seq then decides on repair as for any lock.  A live holder that
  does not let go (stopped, or in a slow ``get_and_set`` callback) is waited
  for up to ``lock_timeout``: LockTimeoutError.

Lock order (rules out deadlock): a key's two pages by page index, then the spare
page last; no other lock is ever held while taking one (``_layout`` invariant 6).

Limits
======
Linux only (robust futexes).  Every process using one file must share a PID
namespace: a lock records its owner's thread id, so processes in two containers
that share a file through a volume would misjudge each other's liveness.  Local
file systems only (tmpfs, ext4, xfs, btrfs): on NFS or SMB each machine has its
own page cache and its own futexes, so neither the data nor the locks are
shared.  Every process on a file needs the same C library (recorded in the
protocol).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import platform
import struct
import sys
import threading
import time
from enum import IntEnum
from typing import Self

from . import _layout as L
from ._errors import UnsupportedPlatformError


class Locked(IntEnum):
    """What taking a page lock came to (both pagers return these values)."""

    SOUND = 0  # held; the page's seq is even
    DIRTY = 1  # held; seq is odd: its last writer died mid-change, repair before use
    TIMEOUT = 2  # not held: a live thread kept it for the whole timeout
    WEDGED = 3  # not held: the lock itself is damaged; reset() it, then lock again


FUTEX_TID_MASK = 0x3FFFFFFF  # the owner's thread id in the lock word (Linux futex ABI)
FUTEX_OWNER_DIED = 0x40000000
_FUTEX_WAKE = 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98, "i686": 240, "i386": 240, "armv7l": 240,
              "ppc64le": 221, "s390x": 238, "riscv64": 98}
_MUTEX_SHARED, _MUTEX_ROBUST, _MUTEX_ERRORCHECK = 1, 1, 2  # PTHREAD_PROCESS_SHARED etc. (glibc, musl)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_FLOCK = struct.Struct("hhqqi")  # struct flock: type, whence, start, len, pid (0 for OFD locks)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library's pthread calls (ctypes releases the GIL around each)."""
    if not sys.platform.startswith("linux"):
        raise UnsupportedPlatformError(
            f"prefork_sessions stores need Linux (robust process-shared mutexes); this is {sys.platform}"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        for name in ("pthread_mutex_trylock", "pthread_mutex_unlock", "pthread_mutex_consistent"):
            getattr(libc, name).argtypes = [ctypes.c_void_p]
        libc.pthread_mutex_clocklock.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)]
        libc.syscall.restype = ctypes.c_long
    except AttributeError as e:
        raise UnsupportedPlatformError(
            f"this C library lacks robust mutexes with a monotonic timed lock ({e}); "
            "prefork_sessions needs glibc >= 2.30"
        ) from None
    return libc


@functools.cache
def protocol() -> bytes:
    """The lock protocol this process speaks, as the file header records it."""
    libc = platform.libc_ver()[0] or "libc"
    return f"pthread-robust/{libc}/{platform.machine()}".encode()[:32]


@functools.cache
def template() -> bytes:
    """An unlocked mutex as ``pthread_mutex_init`` leaves it (process-shared, robust,
    error-checking), ``LOCK_SIZE`` bytes: what every page's lock starts as."""
    libc = _libc()
    attr = ctypes.create_string_buffer(64)  # > sizeof(pthread_mutexattr_t) everywhere
    mutex = ctypes.create_string_buffer(L.LOCK_SIZE)
    calls = (
        (libc.pthread_mutexattr_init, (attr,)),
        (libc.pthread_mutexattr_setpshared, (attr, _MUTEX_SHARED)),
        (libc.pthread_mutexattr_setrobust, (attr, _MUTEX_ROBUST)),
        (libc.pthread_mutexattr_settype, (attr, _MUTEX_ERRORCHECK)),
        (libc.pthread_mutex_init, (mutex, attr)),
    )
    for call, args in calls:
        if call(*args):
            raise UnsupportedPlatformError(
                "this C library cannot make process-shared robust mutexes; prefork_sessions needs them"
            )
    return mutex.raw


@functools.cache
def fixed_words() -> tuple[tuple[int, int], ...]:
    """(index, value) of the 32-bit words of an unlocked mutex that locking never
    changes: those the template has nonzero (the mutex's type: glibc's ``__kind``).
    A lock whose fixed words differ was damaged; both pagers check them first."""
    words = memoryview(template()).cast("I")
    return tuple((i, w) for i, w in enumerate(words) if w)


def holder_alive(word: int, st: os.stat_result) -> bool:
    """Could the thread that ``word`` (a lock word read just now) names hold it?
    Only a live thread that maps this file (``st``: its fstat) can: a thread id
    that is gone, or a process without the file mapped, is damage to the word
    (the kernel marks a lock whose holder died before that holder vanishes)."""
    tid = word & FUTEX_TID_MASK
    if word & FUTEX_OWNER_DIED:
        return False
    try:
        with open(f"/proc/{tid}/maps", "rb") as f:
            maps = f.read()
    except PermissionError:
        return _hidden_holder_may_write(tid, st)
    except OSError:
        return False
    needle = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} {st.st_ino} ".encode()
    return needle in maps


def _hidden_holder_may_write(tid: int, st: os.stat_result) -> bool:
    """A live thread whose mappings this process may not read: could it write the file?
    Root reads every process of its PID namespace, so one hidden from root lives
    outside it (beyond the protocol's reach, see Limits); another uid cannot write a
    0640 file it does not own, unless it is root; a process of our own uid that hides
    its mappings is not dumpable, which no Python worker is."""
    if os.geteuid() == 0:
        return False
    try:
        uid = os.stat(f"/proc/{tid}").st_uid
    except OSError:
        return False
    return uid == 0


HOLDER_CHECK_AFTER = 0.05  # seconds a lock may stay busy before its holder is looked at

_reset_lock = threading.Lock()  # the OFD lock below excludes processes, this the threads of one
os.register_at_fork(after_in_child=lambda: globals().update(_reset_lock=threading.Lock()))


def reset(mm: mmap.mmap, fd: int, off: int) -> None:
    """Rewrite the lock at ``off`` from the template if it is damaged: no live
    holder (``holder_alive``) or refused by the mutex calls; then wake whoever
    waits on it.  Serialised by an OFD lock on the lock's first byte, taken only
    here, so two resetters cannot both rewrite it, and a lock rewritten and taken
    since is left alone."""
    with _reset_lock:
        fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, off, 1, 0))
        try:
            word = L.U32.unpack_from(mm, off)[0]
            if (word and not holder_alive(word, os.fstat(fd))) or not _works(mm, off):
                mm[off:off + L.LOCK_SIZE] = template()
                _wake(mm, off)
        finally:
            fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_UNLCK, 0, off, 1, 0))


def recover(mm: mmap.mmap, fd: int, off: int, wedged: bool) -> None:
    """A pager's call when the lock at ``off`` was refused (``wedged``) or stayed busy
    past HOLDER_CHECK_AFTER: reset it unless a live user of the file holds it."""
    word = L.U32.unpack_from(mm, off)[0]  # 0: released meanwhile
    if wedged or word and not holder_alive(word, os.fstat(fd)):
        reset(mm, fd, off)


def _works(mm: mmap.mmap, off: int) -> bool:
    """Does the mutex at ``off`` still work?  Try to take and give it back."""
    with Mutexes(mm) as m:
        r = m.lock(off, 0.0)
        if r == Locked.SOUND:
            m.unlock(off)
        return r != Locked.WEDGED


def _wake(mm: mmap.mmap, off: int) -> None:
    nr = _SYS_FUTEX.get(platform.machine())
    if nr is not None:  # else waiters find the reset lock when their wait times out
        pin = ctypes.c_char.from_buffer(mm, off)
        try:
            _libc().syscall(nr, ctypes.c_void_p(ctypes.addressof(pin)), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)
        finally:
            del pin


class Mutexes:
    """The reference implementation of the page locks, through ctypes: the C pager
    makes the same calls on the same bytes."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._libc = _libc()
        self._pin: ctypes.c_char | None = ctypes.c_char.from_buffer(mm)  # pins the mapping: close() first
        self._base = ctypes.addressof(self._pin)
        self._u32 = memoryview(mm).cast("I")
        self._fixed = fixed_words()

    def close(self) -> None:
        self._u32.release()
        self._pin = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(self, off: int, timeout: float) -> Locked:
        """Take the lock at ``off``: SOUND, TIMEOUT or WEDGED (seq is the caller's)."""
        libc, at, u32 = self._libc, self._base + off, self._u32
        for i, want in self._fixed:
            if u32[(off >> 2) + i] != want:
                return Locked.WEDGED  # its type changed: the calls would misread it
        r = libc.pthread_mutex_trylock(at)
        if r == errno.EBUSY:
            if timeout <= 0:
                return Locked.TIMEOUT
            end = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(timeout * 1e9)
            r = libc.pthread_mutex_clocklock(at, time.CLOCK_MONOTONIC, _Timespec(*divmod(end, 10**9)))
            if r == errno.ETIMEDOUT:
                return Locked.TIMEOUT
        if r == errno.EOWNERDEAD:  # its holder died: the page's seq says what it left
            r = libc.pthread_mutex_consistent(at)
        # anything else (EINVAL, ENOTRECOVERABLE, EDEADLK: this thread never
        # relocks a page, so a lock naming it as holder was damaged) is WEDGED
        return Locked.SOUND if r == 0 else Locked.WEDGED

    def unlock(self, off: int) -> None:
        """Give the lock back.  A refusal (EPERM: not held by this thread) means its
        bytes were changed while held; the next locker finds it WEDGED and resets it."""
        self._libc.pthread_mutex_unlock(self._base + off)


__all__ = ["HOLDER_CHECK_AFTER", "Locked", "Mutexes", "holder_alive", "protocol", "recover", "reset", "template"]
