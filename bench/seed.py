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
from collections.abc import Iterable, Iterator
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


# Every count from the tasks loaded, as migration 0005 makes them.
_COUNT_ALL = """
    INSERT INTO task_counts (owner, project_id, assignee, status, tasks)
    SELECT owner, project_id, assignee, status, count(*)
    FROM (SELECT owner, project_id, status, ARRAY[''] || assignees AS assignees FROM tasks) t,
         unnest(t.assignees) AS assignee
    GROUP BY owner, project_id, assignee, status
"""


def _has_counts(connection: psycopg.Connection[Any]) -> bool:
    """Whether the schema keeps task counts and assignments (0005 or later)."""
    found = connection.execute("SELECT to_regclass('task_counts')").fetchone()
    return found is not None and found[0] is not None


def _inboxes(cursor: psycopg.Cursor[Any], owners: list[str]) -> None:
    """Every owner's Inbox, their membership and directory entry, as the API makes them."""
    with cursor.copy("COPY users (sub) FROM STDIN") as copy:
        copy.write("".join(f"{owner}\n" for owner in owners))
    with cursor.copy("COPY projects (id, owner, name, personal) FROM STDIN") as copy:
        copy.write("".join(f"{inbox_id(o)}\t{o}\t{INBOX_NAME}\tt\n" for o in owners))
    with cursor.copy("COPY project_members (project_id, user_id, owner, role) FROM STDIN") as copy:
        copy.write("".join(f"{inbox_id(o)}\t{o}\t{o}\tadmin\n" for o in owners))


@contextlib.contextmanager
def _bulk_load(dsn: str) -> Iterator[tuple[psycopg.Cursor[Any], bool]]:
    """A cursor to COPY into the migrated, empty tables of `dsn` with the secondary indexes
    of `tasks` dropped, and whether the schema has projects; the indexes are rebuilt after
    the block, as a bulk load should be done, and `VACUUM ANALYZE` then sets the visibility
    map and the statistics."""
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
        projects = _has_projects(connection)
        counts = _has_counts(connection)
        if counts:
            # Counted (and assignments listed) once after the load, not by the trigger over a
            # transition table of every row.
            connection.execute("ALTER TABLE tasks DISABLE TRIGGER USER")
        try:
            with connection.cursor() as cursor:
                yield cursor, projects
        except BaseException:
            if counts:
                connection.execute("ALTER TABLE tasks ENABLE TRIGGER USER")
            raise
        if counts:
            connection.execute(_COUNT_ALL)
            connection.execute(
                "INSERT INTO task_assignments"
                " (owner, task_id, user_id, project_id, status, created_at)"
                " SELECT owner, id, unnest(assignees), project_id, status, created_at FROM tasks"
            )
            connection.execute("ALTER TABLE tasks ENABLE TRIGGER USER")
        for _, definition in indexes:
            # The parent's definition reads "ON ONLY tasks" (no partitions): build them all.
            connection.execute(definition.replace(" ON ONLY ", " ON ", 1))
        connection.execute(
            "VACUUM (ANALYZE) tasks, users, projects, project_members"
            + (", task_counts, task_assignments" if counts else "")
            if projects
            else "VACUUM (ANALYZE) tasks"
        )
        # Flush the load's dirty pages now, not in a checkpoint during the measurement (a role
        # that may not, neither superuser nor pg_checkpoint, leaves it to the server).
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            connection.execute("CHECKPOINT")


def _copy(cursor: psycopg.Cursor[Any], statement: str, lines: Iterable[str]) -> None:
    """COPY `lines` in chunks."""
    with cursor.copy(statement) as copy:
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) == COPY_CHUNK:
                copy.write("".join(chunk))
                chunk.clear()
        if chunk:
            copy.write("".join(chunk))


def seed(dsn: str, *, rows: int, owners: int, samples: int = 20, seed: int = 1) -> Dataset:
    """Fill the (empty, migrated) `tasks` table of `dsn` and return what went in."""
    rng = random.Random(seed)  # a reproducible dataset, not secrecy  # nosec B311
    dataset = Dataset(owners=[owner_name(i) for i in range(owners)], sizes=[])
    dataset.sizes = owner_sizes(rows, owners, rng)
    with _bulk_load(dsn) as (cursor, projects):
        if projects:
            _inboxes(cursor, dataset.owners)
        tenancy = "project_id, created_by, " if projects else ""
        columns = f"owner, id, {tenancy}title, description, status, created_at, updated_at"
        _copy(
            cursor,
            f"COPY tasks ({columns}) FROM STDIN",
            _lines(dataset, rng, samples, projects=projects),
        )
    return dataset


# The shared data set (`seed_shared`): teams working in shared projects beside their Inboxes.
SHARED_SHARE = 0.5  # of the rows in shared projects; the rest in Inboxes
LARGE_PROJECTS = 5  # with 2% of the rows each, and LARGE_MEMBERS members
LARGE_MEMBERS = 300
MEMBERS = (2, 50)  # of any other project, skewed towards small teams
BUSY_PROJECTS = 20  # shared projects each busy user is a member of
ROLES = ("editor",) * 7 + ("viewer",) * 2 + ("admin",)


@dataclass
class SharedProject:
    id: uuid.UUID
    owner: str
    members: dict[str, str]  # user: role (the owner: admin)
    size: int
    sample_ids: list[str] = field(default_factory=list)


