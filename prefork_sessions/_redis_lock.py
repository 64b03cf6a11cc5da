"""The per-key lock behind RedisStore.get_and_set: wait in line, never retry in a storm.

Theory of operation.  ``fn`` is any Python function, so the update cannot run
inside Redis; instead the caller takes a short lock on the key, runs ``fn`` on
the value the lock came with, and writes the result as it lets go.  Two Lua
scripts do all of it, each one round trip (redis-py's Script: EVALSHA, loading
the script on NOSCRIPT):

- ACQUIRE (data, lock, queue, waiters; token, lease, wait): a free lock (or one
  already handed to this token) is taken with a lease (SET PX) and the reply
  carries the value.  A held one puts the token in line once (queue: a list in
  arrival order; waiters: a sorted set of the tokens in it, scored by the time
  each stops waiting) and answers the holder's remaining lease.
- The waiter then blocks on its own wake list (BLPOP data:w:token) until a
  holder lets go, or the holder's lease runs out, whichever is first.
- RELEASE (same keys; token, mode, digest, value, px, lease): only while the
  lock is still this token's, writes the value (PX, or KEEPTTL with keep_expiry;
  nothing when ``fn`` raised), then pops the first live waiter, hands it the
  lock with a fresh lease and pushes the value onto its wake list (expiring
  with the lease, should nobody pop it).

So an update costs ACQUIRE + RELEASE (2 commands) alone, and ACQUIRE + BLPOP +
RELEASE (3) when it waited: the lock passes from one caller to the next in
FIFO order, with nobody polling.

Rules.
1. The lock holds the caller's token, 12 random bytes per call: only the
   holder's RELEASE writes.  A RELEASE that finds the lock gone (the lease ran
   out while ``fn`` was slow) writes nothing; the caller takes its turn again
   and runs ``fn`` on the value then current.
2. A writer that takes no lock (``set``, ``delete``, expiry) may change the
   value while ``fn`` runs: RELEASE compares the value's SHA-1 with the one
   ``fn`` saw and, if it changed, keeps the lock (fresh lease) and answers the
   new value for ``fn`` to run again.  Same bytes count as unchanged: the
   update is then as if it ran after that write.
3. A holder killed mid-``fn`` blocks the key for at most one lease; a waiter
   that died or gave up is skipped once its wait time passes (or removed at
   once: giving up runs RELEASE in abort mode, which also leaves the line).
4. Each blocking wait is below the client's socket timeout (redis-py raises
   TimeoutError for a BLPOP outlasting it), and the whole call gives up with
   LockTimeoutError after ``lock_timeout``; so a dead server still surfaces as
   an error within the store's bound, and a live one never waits forever.
5. redis-py retries a command once after a dropped connection: RELEASE leaves a
   receipt (data:r:token, for one lease), so a RELEASE resent after it already
   wrote answers "done" instead of "lock lost", and ``fn``'s result is not
   applied twice.  ACQUIRE and BLPOP are safe to resend as they are.
6. Every key a script touches is the data key plus a suffix without ``}``
   (_redis_keys rule 3): one Cluster slot, so the scripts run on a cluster too.
   The wake lists and receipts are named inside the scripts (they depend on
   the token) rather than passed in KEYS; Redis Cluster allows that for keys of
   the script's own slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ._errors import LockTimeoutError

__all__ = ["DEFAULT_LOCK_LEASE", "KeyLock"]

DEFAULT_LOCK_LEASE = 5.0
"""Seconds a lock holder may take before its lock is given to the next caller."""
_WAIT_MARGIN = 0.5  # seconds a waiter stays in line after its BLPOP is due back
_SHORTEST_WAIT = 0.01  # BLPOP's timeout 0 means forever: never ask for it

T = TypeVar("T")

_ACQUIRE = """
local data, lock, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, lease, wait = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local holder = redis.call('GET', lock)
if not holder or holder == token then
  redis.call('SET', lock, token, 'PX', lease)
  if holder then
    redis.call('DEL', data .. ':w:' .. token)
  elseif redis.call('ZREM', waiters, token) == 1 then
    redis.call('LREM', queue, 1, token)
  end
  local value = redis.call('GET', data)
  if value then return {1, 1, value} end
  return {1, 0, ''}
end
local now = redis.call('TIME')
local until_ms = now[1] * 1000 + math.floor(now[2] / 1000) + wait
if redis.call('ZADD', waiters, until_ms, token) == 1 then
  redis.call('RPUSH', queue, token)
end
local keep = wait + lease
if redis.call('PTTL', queue) < keep then
  redis.call('PEXPIRE', queue, keep)
  redis.call('PEXPIRE', waiters, keep)
end
return {0, redis.call('PTTL', lock)}
"""

_RELEASE = """
local data, lock, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, mode, digest = ARGV[1], ARGV[2], ARGV[3]
local px, lease = tonumber(ARGV[5]), tonumber(ARGV[6])
if mode == 'abort' and redis.call('ZREM', waiters, token) == 1 then
  redis.call('LREM', queue, 1, token)
end
if redis.call('GET', lock) ~= token then
  if redis.call('EXISTS', data .. ':r:' .. token) == 1 then return {0} end
  return {1}
