"""One client request to the proxy: its endpoint and wire format, the checks its body must pass,
the estimate its rate limits are charged before the answer, the patch of its bytes, and the key
its answer is cached under."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from agentnode.inference.attribution import Principal
from agentnode.inference.config import Route

__all__ = [
    "ENDPOINTS",
    "FREE",
    "Call",
    "estimate_tokens",
    "patched",
    "response_cache_key",
    "validate",
]

# Endpoint name → (wire format, path appended to the deployment's base_url).
ENDPOINTS = {
    "chat": ("openai", "/chat/completions"),
    "completions": ("openai", "/completions"),
    "embeddings": ("openai", "/embeddings"),
    "responses": ("openai", "/responses"),
    "messages": ("anthropic", "/v1/messages"),
    "count_tokens": ("anthropic", "/v1/messages/count_tokens"),
}

#: Endpoints the provider does not bill and that generate nothing: no budget, rate limit or
#: cache applies (Claude Code counts tokens before most turns), though each call has its row.
FREE = frozenset({"count_tokens"})

# The field each endpoint cannot do without.
_REQUIRED = {
    "chat": "messages",
    "messages": "messages",
    "completions": "prompt",
    "embeddings": "input",
    "responses": "input",
    "count_tokens": "messages",
}


class Call:
    """One client request on its way through the proxy."""

    __slots__ = (
        "body",
        "cache_key",
        "endpoint",
        "fmt",
        "model",
        "payload",
        "principal",
        "route",
        "started",
        "stream",
        "tokens_estimate",
        "upstream_complete",
    )

    def __init__(
        self, endpoint: str, body: bytes, payload: dict[str, Any], principal: Principal
    ) -> None:
        self.endpoint = endpoint
        self.fmt = ENDPOINTS[endpoint][0]
        #: The client's bytes, sent upstream as they are unless something must be patched.
        self.body = body
        self.payload = payload
        self.principal = principal
        self.route: Route | None = None
        self.model: str = payload["model"]
        self.stream = payload.get("stream") is True
        self.started = time.monotonic()
        self.cache_key: bytes | None = None
        self.tokens_estimate = 0
        #: The upstream sent its stream's last event: its connection is worth keeping.
        self.upstream_complete = False


def validate(endpoint: str, payload: Any) -> str | None:
    """What is wrong with a request body for `endpoint`, in one line; None when nothing is."""
    if not isinstance(payload, dict):
        return "request body must be a JSON object"
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        return "'model' is required and must be a non-empty string"
    if "stream" in payload and not isinstance(payload["stream"], bool):
        return "'stream' must be true or false"
    if endpoint in FREE and "stream" in payload:
        return f"'stream' is not a field of {endpoint} (its answer is one small object)"
    field = _REQUIRED[endpoint]
    if field not in payload:
        return f"'{field}' is required"
    if endpoint in ("chat", "messages", "count_tokens") and not isinstance(
        payload["messages"], list
    ):
        return "'messages' must be a list"
    if endpoint == "messages" and not isinstance(payload.get("max_tokens"), int):
        return "'max_tokens' is required and must be an integer"
    return None


def estimate_tokens(body_bytes: int, payload: dict[str, Any]) -> int:
    """Before the call: ~4 bytes per prompt token plus the output cap. Never tokenizes."""
    out = payload.get("max_tokens") or payload.get("max_completion_tokens") or 0
    out = out or payload.get("max_output_tokens") or 0
    return body_bytes // 4 + (out if isinstance(out, int) else 0)


def patched(body: bytes, payload: dict[str, Any], changes: dict[str, Any]) -> bytes:
    """The client's body with top-level fields set. Fields it lacks are spliced in after the
    object's opening brace rather than re-serialising the body, which costs a long prompt's
    stream ~0.6 ms of its time to first token at 130 kB (and the body stays the client's own
    bytes); replacing a field re-serialises, in the client's key order. The body parsed as a
    JSON object with a model, so `{` comes first and a member follows."""
    if not changes:
        return body
    if not any(k in payload for k in changes):
        i = body.index(b"{") + 1
        members = json.dumps(changes, separators=(",", ":"), ensure_ascii=False).encode()
        return body[:i] + members[1:-1] + b"," + body[i:]
    whole = payload | changes
    return json.dumps(whole, separators=(",", ":"), ensure_ascii=False).encode()


def response_cache_key(tenant: str, endpoint: str, payload: dict[str, Any]) -> bytes:
    """Per tenant: a hit must not reveal what another tenant asked."""
    normal = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{tenant}\n{endpoint}\n{normal}".encode()).digest()
