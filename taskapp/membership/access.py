"""Who may do what in a project: a member holds their role and every lower one; a global
admin holds every role in every project."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from taskapp.auth.principal import Principal
from taskapp.errors import ForbiddenError
from taskapp.membership.errors import ProjectNotFoundError
from taskapp.membership.models import ProjectRole

P = TypeVar("P", bound=Mapping[str, Any])


def holds(principal: Principal, role: str | None, needed: ProjectRole) -> bool:
    """Whether a caller whose role in a project is `role` (None: not a member) holds
    `needed` there."""
    return principal.is_admin or (role is not None and ProjectRole(role).rank >= needed.rank)


def allowed(principal: Principal, project: P | None, needed: ProjectRole) -> P:
    """`project` (a row with the caller's `role`) if the caller holds `needed` in it: 404 for
    a non-member (its existence is not revealed), 403 for a lower role."""
    if project is None or (project["role"] is None and not principal.is_admin):
        raise ProjectNotFoundError()
    if not holds(principal, project["role"], needed):
        raise ForbiddenError(f"Only a project {needed.value} (or higher) may do this")
    return project
