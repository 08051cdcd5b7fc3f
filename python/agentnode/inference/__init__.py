"""Layer 4: the inference proxy (OpenAI- and Anthropic-compatible).

Agents point their SDK at it and get routing, retries, fallback, rate limits, exact cost per
tenant and task, budgets, caching and metrics. `agentnode proxy` runs it on its own.
"""

from typing import TYPE_CHECKING

from agentnode import _lazy

if TYPE_CHECKING:
    from agentnode.inference.attribution import Principal, key_attribution
    from agentnode.inference.config import ProxyConfig, load_config, parse_config
    from agentnode.inference.server import create_app

__all__ = [
    "Principal",
    "ProxyConfig",
    "create_app",
    "key_attribution",
    "load_config",
    "parse_config",
]

__getattr__ = _lazy.exports(
    __name__,
    {
        "ProxyConfig": "config",
        "load_config": "config",
        "parse_config": "config",
        "Principal": "attribution",
        "create_app": "server",
        "key_attribution": "attribution",
    },
)
