"""HTTP plumbing: the server protocol, request ids, security headers, the body cap."""
