"""Which deployments a request may go to, in fallback order: the route's models in turn, and
within one model the deployments serving it by weight, with prefix affinity so a provider's
prompt cache hits."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable
from typing import Any

from agentnode.inference.call import Call
from agentnode.inference.config import Route
from agentnode.inference.upstream import DeploymentState

__all__ = ["Router"]

# Bytes of a request's leading part (tools, system, first messages) from which requests go to
# the deployment that has seen it: ~1,024 tokens, the shortest prefix providers cache.
_AFFINITY_MIN = 4096


class Router:
    """The deployments by the (kind, model) they serve: routing looks this up, never scans."""

    __slots__ = ("_pools",)

    def __init__(self, deployments: Iterable[DeploymentState]) -> None:
        self._pools: dict[tuple[str, str], list[DeploymentState]] = {}
        for state in deployments:
            for m in state.deployment.models:
                self._pools.setdefault((state.deployment.kind, m), []).append(state)

    def candidates(self, call: Call, route: Route | None) -> list[tuple[DeploymentState, str]]:
        """Deployments in fallback order; within one model, a weighted random order, or for a
        request with a long prefix, the same weighted order for every request sharing it."""
        out: list[tuple[DeploymentState, str]] = []
        for model in route.models if route else (call.model,):
            pool = self._pools.get((call.fmt, model))
            if pool is None:
                continue
            if len(pool) == 1:
                out.append((pool[0], model))
                continue
            prefix = _prefix_key(call)
            if prefix is not None:
                out.extend((s, model) for s in _rendezvous(pool, prefix))
                continue
            pool = list(pool)
            while pool:
                pick = random.choices(pool, weights=[s.deployment.weight for s in pool])[0]
                pool.remove(pick)
                out.append((pick, model))
        return out


def _prefix_key(call: Call) -> bytes | None:
    """A digest of what an agent resends unchanged on every step of one conversation (tools,
    system prompt, messages up to the first user message), or None when it is too short for a
    provider to cache."""
    p = call.payload
    messages = p.get("messages")
    first: list[Any] = []
    for m in messages if isinstance(messages, list) else ():
        first.append(m)
        if isinstance(m, dict) and m.get("role") == "user":
            break
    head = [p.get("tools"), p.get("system"), first]
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) < _AFFINITY_MIN:
        return None
    return hashlib.blake2b(raw, digest_size=16).digest()


def _rendezvous(pool: list[DeploymentState], key: bytes) -> list[DeploymentState]:
    """The pool in weighted rendezvous order for `key`: the same first choice for every request
    with this key while the pool is the same (so a provider's prompt cache, which lives with one
    deployment, hits), keys spread in proportion to the weights, and when the first choice is
    unavailable the next is again the same for all of them."""

    def score(s: DeploymentState) -> float:
        h = hashlib.blake2b(key + s.deployment.name.encode(), digest_size=8).digest()
        u = (int.from_bytes(h) + 1) / (2**64 + 1)  # uniform in (0, 1)
        return -s.deployment.weight / math.log(u)

    return sorted(pool, key=score, reverse=True)
