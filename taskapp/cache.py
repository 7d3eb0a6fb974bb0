"""Response cache in Redis (cache-aside), correct after every write in every process.

Every entry key embeds two counters read in the same round trip as the entry:

- a generation per scope (one owner's view, or the admin-wide view), bumped after each
  commit that changes a task of that scope, so later reads build new keys and never see
  what was cached before the write; old entries simply expire;
- a global epoch, bumped when an invalidation could not be delivered (Redis failed right
  after a commit), so nothing cached before a lost invalidation is ever served again.

Redis trouble never fails or slows a request beyond `timeout`: the cache is bypassed for
`retry_interval`, the request is served from the database, and the failure is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from taskapp.config import CacheSettings
from taskapp.observability.metrics import CACHE_ERRORS, CACHE_REQUESTS
from taskapp.ratelimit import GCRA_FUNCTION, RateLimitCheck, RateLimitRefusedError, gcra_arguments
from taskapp.redis_client import REDIS_FAILURES, RedisBreaker

logger = logging.getLogger(__name__)


# One round trip: the epoch, the scope's generation and the entry they address; on a miss,
# also the fill lock for that entry ('locked': ours, load it; 'busy': someone else's).
_LOOKUP_FUNCTION = """
local function lookup()
  local epoch = redis.call('GET', KEYS[1]) or '0'
  local generation = redis.call('GET', KEYS[2]) or '0'
  local key = ARGV[1] .. epoch .. ':' .. generation .. ':' .. ARGV[2]
  local value = redis.call('GET', key)
  if value then return {key, value, false} end
  if redis.call('SET', key .. ':lock', ARGV[3], 'NX', 'PX', ARGV[4]) then
    return {key, false, 'locked'}
  end
  return {key, false, 'busy'}
end
"""
_LOOKUP = _LOOKUP_FUNCTION + "return lookup()"
# The same, after counting the request against its rate-limit bucket (KEYS[3]), so a read
# pays one round trip for both; a refused request looks nothing up.
_CHECKED_LOOKUP = (
    GCRA_FUNCTION
    + _LOOKUP_FUNCTION
    + """
local decision = gcra(KEYS[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
if decision[1] == 0 then return {false, false, false, decision} end
local found = lookup()
found[4] = decision
return found
"""
)
# Store the entry and release the fill lock, if it is still ours.
_STORE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
"""

# Give the fill lock up, if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""

Loader = Callable[[], Awaitable[bytes]]


def _scope_id(scope: str) -> str:
    # Fixed-length and free of separators, whatever characters a subject contains.
    return hashlib.sha256(scope.encode()).hexdigest()[:32]


class ResponseCache:
    """Serialized responses by (scope, key), with single-flight loading on a miss."""

    def __init__(self, redis: Redis, settings: CacheSettings, *, key_prefix: str) -> None:
        self._redis = redis
        self._settings = settings
        self._prefix = f"{key_prefix}cache:"
        self._epoch_key = f"{self._prefix}epoch"
        self._lookup = redis.register_script(_LOOKUP)
        self._checked_lookup = redis.register_script(_CHECKED_LOOKUP)
        self._store = redis.register_script(_STORE)
        self._release = redis.register_script(_RELEASE)
        self._breaker = RedisBreaker(
            logger, "response cache", retry_interval=settings.retry_interval
        )
        self._lost_invalidation = False
        self._repair: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Future[bytes]] = {}

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    async def get_or_load(
        self, scope: str, key: str, load: Loader, *, rate_check: RateLimitCheck | None = None
    ) -> bytes:
        """The cached bytes for `key` in `scope`, or `load()`'s result, cached.

        A `rate_check` not yet settled is settled by the lookup itself (one round trip for
        both); a refused request raises `RateLimitRefusedError` and loads nothing.
        """
        if not self._settings.enabled:
            return await load()
        if not self._available():
            CACHE_REQUESTS.labels("bypass").inc()
            return await load()
        if rate_check is not None and rate_check.settled:
            rate_check = None
        scope_id = _scope_id(scope)
        token = uuid.uuid4().hex  # names this request as the holder of the fill lock
        keys = [self._epoch_key, self._generation_key(scope_id)]
        args: list[Any] = [
            f"{self._prefix}{scope_id}:",
            key,
            token,
            int(self._settings.lock_ttl * 1000),
        ]
        try:
            if rate_check is None:
                found = await self._call("lookup", self._lookup(keys=keys, args=args))
            else:
                found = await self._call(
                    "lookup",
                    self._checked_lookup(
                        keys=[*keys, rate_check.key], args=[*args, *gcra_arguments(rate_check.rate)]
                    ),
                )
        except _Unavailable as exc:
            if rate_check is not None:
                rate_check.record_failure(exc.__cause__)
            CACHE_REQUESTS.labels("bypass").inc()
            return await load()  # a rate check failing closed refuses before the database
        if rate_check is not None:
            rate_check.record(found[3])
            if rate_check.refused:
                raise RateLimitRefusedError
        if found[1] is not None:
            CACHE_REQUESTS.labels("hit").inc()
            return bytes(found[1])
        CACHE_REQUESTS.labels("miss").inc()
        fill = _Fill(found[0].decode(), token, locked=found[2] == b"locked")
        return await self._single_flight(fill, load)

    async def invalidate(self, *scopes: str) -> None:
        """Make every entry of `scopes` unreachable; call after the change is committed."""
        if not self._settings.enabled:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for scope in scopes:
                    pipe.incr(self._generation_key(_scope_id(scope)))
                await self._call("invalidate", pipe.execute())
        except _Unavailable:
            # Entries of these scopes may still be readable by other processes: make sure
            # the whole cache is discarded before anyone serves from it again.
            self._lost_invalidation = True
            self._start_repair()

    async def clear(self) -> None:
        """Discard every entry at once (all processes): for changes made outside the API."""
        await self._redis.incr(self._epoch_key)

    async def aclose(self) -> None:
        if self._repair is not None:
            self._repair.cancel()

    # -- internals ---------------------------------------------------------------------------

    def _generation_key(self, scope_id: str) -> str:
        # No TTL: a generation must outlive every entry made with it.
        return f"{self._prefix}gen:{scope_id}"

    def _available(self) -> bool:
        return not self._lost_invalidation and self._breaker.available()

    async def _call(self, operation: str, awaitable: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self._settings.timeout):
                return await awaitable
        except REDIS_FAILURES as exc:
            CACHE_ERRORS.labels(operation).inc()
            self._breaker.failed(exc)
            raise _Unavailable from exc

    async def _single_flight(self, fill: _Fill, load: Loader) -> bytes:
        """Concurrent misses of one key share one load: in this process by a future, across
        processes by a short Redis lock that others wait on for a moment."""
        entry_key = fill.entry_key
        pending = self._inflight.get(entry_key)
        if pending is not None and fill.locked:
            # The lookups came back out of order: the local leader missed the lock and is
            # waiting for whoever holds it, which is this request. Load, as the holder.
            return await self._fill(fill, load)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not pending.cancelled() or (current and current.cancelling()):
                    raise  # this request itself is being cancelled
                # The loading request was cancelled (its client left): load ourselves.
                return await load()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[entry_key] = future
        try:
            value = await self._fill(fill, load)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            # Waiters get the exception; nobody else needs to look at it.
            future.exception()
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._inflight[entry_key]

    async def _fill(self, fill: _Fill, load: Loader) -> bytes:
        if not fill.locked:
            try:
                value = await self._wait_for_fill(fill.entry_key)
            except _Unavailable:
                return await load()
            if value is not None:
                return value
        try:
            value = await load()
        except Exception:
            if fill.locked:  # nothing to wait for (a 404, the database down): say so at once
                with contextlib.suppress(_Unavailable):
                    await self._call(
                        "release",
                        self._release(keys=[fill.entry_key + ":lock"], args=[fill.token]),
                    )
            raise
        with contextlib.suppress(_Unavailable):
            await self._call(
                "store",
                self._store(
                    keys=[fill.entry_key, fill.entry_key + ":lock"],
                    args=[value, self._settings.ttl, fill.token],
                ),
            )
        return value

    async def _wait_for_fill(self, entry_key: str) -> bytes | None:
        """Another process is loading this key: wait briefly for its result."""
        deadline = time.monotonic() + self._settings.lock_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            value = await self._call("wait", self._redis.get(entry_key))
            if value is not None:
                CACHE_REQUESTS.labels("hit").inc()
                return bytes(value)
        return None

    def _start_repair(self) -> None:
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._bump_epoch())

    async def _bump_epoch(self) -> None:
        """Retry until the global epoch is bumped; only then serve from the cache again."""
        while self._lost_invalidation:
            try:
                await self._call("epoch", self._redis.incr(self._epoch_key))
            except _Unavailable:
                await asyncio.sleep(self._settings.retry_interval)
            else:
                self._lost_invalidation = False
                logger.info("response cache: discarded all entries after a lost invalidation")


@dataclass(frozen=True, slots=True)
class _Fill:
    """A missed entry, and whether this request holds the lock to fill it."""

    entry_key: str
    token: str
    locked: bool


class _Unavailable(Exception):
    """Redis failed or timed out; the caller falls back to the database."""