@dataclass
class SharedDataset(Dataset):
    """Inboxes as in `Dataset` (`owners` are every user, `sizes` their Inbox tasks), shared
    projects, and the busy users each a member of `BUSY_PROJECTS` of them."""

    projects: list[SharedProject] = field(default_factory=list)
    busy: dict[str, list[SharedProject]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.sizes) + sum(project.size for project in self.projects)

    def visible(self, user: str) -> int:
        """Tasks `user` sees: their Inbox's and their shared projects'."""
        inbox = self.sizes[self.owners.index(user)]
        return inbox + sum(project.size for project in self.busy[user])


def _shared_projects(
    rows: int, users: list[str], count: int, busy: list[str], rng: random.Random
) -> list[SharedProject]:
    """`count` projects of random owners: the first `LARGE_PROJECTS` large; every busy user
    in `BUSY_PROJECTS` of them (and their own Inbox), no more; the rest of each team drawn
    from the other users."""
    large = min(LARGE_PROJECTS, count)
    sizes = [int(rows * HEAVY_SHARE)] * large
    weights = [math.exp(rng.gauss(0, 1)) for _ in range(count - large)]
    scale = (rows - sum(sizes)) / sum(weights) if weights else 0
    sizes += [max(1, int(w * scale)) for w in weights]
    sizes[-1] += rows - sum(sizes)
    others = sorted(set(users) - set(busy))
    projects = []
    for size in sizes:
        owner = rng.choice(others)
        project_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        projects.append(SharedProject(project_id, owner, {owner: "admin"}, size))
    for user in busy:
        for project in rng.sample(projects, BUSY_PROJECTS):
            project.members.setdefault(user, rng.choice(ROLES))
    low, high = MEMBERS
    for n, project in enumerate(projects):
        team = LARGE_MEMBERS if n < large else int(low + (high - low + 1) * rng.random() ** 2)
        team = min(team, len(others))  # a small data set has fewer people than that
        while len(project.members) < team:
            project.members.setdefault(rng.choice(others), rng.choice(ROLES))
    return projects


def _shared_lines(projects: list[SharedProject], rng: random.Random, samples: int) -> Iterator[str]:
    """COPY lines of the shared projects' tasks: each made by one of its editors or admins,
    assigned to none (30%), one (55%) or two (15%) of its members."""
    now = time.time()
    getrandbits = rng.getrandbits
    choice = rng.choice
    rand = rng.random
    for project in projects:
        members = list(project.members)
        makers = [user for user, role in project.members.items() if role != "viewer"]
        tenancy = f"{project.owner}\t"
        for n in range(project.size):
            task_id = f"{getrandbits(128):032x}"
            if n < samples:
                project.sample_ids.append(str(uuid.UUID(task_id)))
            created = datetime.fromtimestamp(now - getrandbits(25) % YEAR, UTC).isoformat()
            roll = rand()
            if roll < 0.3 or len(members) < 2:
                assignees = "{}"
            elif roll < 0.85:
                assignees = "{" + choice(members) + "}"
            else:
                assignees = "{" + ",".join(rng.sample(members, 2)) + "}"
            yield (
                f"{tenancy}{task_id}\t{project.id}\t{choice(makers)}\t{assignees}\t"
                f"Task {n} of {str(project.id)[:8]}\t{choice(DESCRIPTIONS)}\t{choice(STATUSES)}\t"
                f"{created}\t{created}\n"
            )


def seed_shared(
    dsn: str,
    *,
    rows: int,
    users: int,
    projects: int,
    busy: int,
    samples: int = 5,
    seed: int = 1,
) -> SharedDataset:
    """Fill the (empty, migrated) tables of `dsn` with `users` people, half of `rows` in
    their Inboxes and half in `projects` shared projects; `busy` of the people are members
    of `BUSY_PROJECTS` shared projects each."""
    rng = random.Random(seed)  # a reproducible dataset, not secrecy  # nosec B311
    people = [owner_name(i) for i in range(users)]
    shared_rows = int(rows * SHARED_SHARE)
    dataset = SharedDataset(owners=people, sizes=[])
    dataset.sizes = owner_sizes(rows - shared_rows, users, rng)
    busy_users = rng.sample(people, busy)
    dataset.projects = _shared_projects(shared_rows, people, projects, busy_users, rng)
    dataset.busy = {
        user: [project for project in dataset.projects if user in project.members]
        for user in busy_users
    }
    with _bulk_load(dsn) as (cursor, has_projects):
        if not has_projects:
            raise SystemExit("bench: the shared data set needs projects (migration 0004)")
        _inboxes(cursor, people)
        _copy(
            cursor,
            "COPY projects (id, owner, name) FROM STDIN",
            (f"{p.id}\t{p.owner}\tProject {n}\n" for n, p in enumerate(dataset.projects)),
        )
        _copy(
            cursor,
            "COPY project_members (project_id, user_id, owner, role) FROM STDIN",
            (
                f"{p.id}\t{user}\t{p.owner}\t{role}\n"
                for p in dataset.projects
                for user, role in p.members.items()
            ),
        )
        _copy(
            cursor,
            "COPY tasks (owner, id, project_id, created_by, title, description, status, "
            "created_at, updated_at) FROM STDIN",
            _lines(dataset, rng, samples, projects=True),
        )
        _copy(
            cursor,
            "COPY tasks (owner, id, project_id, created_by, assignees, title, description, "
            "status, created_at, updated_at) FROM STDIN",
            _shared_lines(dataset.projects, rng, samples),
        )
    for user, joined in dataset.busy.items():
        dataset.sample_ids[user] = [i for project in joined for i in project.sample_ids]
    return dataset
