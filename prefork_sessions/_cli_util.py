"""What the command line's modules share (``_cli``): exit statuses, the one error
they raise, opening a file, keys in and out."""

from __future__ import annotations

import os
import sys
from typing import Any

from ._store import MmapStore

PROG = "prefork-sessions"
OK, NO, FAILED, INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A refusal of the command line itself: the message is the one line printed."""

    def __init__(self, message: str, status: int = FAILED) -> None:
        super().__init__(message)
        self.status = status


def open_store(path: str, **options: Any) -> MmapStore:
    """The existing store file at ``path``, never creating one, its bytes as stored
    (``_cli``'s docstring says why)."""
    return MmapStore(path, serializer="raw", create=False, **options)


def key_arg(text: str, hex_key: bool) -> bytes:
    """A KEY argument as the key's bytes (UTF-8, or hex with ``--hex``)."""
    if not hex_key:
        return os.fsencode(text)  # as the shell passed it, even bytes that are not UTF-8
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CommandError(f"--hex: {text!r} is not hexadecimal (two digits a byte, e.g. 6b6579 for 'key')") from None


def shown_key(key: str | bytes) -> str:
    """A key for a line of output: printable UTF-8 text as it is (a key is its bytes:
    ``get`` finds a bytes key by the same text), anything else as its repr."""
    text = as_text(key) if isinstance(key, bytes) else key
    if isinstance(text, str) and text.isprintable() and text:
        return text
    return repr(key)


def out(line: str = "") -> None:
    """A line of the result, on stdout."""
    print(line, file=sys.stdout)


def note(line: str) -> None:
    """A line about the work (a summary, a warning), on stderr."""
    print(line, file=sys.stderr)


def as_text(kb: bytes) -> str | bytes:
    """A key's bytes as the str they spell in UTF-8, or the bytes when they spell none."""
    try:
        return kb.decode()
    except UnicodeDecodeError:
        return kb
