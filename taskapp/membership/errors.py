"""The failures of projects and their members, wherever they are met (tasks too)."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError

from taskapp.errors import AppError, NotFoundError, invalid


class ProjectNotFoundError(NotFoundError):
    """No such project, or not one the caller is a member of (its existence is not
    revealed)."""

    code = "project_not_found"
    summary = "No such project, or not one the caller is a member of"
    default_detail = "Project not found"


class PersonalProjectError(AppError):
    status_code = 409
    code = "personal_project"
    summary = "An Inbox cannot be shared, archived, deleted or transferred"
    default_detail = "An Inbox cannot be shared, archived, deleted or transferred"


class ProjectOwnerError(AppError):
    status_code = 409
    code = "project_owner"
    summary = "The owner is always an admin of the project: transfer the project first"
    default_detail = (
        "The owner is always an admin of the project and cannot be removed; "
        "transfer the project first"
    )


class ProjectArchivedError(AppError):
    status_code = 409
    code = "project_archived"
    summary = "The project is archived: unarchive it to add or move tasks into it"
    default_detail = "The project is archived"


class MemberNotFoundError(NotFoundError):
    code = "member_not_found"
    summary = "That user is not a member of the project"
    default_detail = "Member not found"


def not_members(*problems: tuple[tuple[str | int, ...], str]) -> RequestValidationError:
    """The 422 for users named in the input, each at its place (`loc`), who are not members
    of the project."""
    return invalid(
        *(
            (loc, f"{user!r} is not a member of the project", "not_a_member")
            for loc, user in problems
        )
    )
