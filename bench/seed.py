"""A realistic data set for the benchmark, loaded with COPY.

Owners: `rows // 100` of them (at least 100). A handful of heavy owners hold 2% of the rows
each (20,000 tasks each at a million rows); everyone else gets a log-normal share, so most
owners have tens to a few hundred tasks. Statuses are mixed, `created_at` spreads over a year.
The table's secondary indexes are dropped for the load and rebuilt once after it, as a bulk
load should be done; `VACUUM ANALYZE` then sets the visibility map and the statistics.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from taskapp.membership.models import INBOX_NAME, inbox_id

HEAVY_OWNERS = 5
HEAVY_SHARE = 0.02
STATUSES = ("pending",) * 5 + ("in_progress",) * 2 + ("completed",) * 3
DESCRIPTIONS = (
    "",
    "Follow up with the customer about the renewal.",
    "Write the migration plan and circulate it for review before Friday.",
    "Check the alert thresholds against last month's incidents; adjust where they were noisy "
    "and document the reasoning in the runbook so the on-call rotation knows why.",
)
YEAR = 365 * 24 * 3600
COPY_CHUNK = 20_000


@dataclass
class Dataset:
    """What was seeded: owners in seeding order (heavy ones first) and their task counts."""

    owners: list[str]
    sizes: list[int]
    sample_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.sizes)


def owner_name(index: int) -> str:
    # Keycloak subjects are UUIDs; deterministic ones keep reruns comparable.
    return str(uuid.UUID(int=0xB0C4_0000_0000_4000_8000_0000_0000_0000 + index))


def owner_sizes(rows: int, owners: int, rng: random.Random) -> list[int]:
    heavy = min(HEAVY_OWNERS, owners)
    sizes = [int(rows * HEAVY_SHARE)] * heavy
    rest = rows - sum(sizes)
    weights = [math.exp(rng.gauss(0, 1)) for _ in range(owners - heavy)]
    scale = rest / sum(weights) if weights else 0
    sizes += [max(1, int(w * scale)) for w in weights]
    # Rounding: put the difference on the last light owner so the total is exact.
    sizes[-1] += rows - sum(sizes)
    if sizes[-1] < 1:
        raise ValueError(f"cannot spread {rows} rows over {owners} owners")
    return sizes


def _lines(dataset: Dataset, rng: random.Random, samples: int, *, projects: bool) -> Iterator[str]:
    """COPY lines of the tasks; `projects`: with their Inbox and creator (a schema of 0004 or
    later; a baseline checkout's may be older)."""
    now = time.time()
    getrandbits = rng.getrandbits
    choice = rng.choice
    for owner, size in zip(dataset.owners, dataset.sizes, strict=True):
        kept = dataset.sample_ids.setdefault(owner, [])
        tenancy = f"{inbox_id(owner)}\t{owner}\t" if projects else ""
        for n in range(size):
            task_id = f"{getrandbits(128):032x}"
            if n < samples:
                kept.append(str(uuid.UUID(task_id)))
            created = datetime.fromtimestamp(now - getrandbits(25) % YEAR, UTC).isoformat()
            yield (
                f"{owner}\t{task_id}\t{tenancy}Task {n} of {owner[-6:]}\t"
                f"{choice(DESCRIPTIONS)}\t{choice(STATUSES)}\t{created}\t{created}\n"
            )


def _has_projects(connection: psycopg.Connection[Any]) -> bool:
    """Whether the schema has projects (0004 or later)."""
    found = connection.execute(
        "SELECT 1 FROM information_schema.columns"
        " WHERE table_name = 'tasks' AND column_name = 'project_id'"
    ).fetchone()
    return found is not None


def _inboxes(cursor: psycopg.Cursor[Any], owners: list[str]) -> None:
    """Every owner's Inbox, their membership and directory entry, as the API makes them."""
    with cursor.copy("COPY users (sub) FROM STDIN") as copy:
        copy.write("".join(f"{owner}\n" for owner in owners))
    with cursor.copy("COPY projects (id, owner, name, personal) FROM STDIN") as copy:
        copy.write("".join(f"{inbox_id(o)}\t{o}\t{INBOX_NAME}\tt\n" for o in owners))
    with cursor.copy("COPY project_members (project_id, user_id, owner, role) FROM STDIN") as copy:
        copy.write("".join(f"{inbox_id(o)}\t{o}\t{o}\tadmin\n" for o in owners))


def seed(dsn: str, *, rows: int, owners: int, samples: int = 20, seed: int = 1) -> Dataset:
    """Fill the (empty, migrated) `tasks` table of `dsn` and return what went in."""
    rng = random.Random(seed)  # a reproducible dataset, not secrecy  # nosec B311
    dataset = Dataset(owners=[owner_name(i) for i in range(owners)], sizes=[])
    dataset.sizes = owner_sizes(rows, owners, rng)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SET maintenance_work_mem = '512MB'")
        connection.execute("SET synchronous_commit = off")
        indexes = connection.execute(
            """
            SELECT c.relname, pg_get_indexdef(i.indexrelid)
            FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = 'tasks'::regclass AND NOT i.indisprimary
            """
        ).fetchall()
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        with connection.cursor() as cursor:
            projects = _has_projects(connection)
            if projects:
                _inboxes(cursor, dataset.owners)
            tenancy = "project_id, created_by, " if projects else ""
            columns = f"owner, id, {tenancy}title, description, status, created_at, updated_at"
            with cursor.copy(f"COPY tasks ({columns}) FROM STDIN") as copy:
                chunk: list[str] = []
                for line in _lines(dataset, rng, samples, projects=projects):
                    chunk.append(line)
                    if len(chunk) == COPY_CHUNK:
                        copy.write("".join(chunk))
                        chunk.clear()
                if chunk:
                    copy.write("".join(chunk))
        for _, definition in indexes:
            # The parent's definition reads "ON ONLY tasks" (no partitions): build them all.
            connection.execute(definition.replace(" ON ONLY ", " ON ", 1))
        connection.execute(
            "VACUUM (ANALYZE) tasks, users, projects, project_members"
            if projects
            else "VACUUM (ANALYZE) tasks"
        )
        # Flush the load's dirty pages now, not in a checkpoint during the measurement (a role
        # that may not, neither superuser nor pg_checkpoint, leaves it to the server).
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            connection.execute("CHECKPOINT")
    return dataset
