"""Argument checks shared by both stores: keys, lifetimes, timeouts and sizes.

Each check either returns the argument in the one form the store uses or raises
an error of our tree naming the argument, the limit and the fix, before anything
is stored or changed.  Both stores call the same functions, so a key or an
``expire`` that one store refuses the other refuses too, with the same error.
"""

from __future__ import annotations

import math
import numbers

from ._errors import InvalidArgumentError, ValueTooLargeError

__all__ = ["MAX_KEY_SIZE", "MAX_LIFETIME", "MAX_TIMEOUT", "key_bytes", "lifetime", "size", "timeout"]

MAX_KEY_SIZE = 0xFFFF
"""Longest key in bytes (UTF-8 for a str): the entry header's key length is 16 bits."""
MAX_LIFETIME = 100 * 365.25 * 86400.0
"""Longest finite ``expire``: 100 years.  Longer is a mistake, not a plan (0 means never),
and it keeps ``time.time() + expire`` an exact, ordinary timestamp in every entry."""
MAX_TIMEOUT = 86400.0
"""Longest wait a timeout may ask for: one day.  A lock held longer is a hang to report,
and the lock primitives overflow long before infinity."""


def key_bytes(key: object) -> tuple[bytes, bool]:
    """``(key as bytes, was a str)`` for a str (any subclass, UTF-8) or bytes-like key.

    Raises InvalidArgumentError for another type or a str that UTF-8 cannot
    encode (a lone surrogate), ValueTooLargeError above MAX_KEY_SIZE bytes.
    """
    if isinstance(key, str):
        try:
            kb = str.encode(key)  # str's own encode: a subclass may not override how keys are made
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(
                f"key {key[:40]!r} cannot be encoded as UTF-8 ({e.reason} at position {e.start}); "
                "keys are text or bytes: decode input with errors='replace', or pass bytes"
            ) from None
        was_str = True
    elif isinstance(key, (bytes, bytearray, memoryview)):
        kb, was_str = bytes(key), False
    else:
        raise InvalidArgumentError(f"keys are str or bytes, not {type(key).__name__}")
    if len(kb) > MAX_KEY_SIZE:
        raise ValueTooLargeError(
            f"key of {len(kb)} bytes is longer than the limit of {MAX_KEY_SIZE} bytes; "
            "use a shorter key (a hash of a long one)"
        )
    return kb, was_str


def _real(value: object, name: str, unit: str) -> float:
    """A real number (not a bool, not a string) as a float; InvalidArgumentError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name}={value!r}: give a number of {unit}, not {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise InvalidArgumentError(f"{name}={value!r} is too large for a number of {unit}") from None


def lifetime(expire: object) -> float:
    """Seconds an entry lives (0.0: never) from an ``expire`` argument.

    None, 0 and ``math.inf`` mean never (callers substitute their default for
    None first).  Raises InvalidArgumentError for a bool, a string, NaN, a
    negative number, or more than MAX_LIFETIME (100 years).
    """
    if expire is None:
        return 0.0
    if type(expire) is float and 0 < expire <= MAX_LIFETIME:
        return expire  # the common case, without the checks' isinstance against an ABC
    life = _real(expire, "expire", "seconds")
    if life == 0 or life == math.inf:
        return 0.0
    if not life > 0:  # also NaN
        raise InvalidArgumentError(
            f"expire={expire!r}: use a positive number of seconds, or 0/NEVER for no expiry"
        )
    if life > MAX_LIFETIME:
        raise InvalidArgumentError(
            f"expire={expire!r} is more than 100 years ({MAX_LIFETIME:.0f} s); "
            "use 0/NEVER for an entry that never expires"
        )
    return life


def timeout(value: object, name: str) -> float:
    """A wait bound in seconds: positive, finite, at most MAX_TIMEOUT (one day).

    Raises InvalidArgumentError otherwise (``math.inf`` too: a wait without end
    would hide a stuck lock holder instead of reporting it).
    """
    seconds = _real(value, name, "seconds")
    if not 0 < seconds <= MAX_TIMEOUT:
        raise InvalidArgumentError(
            f"{name}={value!r}: use a positive number of seconds up to {MAX_TIMEOUT:.0f} (one day)"
        )
    return seconds


def size(value: object, name: str) -> int:
    """A size in bytes: a positive int (not a bool, float or string).

    Raises InvalidArgumentError otherwise; range checks that depend on other
    settings stay with the caller.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(
            f"{name}={value!r}: give a whole number of bytes (an int), not {type(value).__name__}"
        )
    n = int(value)
    if n <= 0:
        raise InvalidArgumentError(f"{name}={value!r}: give a positive number of bytes")
    return n
