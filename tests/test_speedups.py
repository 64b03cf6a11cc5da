"""The C pager's own pieces against the reference: its checksum and its constants."""

from __future__ import annotations

import random
import zlib

from prefork_sessions import _layout as L
from prefork_sessions import _locks, _pager
from prefork_sessions import _speedups as speedups  # built for every run, PREFORK_SESSIONS_PURE=1 too


def test_crc32_equals_zlib_on_every_length_alignment_and_start_value() -> None:
    """The folded crc32 (PCLMULQDQ where the CPU has it) is zlib.crc32, bit for bit:
    every length up to 4 KiB (the fold takes 64 bytes and more, in 16-byte blocks,
    and leaves a tail), at every alignment, from zero and from running values."""
    rnd = random.Random(7)
    data = rnd.randbytes(4096 + 64)
    for n in range(4097):
        at = rnd.randrange(16)
        start = 0 if n % 2 else rnd.getrandbits(32)
        chunk = data[at:at + n]
        assert speedups.crc32(chunk, start) == zlib.crc32(chunk, start), (n, at, start)
    big = rnd.randbytes(1 << 20)
    assert speedups.crc32(big) == zlib.crc32(big)
    assert speedups.crc32(memoryview(big)[3:-5]) == zlib.crc32(big[3:-5])


def test_the_c_pager_compiles_in_the_reference_constants() -> None:
    """One definition of the format and the protocol: the C pager exports what it
    compiled in and it equals _layout, _locks and _pager."""
    assert speedups.LAYOUT == {name: getattr(L, name) for name in speedups.LAYOUT}
    assert len(speedups.LAYOUT) >= 30
    assert speedups.LOCKED == {state.name: state.value for state in _locks.Locked}
    assert speedups.TUNING == {
        "HOLDER_CHECK_AFTER": _locks.HOLDER_CHECK_AFTER,
        "INSERT_BACKOFF": _pager.INSERT_BACKOFF,
        "READ_TRIES": _pager.READ_TRIES,
        "MAX_BACKOFFS": _pager.MAX_BACKOFFS,
    }


def test_has_non_finite_agrees_with_the_reference_on_random_values() -> None:
    """The C walk behind the JSON serializer's NaN check answers as the Python one on
    nested dicts, lists, tuples and enums, with and without a non-finite float."""
    import enum

    from prefork_sessions import _serializers

    class Rate(enum.Enum):
        NONE = float("nan")
        ONE = 1.0

    rnd = random.Random(3)
    leaves = [None, True, 0, 1.5, "x", float("nan"), float("inf"), -float("inf"), Rate.NONE, Rate.ONE]

    def value(depth: int) -> object:
        kind = rnd.randrange(4) if depth < 4 else 3
        if kind == 0:
            return {rnd.choice(["a", "b", 1, 2.5, float("nan")]): value(depth + 1) for _ in range(rnd.randrange(4))}
        if kind == 1:
            return [value(depth + 1) for _ in range(rnd.randrange(4))]
        if kind == 2:
            return tuple(value(depth + 1) for _ in range(rnd.randrange(3)))
        return rnd.choice(leaves)

    seen = set()
    for _ in range(3000):
        v = value(0)
        want = _serializers._has_non_finite(v)
        seen.add(want)
        assert speedups.has_non_finite(v, enum.Enum) is want, v
    assert seen == {True, False}
