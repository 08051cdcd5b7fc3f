"""Per-task bearer tokens: a task proves who it is (e.g. to PUT its checkpoint) with one.

Only a SHA-256 of the token is stored, and verification compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["hash_token", "new_token", "verify_token"]


def new_token() -> tuple[str, str]:
    """A fresh token and the hash to store."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verify_token(token: str, stored_hash: str) -> bool:
    """True if `token` hashes to `stored_hash`; the comparison takes the same time either way."""
    return bool(stored_hash) and hmac.compare_digest(hash_token(token), stored_hash)
