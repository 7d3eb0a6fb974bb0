"""Authentication (OIDC access tokens) and authorization (roles)."""
