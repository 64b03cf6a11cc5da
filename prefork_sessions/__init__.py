"""prefork_sessions: a shared, crash-safe session store for prefork web servers."""

from ._base import MmapStats, RedisStats, StoreBase, StoreStats
from ._errors import (
    FileFormatError,
    InvalidArgumentError,
    LockTimeoutError,
    NoSpaceError,
    ReentrantCallError,
    SerializationError,
    SessionStoreError,
    StoreClosedError,
    StorePathError,
    StoreUnavailableError,
    UnsafeFileError,
    UnsupportedPlatformError,
    ValueTooLargeError,
)
from ._pager import ACCELERATED
from ._redis import RedisStore
from ._session import Session, SessionOptions
from ._store import NEVER, MmapStore
from ._wsgi import SessionMiddleware, SessionRequest, with_session

__all__ = [
    "ACCELERATED",
    "NEVER",
    "FileFormatError",
    "InvalidArgumentError",
    "LockTimeoutError",
    "MmapStats",
    "MmapStore",
    "NoSpaceError",
    "RedisStats",
    "RedisStore",
    "ReentrantCallError",
    "SerializationError",
    "Session",
    "SessionMiddleware",
    "SessionOptions",
    "SessionRequest",
    "SessionStoreError",
    "StoreBase",
    "StoreClosedError",
    "StorePathError",
    "StoreStats",
    "StoreUnavailableError",
    "UnsafeFileError",
    "UnsupportedPlatformError",
    "ValueTooLargeError",
    "with_session",
]
