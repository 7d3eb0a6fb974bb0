"""Who is calling: the verified identity behind a request."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, as stated by a verified access token."""

    subject: str
    roles: frozenset[str]
    email: str | None = None
    username: str | None = None
    name: str | None = None

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles
