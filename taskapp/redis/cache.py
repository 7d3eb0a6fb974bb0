"""Response cache in Redis (cache-aside), correct after every write in every process.

Entries belong to views: what a set of callers sees (one owner's tasks, say, or everything an
admin sees), named by the resource that owns them. Every entry key embeds two counters read
in the same round trip as the entry:

- a generation per view, bumped after each commit that changes what the view shows, so
  later reads build new keys and never see what was cached before the write; old entries
  simply expire;
- a global epoch, bumped when an invalidation could not be delivered (Redis failed right
  after a commit), so nothing cached before a lost invalidation is ever served again.

Each invalidation also records when it happened, in the Redis server's clock (one clock for
every instance), and a lookup returns that time with the entry: a read replica serves the
load of a missed entry only if it has replayed past it (`taskapp.database.replica`).

Redis trouble never fails or slows a request beyond `timeout`: the cache is bypassed for
`retry_interval`, the request is served from the database, and the failure is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from taskapp.config import CacheSettings
from taskapp.observability.metrics import CACHE_ERRORS, CACHE_REQUESTS, Labelled
from taskapp.redis.client import REDIS_FAILURES, RedisBreaker
from taskapp.redis.scripts import Scripts, source

logger = logging.getLogger(__name__)
_LOOKUPS = Labelled(CACHE_REQUESTS)


# The time of the last write to what a load reads, when the cache could not tell: later than
# anything a replica has replayed, so the primary answers.
UNKNOWN = math.inf
# A loaded entry rides along with the next lookup of this process, or is sent on its own
# after this delay when no lookup comes; a lookup carries at most this many.
STORE_DELAY = 0.005
STORES_PER_LOOKUP = 16

# Loads a missed entry, given the time of the last write to its view (see the module) and
# the view's version as the lookup read it (None when the cache could not be asked).
Loader = Callable[[float, str | None], Awaitable[bytes]]
# Values derived from a view kept in each process, at most (see `ResponseCache.local`).
LOCAL_ENTRIES = 65_536


class LookupRider(Protocol):
    """A count the lookup makes in its own round trip: the request's rate limit (gcra.lua),
    while it is still to be made."""

    @property
    def settled(self) -> bool: ...

    def gcra_call(self) -> tuple[str, Sequence[float]]:
        """The bucket's key, and its interval (ms) and burst."""
        ...

    def admit(self, decision: Sequence[Any]) -> None:
        """Take the lookup's GCRA result; raises to refuse the request (nothing is read)."""
        ...

    def failed(self, exc: BaseException | None) -> None:
        """Redis could not be asked."""
        ...


@functools.lru_cache(maxsize=65_536)
def _view_id(view: str) -> str:
    # Fixed-length and free of separators, whatever characters a subject contains.
    return hashlib.sha256(view.encode()).hexdigest()[:32]


