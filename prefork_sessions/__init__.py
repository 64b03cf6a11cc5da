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
from ._session import Session, SessionOptions
from ._store import NEVER, MmapStore
from ._wsgi import SessionMiddleware, SessionRequest, with_session

__all__ = [
    "MmapStore",
    "NEVER",
    "Session",
    "SessionMiddleware",
    "SessionOptions",
    "SessionRequest",
    "with_session",
    "SessionStoreError",
    "FileFormatError",
    "LockTimeoutError",
    "ReentrantCallError",
    "SerializationError",
    "StoreClosedError",
    "UnsafeFileError",
    "ValueTooLargeError",
]
