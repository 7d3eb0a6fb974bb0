"""The local dev signing key of `taskapp run`, and tokens shaped like Keycloak's."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from taskapp.auth.jwks import SigningKey, StaticKeySource

DEV_ISSUER = "urn:taskapp:dev"
DEV_KEY_FILE = "dev-signing-key.pem"


def load_or_create_dev_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """The dev RSA key in `data_dir`, created (mode 0600) on first use."""
    path = data_dir / DEV_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
    return load_dev_key(data_dir)


def load_dev_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """The dev RSA key in `data_dir`; FileNotFoundError when `taskapp run` has not made one."""
    path = data_dir / DEV_KEY_FILE
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return loaded


def key_id(key: rsa.RSAPrivateKey) -> str:
    """RFC 7638 thumbprint of the public key, as Keycloak-style kids are stable per key."""
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    canonical = json.dumps(
        {"e": public["e"], "kty": "RSA", "n": public["n"]}, separators=(",", ":")
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(canonical.encode())
    return jwt.utils.base64url_encode(digest.finalize()).decode()


def dev_key_source(data_dir: Path) -> StaticKeySource:
    key = load_or_create_dev_key(data_dir)
    jwk = jwt.PyJWK(json.loads(RSAAlgorithm.to_jwk(key.public_key())), algorithm="RS256")
    return StaticKeySource({key_id(key): SigningKey(jwk, "RS256")})


def mint_token(
    key: rsa.RSAPrivateKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    roles: Iterable[str],
    email: str | None = None,
    name: str | None = None,
    lifetime: int = 3600,
) -> str:
    """An RS256 access token with the claims layout of a Keycloak access token."""
    now = int(time.time())
    roles = list(roles)
    claims: dict[str, Any] = {
        "exp": now + lifetime,
        "iat": now,
        "jti": str(uuid.uuid4()),
        "iss": issuer,
        "aud": [audience, "account"],
        "sub": subject,
        "typ": "Bearer",
        "azp": "taskapp-cli",
        "realm_access": {"roles": ["default-roles-taskapp", *roles]},
        "resource_access": {audience: {"roles": roles}},
        "scope": "openid profile email",
        "preferred_username": subject,
    }
    if email:
        claims["email"] = email
        claims["email_verified"] = True
    if name:
        claims["name"] = name
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": key_id(key), "typ": "JWT"})
