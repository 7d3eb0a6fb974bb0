"""A domain event as a change emits it, before it is stored."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class NewEvent:
    """`kind` happened to the aggregate `aggregate_id` (a task), of the tenant `owner`, by
    `actor`. `payload` is what consumers need to know, as of this moment: JSON values."""

    kind: str
    aggregate_id: uuid.UUID
    owner: str
    actor: str
    payload: Mapping[str, Any]
    id: uuid.UUID = field(default_factory=uuid.uuid4)
