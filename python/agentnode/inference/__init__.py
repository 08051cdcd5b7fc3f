"""Layer 4: the inference proxy (OpenAI- and Anthropic-compatible).

Agents point their SDK at it and get routing, retries, fallback, rate limits, exact cost per
tenant and task, budgets, caching and metrics. `agentnode proxy` runs it on its own.
"""

from agentnode.inference.config import ProxyConfig, load_config, parse_config
from agentnode.inference.server import Principal, create_app, key_attribution

__all__ = [
    "Principal",
    "ProxyConfig",
    "create_app",
    "key_attribution",
    "load_config",
    "parse_config",
]
