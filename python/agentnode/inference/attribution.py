"""Who an inference request is billed to: a tenant, and the task that made it.

The proxy asks an `Attribution` for every request; on its own it goes by API key
(`key_attribution`), in the node by the task's token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from agentnode.inference.config import ProxyConfig, Tenant

__all__ = ["UNKNOWN_KEY", "Attribution", "Principal", "key_attribution"]

# What a request no attribution knows is told: where each kind of caller gets a key.
UNKNOWN_KEY = (
    "missing or unknown API key (a task uses its AGENTNODE_TOKEN, which the SDKs read from "
    "OPENAI_API_KEY/ANTHROPIC_API_KEY; others a key of [inference.tenants])"
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is billed to: a tenant's API key, or a task's own token in the node."""

    tenant: str
    task: str | None
    limits: Tenant | None
    #: Sees only its tenant's usage even without tenant limits (a task's own token).
    pinned: bool = False


Attribution = Callable[[web.Request, ProxyConfig], Principal | None]


def key_attribution(request: web.Request, config: ProxyConfig) -> Principal | None:
    """API key (Bearer or x-api-key) → tenant; `x-agentnode-task` names the task. None: unknown."""
    task = request.headers.get("x-agentnode-task") or None
    if not config.tenants:
        return Principal("default", task, None)
    auth = request.headers.get("Authorization", "")
    key = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key", "")
    for t in config.tenants.values():
        if key in t.api_keys:
            return Principal(t.name, task, t)
    return None
