"""Projects and their members: the tenancy every task belongs to, and who may do what in it."""
