"""Bodies of the users API."""

from __future__ import annotations

from pydantic import BaseModel


class UserRead(BaseModel):
    """A person as the directory knows them (from their last token's claims)."""

    id: str  # the token's subject
    username: str | None
    name: str | None
    email: str | None