class ResponseCache:
    """Serialized responses by (view, key), with single-flight loading on a miss."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        settings: CacheSettings,
        *,
        key_prefix: str,
        track_writes: bool = False,
    ) -> None:
        """`scripts` runs the cache's Lua scripts; `track_writes`: record the time of writes
        even with the cache off (for a replica)."""
        self._redis = redis
        self._settings = settings
        self._track_writes = track_writes
        self._prefix = f"{key_prefix}cache:"
        self._epoch_key = f"{self._prefix}epoch"
        self._lookup = scripts.register(source("gcra", "cache_lookup"))
        self._store = scripts.register(source("cache_store"))
        self._release = scripts.register(source("cache_release"))
        self._bump = scripts.register(source("clock", "cache_bump"))
        self._now = scripts.register(source("clock", "clock_now"))
        self._clock_key = f"{self._prefix}clock"
        self._breaker = RedisBreaker(
            logger, "response cache", retry_interval=settings.retry_interval
        )
        self._lost_invalidation = False
        self._repair: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._local: OrderedDict[tuple[str, str], tuple[str, Any]] = OrderedDict()
        # Loaded entries not yet in Redis: (entry key, value, lock token).
        self._stores: list[tuple[str, bytes, str]] = []
        self._store_timer: asyncio.TimerHandle | None = None
        self._store_task: asyncio.Task[None] | None = None
        # Names the holder of a fill lock: random per process, counted per lookup (a uuid4
        # per lookup would read the OS's random source every time).
        self._token_prefix = secrets.token_hex(8)
        self._tokens = itertools.count()

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    async def get_or_load(
        self, view: str, key: str, load: Loader, *, rider: LookupRider | None = None
    ) -> bytes:
        """The cached bytes for `key` in `view`, or `load()`'s result, cached.

        A `rider` not yet settled is settled by the lookup itself (one round trip for both);
        when it refuses the request, nothing is loaded.
        """
        if not self._settings.enabled:
            return await load(await self._last_write(view), None)
        if not self._available():
            _LOOKUPS("bypass").inc()
            return await load(UNKNOWN, None)
        if rider is not None and rider.settled:
            rider = None
        view_id = _view_id(view)
        token = f"{self._token_prefix}{next(self._tokens)}"  # holder of the fill lock
        stores, self._stores = (
            self._stores[:STORES_PER_LOOKUP],
            self._stores[STORES_PER_LOOKUP:],
        )
        bucket, gcra = rider.gcra_call() if rider is not None else ("", (0, 0))
        keys = [self._epoch_key, self._generation_key(view_id), bucket]
        args: list[Any] = [
            f"{self._prefix}{view_id}:",
            key,
            token,
            int(self._settings.lock_ttl * 1000),
            1 if rider is not None else 0,
            *gcra,
            self._settings.ttl,
        ]
        for entry_key, value, lock_token in stores:
            keys += (entry_key, entry_key + ":lock")
            args += (value, lock_token)
        try:
            found = await self._call("lookup", self._lookup(keys=keys, args=args))
        except _Unavailable as exc:
            if rider is not None:
                rider.failed(exc.__cause__)
            _LOOKUPS("bypass").inc()
            return await load(UNKNOWN, None)  # a rider failing closed refuses first
        if rider is not None:
            rider.admit(found[3])
        if found[1] is not None:
            _LOOKUPS("hit").inc()
            return bytes(found[1])
        _LOOKUPS("miss").inc()
        fill = _Fill(found[0].decode(), token, locked=found[2] == b"locked")
        written_at = int(found[4])
        # The entry's key is <prefix><view id>:<epoch>:<generation>:<key>.
        version = fill.entry_key[len(self._prefix) + len(view_id) + 1 : -len(key) - 1]
        return await self._single_flight(fill, lambda: load(written_at, version))

    def local(self, view: str, version: str | None, name: str) -> Any:
        """What this process kept as `name` of `view` at `version` (`keep_local`); None when
        it kept nothing, or kept it at another version (the view has changed since)."""
        if version is None:
            return None
        kept = self._local.get((view, name))
        if kept is None or kept[0] != version:
            return None
        self._local.move_to_end((view, name))
        return kept[1]

    def last_local(self, view: str, name: str) -> Any:
        """What this process last kept as `name` of `view`, at whatever version: a guess that
        may be stale, for what is checked again where it is used. None when nothing is
        kept."""
        kept = self._local.get((view, name))
        return None if kept is None else kept[1]

    def forget_local(self, view: str, name: str) -> None:
        """Drop what this process kept as `name` of `view`."""
        self._local.pop((view, name), None)

    def keep_local(self, view: str, version: str | None, name: str, value: Any) -> None:
        """Keep `value`, derived from `view` at `version` (a loader's), in this process: for
        what a load of that view needs again until the view changes, without a round trip.
        Every change to the view (or the epoch) makes it a new version."""
        if version is None:
            return
        self._local[(view, name)] = (version, value)
        self._local.move_to_end((view, name))
        if len(self._local) > LOCAL_ENTRIES:
            self._local.popitem(last=False)

    async def invalidate(self, *views: str) -> None:
        """Make every entry of `views` unreachable; call after the change is committed."""
        if not self._settings.enabled and not self._track_writes:
            return
        keys = [self._generation_key(_view_id(view)) for view in views]
        try:
            await self._call("invalidate", self._bump(keys=[self._clock_key, *keys]))
        except _Unavailable:
            # Entries of these views may still be readable by other processes: make sure
            # the whole cache is discarded before anyone serves from it again.
            self._lost_invalidation = True
            self._start_repair()

    async def now(self) -> int:
        """The clock write times are read from (µs, never going back); raises on Redis
        trouble."""
        return int(await self._now(keys=[self._clock_key]))

    async def invalidate_all(self) -> None:
        """Make every entry unreachable, in every process; for a change whose views are not
        known. Redis failing, entries are bypassed here until the epoch could be bumped."""
        try:
            await self._call("invalidate", self._bump(keys=[self._clock_key, self._epoch_key]))
        except _Unavailable:
            self._lost_invalidation = True
            self._start_repair()

    async def clear(self) -> None:
        """Discard every entry at once (all processes), and what this process kept of them:
        for changes made outside the API."""
        self._local.clear()
        await self._bump(keys=[self._clock_key, self._epoch_key])

    async def aclose(self) -> None:
        if self._store_timer is not None:
            self._store_timer.cancel()
        if self._stores and self._available():
            await self._send_stores()
        if self._repair is not None:
            self._repair.cancel()

    # -- internals ---------------------------------------------------------------------------

    def _generation_key(self, view_id: str) -> str:
        # No TTL: a generation must outlive every entry made with it.
        return f"{self._prefix}gen:{view_id}"

    async def _last_write(self, view: str) -> float:
        """When `view` was last written, for a load with the cache off."""
        if not self._track_writes or not self._available():
            return UNKNOWN
        keys = (self._generation_key(_view_id(view)), self._epoch_key)
        try:
            times = await self._call("wrote", self._redis.mget([f"{k}:wrote" for k in keys]))
        except _Unavailable:
            return UNKNOWN
        return max(int(value or 0) for value in times)

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

    async def _single_flight(self, fill: _Fill, load: Callable[[], Awaitable[bytes]]) -> bytes:
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

    async def _fill(self, fill: _Fill, load: Callable[[], Awaitable[bytes]]) -> bytes:
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
        self._queue_store(fill, value)
        return value

    def _queue_store(self, fill: _Fill, value: bytes) -> None:
        """Store `value` with the next lookup, or after `STORE_DELAY` on its own."""
        self._stores.append((fill.entry_key, value, fill.token))
        if self._store_timer is None:
            loop = asyncio.get_running_loop()
            self._store_timer = loop.call_later(STORE_DELAY, self._store_left_over)

    def _store_left_over(self) -> None:
        self._store_timer = None
        if self._stores and (self._store_task is None or self._store_task.done()):
            self._store_task = asyncio.create_task(self._send_stores())

    async def _send_stores(self) -> None:
        while self._stores:
            stores, self._stores = (
                self._stores[:STORES_PER_LOOKUP],
                self._stores[STORES_PER_LOOKUP:],
            )
            keys: list[str] = []
            args: list[Any] = [self._settings.ttl]
            for entry_key, value, lock_token in stores:
                keys += (entry_key, entry_key + ":lock")
                args += (value, lock_token)
            try:
                await self._call("store", self._store(keys=keys, args=args))
            except _Unavailable:
                return  # lost: those entries are loaded again, their locks expire

    async def _wait_for_fill(self, entry_key: str) -> bytes | None:
        """Another process is loading this key: wait briefly for its result."""
        deadline = time.monotonic() + self._settings.lock_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            value = await self._call("wait", self._redis.get(entry_key))
            if value is not None:
                _LOOKUPS("hit").inc()
                return bytes(value)
        return None

    def _start_repair(self) -> None:
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._bump_epoch())

    async def _bump_epoch(self) -> None:
        """Retry until the global epoch is bumped; only then serve from the cache again."""
        while self._lost_invalidation:
            try:
                await self._call("epoch", self._bump(keys=[self._clock_key, self._epoch_key]))
            except _Unavailable:
                await asyncio.sleep(self._settings.retry_interval)
            else:
                self._lost_invalidation = False
                logger.info("response cache: discarded all entries after a lost invalidation")


class RequestCache:
    """The response cache as one request uses it: its first lookup also makes the request's
    pending count (its `rider`), in the same round trip."""

    __slots__ = ("_cache", "_rider")

    def __init__(self, cache: ResponseCache, rider: LookupRider | None) -> None:
        self._cache = cache
        self._rider = rider

    async def get_or_load(self, view: str, key: str, load: Loader) -> bytes:
        """See `ResponseCache.get_or_load`."""
        return await self._cache.get_or_load(view, key, load, rider=self._rider)

    def local(self, view: str, version: str | None, name: str) -> Any:
        """See `ResponseCache.local`."""
        return self._cache.local(view, version, name)

    def last_local(self, view: str, name: str) -> Any:
        """See `ResponseCache.last_local`."""
        return self._cache.last_local(view, name)

    def forget_local(self, view: str, name: str) -> None:
        """See `ResponseCache.forget_local`."""
        self._cache.forget_local(view, name)

    def keep_local(self, view: str, version: str | None, name: str, value: Any) -> None:
        """See `ResponseCache.keep_local`."""
        self._cache.keep_local(view, version, name, value)


@dataclass(frozen=True, slots=True)
class _Fill:
    """A missed entry, and whether this request holds the lock to fill it."""

    entry_key: str
    token: str
    locked: bool


class _Unavailable(Exception):
    """Redis failed or timed out; the caller falls back to the database."""
