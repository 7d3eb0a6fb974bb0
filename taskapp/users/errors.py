"""The failures of the users directory."""

from __future__ import annotations

from taskapp.errors import NotFoundError


class UserNotFoundError(NotFoundError):
    """No one the directory knows by that subject, username or e-mail address."""

    code = "user_not_found"
    summary = "No user known to the directory by that subject, username or e-mail address"
    default_detail = "User not found"
