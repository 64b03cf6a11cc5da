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
from ._redis import RedisStore
from ._session import Session, SessionOptions
from ._store import NEVER, MmapStore
from ._wsgi import SessionMiddleware, SessionRequest, with_session

__all__ = [
    "NEVER",
    "FileFormatError",
    "LockTimeoutError",
    "MmapStore",
    "RedisStore",
    "ReentrantCallError",
    "SerializationError",
    "Session",
    "SessionMiddleware",
    "SessionOptions",
    "SessionRequest",
    "SessionStoreError",
    "StoreClosedError",
    "UnsafeFileError",
    "ValueTooLargeError",
    "with_session",
]
