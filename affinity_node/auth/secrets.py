"""API key secrets: how they look, and the one way they are hashed (stored and compared)."""

from __future__ import annotations

import hashlib
import secrets

SECRET_PREFIX = "sk-"
MAX_SECRET_LEN = 512


def hash_secret(secret: str) -> bytes:
    """SHA-256 of the secret: what `api_keys.key_hash` holds and what nodes cache."""
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def bearer_secret(authorization: str | None) -> str:
    """The secret of an `Authorization: Bearer ...` header; ValueError says what is wrong."""
    if not authorization:
        raise ValueError(
            "Missing API key: send 'Authorization: Bearer sk-...' (or 'x-api-key: sk-...')."
        )
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or len(secret) > MAX_SECRET_LEN:
        raise ValueError("Malformed Authorization header: expected 'Bearer <key>'.")
    return _checked(secret)


def api_key_secret(value: str) -> str:
    """The secret of an `x-api-key` header (Anthropic's SDKs send the key there)."""
    secret = value.strip()
    if not secret or len(secret) > MAX_SECRET_LEN:
        raise ValueError("Malformed x-api-key header.")
    return _checked(secret)


def _checked(secret: str) -> str:
    if not (secret.isascii() and secret.isprintable()):
        # Keys are ASCII; header bytes that are not arrive as text that cannot be hashed.
        raise ValueError("Malformed API key: it must be printable ASCII.")
    return secret
