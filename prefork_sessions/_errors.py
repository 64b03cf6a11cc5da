"""One error tree for the whole package, rooted at :class:`SessionStoreError`.

Each subclass also inherits the builtin that fits, so callers can catch either
(``except ValueError`` keeps working for a value too large for a page).
Messages name the path or the limit and say how to fix the problem.
"""

from __future__ import annotations


class SessionStoreError(Exception):
    """Root of every error raised by prefork_sessions."""


class UnsafeFileError(SessionStoreError, PermissionError):
    """The store file is a symlink, a directory, socket or other non-regular file,
    has more than one hard link, is owned by another user (or this user may not
    open or create it there), or is writable by group or others; it was left
    untouched."""


class StorePathError(SessionStoreError, FileNotFoundError):
    """The directory that should hold the store file does not exist (or is not a
    directory), or the file keeps vanishing while being opened; nothing was created."""


class FileFormatError(SessionStoreError, OSError):
    """The file at the store's path is not a store file this version can use
    (wrong magic, format version or size); it was left untouched."""


class ValueTooLargeError(SessionStoreError, ValueError):
    """A key or value cannot fit in one page; the key's old value is kept."""


class SerializationError(SessionStoreError, TypeError, ValueError):
    """A value could not be serialised (or a stored value deserialised)."""


class LockTimeoutError(SessionStoreError, TimeoutError):
    """A lock (a page's; on Redis, a key's) was not acquired within the store's ``lock_timeout``."""


class ReentrantCallError(SessionStoreError, RuntimeError):
    """The store was called from inside a ``get_and_set`` callback."""


class StoreClosedError(SessionStoreError, ValueError):
    """The store was used after :meth:`MmapStore.close`."""


class InvalidArgumentError(SessionStoreError, TypeError, ValueError):
    """An argument of the wrong type or out of range (a key, an ``expire``, a size,
    a timeout); nothing was stored or changed."""


class NoSpaceError(SessionStoreError, OSError):
    """The file system has no room for the store file (or for the blocks behind
    a sparse one); nothing was created, and an existing file's contents were
    left as they were."""


class UnsupportedPlatformError(SessionStoreError, OSError):
    """This platform cannot speak the store's lock protocol (robust process-shared
    pthread mutexes, Linux)."""


class StoreUnavailableError(SessionStoreError, ConnectionError):
    """The store's server (Redis) did not answer, refused the connection or went away;
    nothing was changed by the call.  Web front ends answer 503 with Retry-After."""
