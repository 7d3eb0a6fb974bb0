"""The cached views of tasks: which one a caller reads, and which a change makes stale.

A view is what a set of callers sees: one user's tasks (those of every project they are a
member of), or every task (what admins see). A change to a project's tasks makes the view of
each of its members stale, and the admins'; a change of membership, the member's.
"""

from __future__ import annotations

from collections.abc import Iterable

from taskapp.auth.principal import Principal

ADMIN_VIEW = "admin"


def user_view(user: str) -> str:
    return f"owner:{user}"


def view_of(principal: Principal) -> str:
    """The view a caller reads: the tasks of their projects, or everything."""
    return ADMIN_VIEW if principal.is_admin else user_view(principal.subject)


def views_changed(audience: Iterable[str]) -> tuple[str, ...]:
    """What a committed change to a task of a project whose members are `audience` makes
    stale: their views and the admins'."""
    return (*(user_view(user) for user in audience), ADMIN_VIEW)
