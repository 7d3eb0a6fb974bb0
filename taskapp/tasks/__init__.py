"""Tasks: the service's domain."""
