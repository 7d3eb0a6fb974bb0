"""Projects, their members, the users directory; tasks gain a project, a creator, assignees.

Every existing task lands in its owner's Inbox: one personal project per owner (its id
derived from the owner as `taskapp.membership.models.inbox_id` derives it), the owner its
`admin` member, and the owner a row in the directory (no names yet: the first call of theirs
fills them in). `owner` keeps its meaning for an Inbox task (the project's owner is the
task's), so no row changes partition. The downgrade drops what the old schema cannot hold:
tasks keep their rows and owners; projects, members, assignees and the directory go.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As taskapp.membership.models: a migration does not import the code that may change later.
_INBOX_NAMESPACE = uuid.UUID("5f0c7c1e-9a43-4c53-9a1e-2f1b0d6c8e11")
_BATCH = 5_000


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("sub", sa.String(255), nullable=False),
        sa.Column("username", sa.String(255), nullable=True),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "refreshed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("sub", name=op.f("pk_users")),
    )
    for column in ("username", "email", "name"):
        op.create_index(f"ix_users_{column}", "users", [sa.text(f"lower({column}) text_pattern_ops")])
    op.create_table(
        "projects",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("archived", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("personal", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
    )
    op.create_index("ix_projects_owner", "projects", ["owner"])
    op.create_index(
        "uq_projects_personal_owner",
        "projects",
        ["owner"],
        unique=True,
        postgresql_where=sa.text("personal"),
    )
    op.create_table(
        "project_members",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "role IN ('viewer', 'editor', 'admin')", name=op.f("ck_project_members_role_valid")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_project_members_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("project_id", "user_id", name=op.f("pk_project_members")),
    )
    op.create_index(
        "ix_project_members_user_id",
        "project_members",
        ["user_id", "project_id"],
        postgresql_include=["owner", "role"],
    )

    # Every owner's Inbox, membership and directory row.
    connection = op.get_bind()
    owners = [row[0] for row in connection.execute(sa.text("SELECT DISTINCT owner FROM tasks"))]
    for start in range(0, len(owners), _BATCH):
        batch = owners[start : start + _BATCH]
        inboxes = [{"id": uuid.uuid5(_INBOX_NAMESPACE, owner), "owner": owner} for owner in batch]
        connection.execute(
            sa.text(
                "INSERT INTO projects (id, owner, name, personal) "
                "VALUES (:id, :owner, 'Inbox', true)"
            ),
            inboxes,
        )
        connection.execute(
            sa.text(
                "INSERT INTO project_members (project_id, user_id, owner, role) "
                "VALUES (:id, :owner, :owner, 'admin')"
            ),
            inboxes,
        )
        connection.execute(
            sa.text(
                "INSERT INTO users (sub, refreshed_at) VALUES (:owner, 'epoch') "
                "ON CONFLICT DO NOTHING"
            ),
            inboxes,
        )

    op.add_column("tasks", sa.Column("project_id", sa.Uuid(), nullable=True))
    op.add_column("tasks", sa.Column("created_by", sa.String(255), nullable=True))
    op.add_column(
        "tasks",
        sa.Column(
            "assignees",
            sa.ARRAY(sa.String(255)),
            server_default=sa.text("'{}'::character varying[]"),
            nullable=False,
        ),
    )
    op.execute(
        "UPDATE tasks SET project_id = projects.id, created_by = tasks.owner "
        "FROM projects WHERE projects.owner = tasks.owner AND projects.personal"
    )
    op.alter_column("tasks", "project_id", nullable=False)
    op.alter_column("tasks", "created_by", nullable=False)
    op.create_index(
        "ix_tasks_owner_project_id_created_at_id",
        "tasks",
        ["owner", "project_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.create_index("ix_tasks_assignees", "tasks", ["assignees"], postgresql_using="gin")


def downgrade() -> None:
    op.drop_index("ix_tasks_assignees", table_name="tasks")
    op.drop_index("ix_tasks_owner_project_id_created_at_id", table_name="tasks")
    op.drop_column("tasks", "assignees")
    op.drop_column("tasks", "created_by")
    op.drop_column("tasks", "project_id")
    op.drop_table("project_members")
    op.drop_table("projects")
    op.drop_table("users")
