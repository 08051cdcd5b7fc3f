"""Who a request acts for. Every memory call is scoped to the tenant its credential maps to.

Today tokens are configured per tenant (`StaticTokens`). The Layer 7 daemon will issue per-task
tokens: it plugs in as another `Authenticator` that returns a `Principal` with `task` set, and the
HTTP API then also refuses any task but that one. Tenants never come from the URL or the body.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from agentnode.storage.keys import check_name

__all__ = ["OPERATOR_PREFIX", "Authenticator", "OperatorTenants", "Principal", "StaticTokens"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The tenant a credential acts for, and the one task it is limited to (None: any task)."""

    tenant: str
    task: str | None = None


class Authenticator(Protocol):
    """Maps a bearer token to a Principal, or None when the token is unknown."""

    def authenticate(self, token: str) -> Principal | None: ...


class StaticTokens:
    """Tokens configured per tenant: `StaticTokens({"token-a": "tenant-a", ...})`."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        # Keyed by digest: a lookup's timing depends on a hash of the token, not on the secret.
        self._by_digest = {
            hashlib.sha256(token.encode()).digest(): Principal(check_name("tenant", tenant))
            for token, tenant in tokens.items()
        }

    def authenticate(self, token: str) -> Principal | None:
        """The principal of `token`, or None."""
        # A header's bytes that are not UTF-8 arrive as lone surrogates: hashed as bytes.
        given = token.encode(errors="surrogateescape")
        return self._by_digest.get(hashlib.sha256(given).digest())


#: How an operator's bearer names the tenant it acts for: `tenant:<name>`.
OPERATOR_PREFIX = "tenant:"


class OperatorTenants:
    """The node's admin socket, where the caller is the operator (root or the `agentnode`
    group, by the socket's mode) and may act for any tenant: the bearer `tenant:<name>` names
    which one, and every call is scoped to it as a tenant's own token would be. Never use it
    where a connection does not already prove the caller is the operator."""

    def authenticate(self, token: str) -> Principal | None:
        """The principal `tenant:<name>` names (MemoryKeyError for a malformed name), or None."""
        if not token.startswith(OPERATOR_PREFIX):
            return None
        return Principal(check_name("tenant", token[len(OPERATOR_PREFIX) :]))
