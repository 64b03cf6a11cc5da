"""prefork_sessions: a shared, crash-safe session store for prefork web servers."""

from ._errors import (
    FileFormatError,
    LockTimeoutError,
    ReentrantCallError,
    SerializationError,
    SessionStoreError,
    StoreClosedError,
    UnsafeFileError,
    ValueTooLargeError,
)
from ._store import NEVER, MmapStore

__all__ = [
    "MmapStore",
    "NEVER",
    "SessionStoreError",
    "FileFormatError",
    "LockTimeoutError",
    "ReentrantCallError",
    "SerializationError",
    "StoreClosedError",
    "UnsafeFileError",
    "ValueTooLargeError",
]
