"""Usage split into billing buckets, and its exact cost.

Providers count differently: OpenAI's `prompt_tokens` includes the cached tokens and
`completion_tokens` includes reasoning; Anthropic's `input_tokens` excludes cache reads and
writes, and splits the writes by cache TTL in `cache_creation` (1 h writes cost more). Both
are normalised into disjoint buckets before pricing, so no token is billed twice.
Costs are `Decimal`, never floats, so sums over a ledger stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agentnode.inference.config import Price

__all__ = ["Usage", "anthropic_usage", "cost", "openai_usage", "saving"]

_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Usage:
    """Disjoint token buckets: every token is in exactly one."""

    input: int = 0
    cached_input: int = 0
    #: Prompt-cache writes with the 5 min TTL (and any the provider does not split by TTL).
    cache_write: int = 0
    cache_write_1h: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return (
            self.input
            + self.cached_input
            + self.cache_write
            + self.cache_write_1h
            + self.output
            + self.reasoning
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "input": self.input,
            "cached_input": self.cached_input,
            "cache_write": self.cache_write,
            "cache_write_1h": self.cache_write_1h,
            "output": self.output,
            "reasoning": self.reasoning,
        }


def _int(d: Any, *path: str) -> int:
    for p in path:
        if not isinstance(d, dict):
            return 0
        d = d.get(p)
    return d if isinstance(d, int) and not isinstance(d, bool) else 0


def openai_usage(u: Any) -> Usage:
    """Chat/completions (`prompt_tokens`…), Responses (`input_tokens`…) and embeddings usage."""
    if "input_tokens" in (u or {}):
        prompt, completion = _int(u, "input_tokens"), _int(u, "output_tokens")
        cached = _int(u, "input_tokens_details", "cached_tokens")
        reasoning = _int(u, "output_tokens_details", "reasoning_tokens")
    else:
        prompt, completion = _int(u, "prompt_tokens"), _int(u, "completion_tokens")
        cached = _int(u, "prompt_tokens_details", "cached_tokens")
        reasoning = _int(u, "completion_tokens_details", "reasoning_tokens")
    cached = min(cached, prompt)
    reasoning = min(reasoning, completion)
    return Usage(
        input=prompt - cached,
        cached_input=cached,
        output=completion - reasoning,
        reasoning=reasoning,
    )


def anthropic_usage(u: Any) -> Usage:
    """Anthropic `usage`: input_tokens already excludes cache reads and writes, and
    `cache_creation` splits the writes by TTL. Writes it does not account for (an older API, or
    a split that falls short of the total) count at the 5 min price; a split that exceeds the
    total wins over it, so no written token goes unbilled."""
    one_hour = _int(u, "cache_creation", "ephemeral_1h_input_tokens")
    written = max(
        _int(u, "cache_creation_input_tokens"),
        one_hour + _int(u, "cache_creation", "ephemeral_5m_input_tokens"),
    )
    return Usage(
        input=_int(u, "input_tokens"),
        cached_input=_int(u, "cache_read_input_tokens"),
        cache_write=written - one_hour,
        cache_write_1h=one_hour,
        output=_int(u, "output_tokens"),
    )


def cost(usage: Usage, price: Price) -> Decimal:
    """USD, exact: sum of tokens times price per 1M tokens over the buckets."""
    return (
        usage.input * price.input
        + usage.cached_input * price.cached_input
        + usage.cache_write * price.cache_write
        + usage.cache_write_1h * price.cache_write_1h
        + usage.output * price.output
        + usage.reasoning * price.reasoning
    ) / _MILLION


def saving(usage: Usage, price: Price) -> Decimal:
    """USD the prompt cache saved: what the cached tokens (reads and writes) would have cost as
    plain input, minus what they cost. Negative when a write costs more than it saved."""
    cached = usage.cached_input + usage.cache_write + usage.cache_write_1h
    spent = (
        usage.cached_input * price.cached_input
        + usage.cache_write * price.cache_write
        + usage.cache_write_1h * price.cache_write_1h
    )
    return (cached * price.input - spent) / _MILLION
