"""The failures of the tasks API."""

from __future__ import annotations

from taskapp.errors import NotFoundError


class TaskNotFoundError(NotFoundError):
    """No such task, or not one the caller may see (its existence is not revealed)."""

    code = "task_not_found"
    summary = "No such task, or not one the caller may see"
    default_detail = "Task not found"
