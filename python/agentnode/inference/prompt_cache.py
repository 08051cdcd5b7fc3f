"""Prompt-prefix caching that clients get without changing code.

Anthropic caches a prompt's prefix only up to blocks marked with `cache_control`, at most 4 of
them, and only prefixes of a minimum length. Agents resend the same tools, system prompt and
growing conversation on every step, so the proxy marks, in this order and within the limit:
the last tool (the tools come first in Anthropic's prompt order), the last system block, the
last block of the newest message (the whole conversation so far, which the next step
extends and reads back) and the last block of the user message before it (what this step
reads, should the newest be too far ahead for the provider's 20-block lookback). A mark is
placed only where the prefix up to it is estimated long enough to be cached. A request whose
client set any marks of its own is left as it is: the client manages its cache, and mixing
TTLs is an ordering rule the proxy could break. Marking never changes meaning: a string
system prompt or message content becomes the single text block it stands for.

OpenAI-compatible providers cache every long prefix on their own and use `prompt_cache_key`
to send requests sharing one to the same machine: the proxy sets a stable key per task (or
tenant) where the client did not.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["MAX_BREAKPOINTS", "anthropic_marks", "cache_key", "has_marks"]

#: Anthropic's limit of blocks with `cache_control` in one request.
MAX_BREAKPOINTS = 4
# Blocks that cannot carry `cache_control` (Anthropic refuses it on thinking blocks).
_UNMARKABLE = frozenset({"thinking", "redacted_thinking"})


def has_marks(payload: dict[str, Any]) -> bool:
    """Whether the client put `cache_control` anywhere in a /v1/messages request."""
    if "cache_control" in payload:
        return True
    tools = payload.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and "cache_control" in t for t in tools):
        return True
    system = payload.get("system")
    if isinstance(system, list) and any(
        isinstance(b, dict) and "cache_control" in b for b in system
    ):
        return True
    for m in payload.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(
            isinstance(b, dict) and "cache_control" in b for b in content
        ):
            return True
    return False


def _size(value: Any) -> int:
    """Estimated tokens of a prompt part without serialising it: its strings' lengths / 4.
    Counting characters is ~10x cheaper than json.dumps and close enough for a threshold."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) + len(k) for k, v in value.items())
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    return 4


def anthropic_marks(payload: dict[str, Any], *, min_tokens: int, ttl: str) -> dict[str, Any] | None:
    """The top-level fields of a /v1/messages request to replace to add cache breakpoints
    (new lists and blocks: `payload` itself is not modified), or None to send it as it is."""
    if has_marks(payload):
        return None
    marker: dict[str, Any] = {"type": "ephemeral"}
    if ttl == "1h":
        marker["ttl"] = "1h"
    min_chars = min_tokens * 4
    changes: dict[str, Any] = {}
    budget = MAX_BREAKPOINTS
    prefix = 0
    tools = payload.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[-1], dict):
        prefix += _size(tools)
        if prefix >= min_chars:
            changes["tools"] = [*tools[:-1], tools[-1] | {"cache_control": marker}]
            budget -= 1
    system = payload.get("system")
    if isinstance(system, str) and system:
        system = [{"type": "text", "text": system}]
    if isinstance(system, list) and system and isinstance(system[-1], dict):
        prefix += _size(system)
        if prefix >= min_chars and system[-1].get("type") not in _UNMARKABLE:
            changes["system"] = [*system[:-1], system[-1] | {"cache_control": marker}]
            budget -= 1
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return changes or None
    # Cumulative sizes, to know which messages end a prefix long enough to cache; past the
    # minimum every later one does too, so they need no measuring.
    ends: list[int] = []
    for m in messages:
        if prefix < min_chars:
            prefix += _size(m)
        ends.append(prefix)
    picks: list[int] = []
    last = len(messages) - 1
    for i in (last, *(j for j in range(last - 1, -1, -1) if _role(messages[j]) == "user")):
        if len(picks) == min(budget, 2):
            break
        if ends[i] >= min_chars and _markable(messages[i]):
            picks.append(i)
        if i != last:
            break  # Only the user message nearest before the newest is worth a mark.
    if picks:
        new = list(messages)
        for i in picks:
            new[i] = _marked(messages[i], marker)
        changes["messages"] = new
    return changes or None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _markable(message: Any) -> bool:
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if isinstance(content, str):
        return bool(content)  # An empty text block is refused; an empty string is not.
    return (
        isinstance(content, list)
        and bool(content)
        and isinstance(content[-1], dict)
        and content[-1].get("type") not in _UNMARKABLE
    )


def _marked(message: dict[str, Any], marker: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, str):
        blocks = [{"type": "text", "text": content, "cache_control": marker}]
    else:
        blocks = [*content[:-1], content[-1] | {"cache_control": marker}]
    return message | {"content": blocks}


def cache_key(tenant: str, task: str | None, scope: str) -> str:
    """A stable `prompt_cache_key`: per task (or per tenant with scope "tenant"), never shared
    between tenants, and revealing neither name to the provider."""
    who = f"{tenant}\n{task}" if scope == "task" and task is not None else tenant
    return "agentnode-" + hashlib.sha256(who.encode()).hexdigest()[:24]