end
if mode ~= 'abort' then
  local current = redis.call('GET', data)
  local seen = ''
  if current then seen = redis.sha1hex(current) end
  if seen ~= digest then
    redis.call('PEXPIRE', lock, lease)
    if current then return {2, 1, current} end
    return {2, 0, ''}
  end
  if mode == 'keep' and current then
    redis.call('SET', data, ARGV[4], 'KEEPTTL')
  elseif px > 0 then
    redis.call('SET', data, ARGV[4], 'PX', px)
  else
    redis.call('SET', data, ARGV[4])
  end
  redis.call('SET', data .. ':r:' .. token, '', 'PX', lease)
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
while true do
  local nxt = redis.call('LPOP', queue)
  if not nxt then
    redis.call('DEL', lock)
    return {0}
  end
  local until_ms = redis.call('ZSCORE', waiters, nxt)
  redis.call('ZREM', waiters, nxt)
  if until_ms and tonumber(until_ms) >= now_ms then
    redis.call('SET', lock, nxt, 'PX', lease)
    local value = redis.call('GET', data)
    local wake = data .. ':w:' .. nxt
    if value then redis.call('LPUSH', wake, '+' .. value) else redis.call('LPUSH', wake, '-') end
    redis.call('PEXPIRE', wake, lease)
    return {0}
  end
end
"""

# RELEASE's answers
_DONE, _LOST, _CHANGED = 0, 1, 2


class KeyLock:
    """get_and_set's lock protocol on one client (see the module's rules).

    ``lease`` and ``timeout`` are seconds; ``longest_wait`` bounds each BLPOP
    and must stay below the client's socket timeout.
    """

    def __init__(self, client: Any, *, lease: float, timeout: float, longest_wait: float) -> None:
        import redis

        self._redis_error = redis.RedisError
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._lease_ms = max(1, round(lease * 1000))
        self._timeout = timeout
        self._longest_wait = longest_wait
        self._line_ms = round((longest_wait + _WAIT_MARGIN) * 1000)

    def update(
        self, key: bytes, compute: Callable[[bytes | None], tuple[bytes, T]],
        px: int | None, keep_expiry: bool,
    ) -> T:
        """Run ``compute`` on the raw value at data key ``key`` (None: absent) under
        the key's lock and store the bytes it returns (``px`` ms, None = never; or
        the remaining lifetime with ``keep_expiry``); returns its second item.

        If ``compute`` raises, nothing is stored and the lock is let go.  Raises
        LockTimeoutError after ``timeout`` seconds without a successful update."""
        keys = (key, key + b":lock", key + b":q", key + b":z")
        token = os.urandom(12).hex()
        deadline = time.monotonic() + self._timeout
        raw = self._take(keys, token, deadline)
        mode = "keep" if keep_expiry else "set"
        while True:
            try:
                value, result = compute(raw)
            except BaseException:
                self._let_go(keys, token)
                raise
            digest = "" if raw is None else hashlib.sha1(raw).hexdigest()
            answer = self._release(keys, (token, mode, digest, value, px or 0, self._lease_ms), self._client)
            if answer[0] == _DONE:
                return result
            if time.monotonic() >= deadline:
                self._let_go(keys, token)
                raise LockTimeoutError(
                    f"get_and_set on Redis key {key!r} did not complete within lock_timeout="
                    f"{self._timeout:g}s: its callback outlived the lock's lease "
                    f"({self._lease_ms / 1000:g}s) or the value kept changing under it; make the "
                    "callback faster, or raise lock_lease/lock_timeout"
                )
            if answer[0] == _CHANGED:
                raw = answer[2] if answer[1] else None
            else:  # _LOST: the lease ran out while compute ran; take a turn again
                raw = self._take(keys, token, deadline)

    def _take(self, keys: tuple[bytes, ...], token: str, deadline: float) -> bytes | None:
        """Wait for the lock (in line, FIFO); the value it came with."""
        args = (token, self._lease_ms, self._line_ms)
        while True:
            answer = self._acquire(keys, args, self._client)
            if answer[0] == 1:
                return answer[2] if answer[1] else None
            left = deadline - time.monotonic()
            if left <= 0:
                self._let_go(keys, token)
                raise LockTimeoutError(
                    f"Redis key {keys[0]!r} stayed locked for lock_timeout={self._timeout:g}s; "
                    "other callers' get_and_set callbacks held it all that time (a holder that "
                    f"dies frees it within lock_lease={self._lease_ms / 1000:g}s): raise lock_timeout, "
                    "or make the callbacks faster"
                )
            holder_left = max(answer[1], 0) / 1000 + _SHORTEST_WAIT
            wait = max(min(self._longest_wait, left, holder_left), _SHORTEST_WAIT)
            woken = self._client.blpop([keys[0] + b":w:" + token.encode()], timeout=wait)
            if woken is not None:
                message: bytes = woken[1]
                return message[1:] if message[:1] == b"+" else None

    def _let_go(self, keys: tuple[bytes, ...], token: str) -> None:
        """Leave the line, and let go of the lock if held, storing nothing.  Best
        effort: this runs while another error is on its way up, and an unreachable
        server frees the lock by its lease anyway."""
        with contextlib.suppress(self._redis_error):  # the error on its way up is the one to report
            self._release(keys, (token, "abort", "", b"", 0, self._lease_ms), self._client)
