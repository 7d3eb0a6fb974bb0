"""The read replica: a streaming standby that answers reads it is known to be current for.

Each process measures, every `replica_check_interval`, how far the standby has replayed: it
reads the cache's clock (the Redis server's time, never going back; `ResponseCache.now`),
then the primary's WAL position, and keeps both as a sample.
Once the standby's replay position reaches a sample's, everything committed before that
sample's time is on the standby. A write's time is taken from the same clock after its
commit (`ResponseCache.invalidate`), so a read may go to the standby exactly when the last
write to what it reads is older than the newest sample the standby has reached: a client
reads its own writes at once, from any instance, and no stale page is cached under a newer
generation. The standby serves nothing while it is down, is not a standby, or is more than
`replica_max_lag` behind; reads then go to the primary.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from taskapp.config import DatabaseSettings
from taskapp.database.servers import DatabaseServer
from taskapp.observability.metrics import DB_READS, db_replica_lag, db_replica_up

logger = logging.getLogger(__name__)

_PRIMARY_POSITION = text("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
# A bound whatever the interval: dropping the oldest sample only makes the standby wait for a
# newer one.
SAMPLES_KEPT = 6000
_REPLAYED = text("SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint")


class ReadReplica:
    """Decides which reads the standby serves; `run()` keeps its measurements current.

    The measurements use engines of their own (one connection each), so a busy request pool
    can neither delay them nor be taken from.
    """

    def __init__(
        self,
        database: DatabaseServer,
        *,
        replica: AsyncEngine,
        primary: AsyncEngine,
        clock: Callable[[], Awaitable[int]],
        settings: DatabaseSettings,
    ) -> None:
        self.database = database
        self._replica = replica
        self._primary = primary
        self._clock = clock
        self._max_lag = settings.replica_max_lag
        self._interval = settings.replica_check_interval
        self._timeout = max(1.0, settings.replica_check_interval)
        # (WAL position, clock reading in µs, monotonic time) of the primary, oldest first.
        self._samples: collections.deque[tuple[int, int, float]] = collections.deque(
            maxlen=SAMPLES_KEPT
        )
        self._up = False
        # The newest sample the standby has replayed: its WAL position, its clock reading
        # (µs), and when it was taken.
        self._replayed_position = 0
        self._replayed_to = 0
        self._replayed_at = -math.inf
        self._refused = False

    @property
    def longest_check(self) -> float:
        """Seconds a check can take: its two steps' timeouts."""
        return 2 * self._timeout

    @property
    def lag(self) -> float:
        """Seconds since the newest moment the standby is known to have replayed."""
        return time.monotonic() - self._replayed_at

    def serves(self, written_at: float) -> bool:
        """Whether the standby may answer a read whose data was last written at
        `written_at` (µs of the cache's clock; infinite when unknown)."""
        return self._up and written_at < self._replayed_to and self.lag <= self._max_lag

    def served(self) -> None:
        DB_READS.labels("replica").inc()

    def passed(self) -> None:
        DB_READS.labels("primary").inc()

    def failed(self, reason: str) -> None:
        """A read failed on the standby: leave it to the primary until a check succeeds."""
        if self._up:
            logger.warning("read replica failed (%s); reading from the primary", reason)
        self._set_up(False)

    async def check(self) -> None:
        """Sample the primary, then see how far the standby has replayed."""
        try:
            async with asyncio.timeout(self._timeout):
                reading = await self._clock()
                taken = time.monotonic()
                async with self._primary.connect() as connection:
                    position = (await connection.execute(_PRIMARY_POSITION)).scalar_one()
            self._samples.append((position, reading, taken))
        except Exception as exc:  # no sample this round: the measured lag grows
            logger.debug("read replica: no sample of the primary: %r", exc)
        try:
            async with asyncio.timeout(self._timeout), self._replica.connect() as connection:
                standby, replayed = (await connection.execute(_REPLAYED)).one()
        except Exception as exc:
            if self._up:
                logger.warning("read replica unreachable (%r); reading from the primary", exc)
            self._set_up(False)
            return
        finally:
            self._forget_old_samples()
        if not standby or replayed is None:
            if self._up or not self._refused:
                logger.error("read replica is not a standby (not in recovery); not using it")
            self._refused = True
            self._set_up(False)
            return
        self._refused = False
        self._advance(replayed)
        if not self._up and self._replayed_to:
            logger.info("read replica is serving reads (%.1f s behind)", self.lag)
        self._set_up(self._replayed_to > 0)

    def _advance(self, replayed: int) -> None:
        if replayed < self._replayed_position:
            # Behind what it had replayed (restarted from an earlier point, or another
            # server): nothing it replayed before counts until it passes new samples.
            logger.warning("read replica went back in the WAL; reading from the primary")
            self._replayed_position, self._replayed_to, self._replayed_at = 0, 0, -math.inf
        reached = None
        while self._samples and self._samples[0][0] <= replayed:
            reached = self._samples.popleft()
        if reached is not None:
            self._replayed_position, self._replayed_to, self._replayed_at = reached
        db_replica_lag().set(self.lag)

    def _forget_old_samples(self) -> None:
        # Keep what the standby may still reach within the lag it is allowed.
        horizon = time.monotonic() - self._max_lag - self._interval
        while len(self._samples) > 1 and self._samples[0][2] < horizon:
            self._samples.popleft()

    def _set_up(self, up: bool) -> None:
        self._up = up
        db_replica_up().set(1 if up else 0)

    async def run(self, stop: asyncio.Event) -> None:
        """Check every interval until `stop` is set; a check under way is let finish."""
        while not stop.is_set():
            try:
                await self.check()
            except Exception:  # a bug must not end the measurements unnoticed
                logger.exception("read replica check failed; reading from the primary")
                self._set_up(False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await stop.wait()


@contextlib.asynccontextmanager
async def measuring(replica: ReadReplica | None) -> AsyncIterator[None]:
    """Keep `replica`'s measurements current for the duration of the block."""
    if replica is None:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(replica.run(stop))
    try:
        yield
    finally:
        # Stopped between checks, not cancelled inside one: a query cancelled mid-way costs
        # the driver a cancel request and a connection, and can hold the shutdown up.
        stop.set()
        await asyncio.wait({task}, timeout=replica.longest_check)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
