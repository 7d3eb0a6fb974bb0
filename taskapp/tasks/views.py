"""The cached views of tasks: which one a caller reads, and which a change makes stale.

A view is what a set of callers sees: one owner's tasks, or every task (what admins see).
Shared projects add a view per project here, without touching the cache.
"""

from __future__ import annotations

from taskapp.auth.principal import Principal

ADMIN_VIEW = "admin"


def owner_view(owner: str) -> str:
    return f"owner:{owner}"


def view_of(principal: Principal) -> str:
    """The view a caller reads: their own tasks, or everything."""
    return ADMIN_VIEW if principal.is_admin else owner_view(principal.subject)


def views_changed(owner: str) -> tuple[str, ...]:
    """What a committed change to one of `owner`'s tasks makes stale: their view and the
    admins'."""
    return owner_view(owner), ADMIN_VIEW
