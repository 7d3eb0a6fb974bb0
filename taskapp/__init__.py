"""taskapp: a multi-user task management service."""
