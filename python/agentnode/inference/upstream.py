"""The proxy's side of an upstream: what every request to a deployment reuses (URLs, headers,
timeouts, its rate windows and circuit breakers), and how its failures are told apart."""

from __future__ import annotations

from typing import Any

import aiohttp
from yarl import URL

from agentnode.inference.call import ENDPOINTS
from agentnode.inference.config import Deployment, ProxyConfig
from agentnode.inference.limits import Breaker, Window

__all__ = [
    "RETRYABLE",
    "DeploymentState",
    "Retryable",
    "passed_headers",
    "read_text",
    "retry_after_header",
]

# Headers of the provider's answer that the client's SDK reads: its request id (OpenAI's SDK
# `x-request-id`, Anthropic's `request-id`), which the provider's support asks for.
_PASSED = ("x-request-id", "request-id", "openai-processing-ms")

# Statuses besides 5xx that another try (or another deployment) may well answer.
RETRYABLE = frozenset({408, 409, 429})


class Retryable(Exception):
    """An upstream failure worth retrying or falling back from."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        retry_after: float | None = None,
        connection: bool = False,
    ):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        #: The deployment could not be reached at all: every model it serves is down with it.
        self.connection = connection


class DeploymentState:
    """A deployment's limiters and breakers, and what every request to it reuses: its URLs,
    headers and timeouts are built once, not per request.

    Breakers are per (deployment, model), as one model of a deployment may fail while the
    others serve; only failures to reach the deployment at all count against `breaker`, the
    deployment-wide one."""

    __slots__ = (
        "breaker",
        "deployment",
        "headers",
        "model_breakers",
        "rpm",
        "timeouts",
        "tpm",
        "urls",
    )

    def __init__(self, d: Deployment, config: ProxyConfig) -> None:
        self.deployment = d
        self.breaker = Breaker(config.breaker_failures, config.breaker_cooldown)
        self.model_breakers = {
            m: Breaker(config.breaker_failures, config.breaker_cooldown) for m in d.models
        }
        self.rpm = Window(f"deployment {d.name} rpm", d.rpm) if d.rpm else None
        self.tpm = Window(f"deployment {d.name} tpm", d.tpm) if d.tpm else None
        self.urls = {e: URL(d.base_url + path) for e, (_, path) in ENDPOINTS.items()}
        headers = {"Content-Type": "application/json"}
        if d.kind == "anthropic":
            headers["anthropic-version"] = "2023-06-01"  # the client's own, if sent, wins
            if d.api_key:
                headers["x-api-key"] = d.api_key
        elif d.api_key:
            headers["Authorization"] = f"Bearer {d.api_key}"
        self.headers = headers
        # Indexed by "is a stream". A whole answer sends nothing until it is done, so only
        # `timeout` bounds it (a reasoning model may think for minutes); a stream may last as
        # long as it keeps sending, each wait for its next bytes bounded by first_byte_timeout.
        self.timeouts = (
            aiohttp.ClientTimeout(total=d.timeout, sock_connect=d.connect_timeout),
            aiohttp.ClientTimeout(sock_connect=d.connect_timeout, sock_read=d.first_byte_timeout),
        )


async def read_text(upstream: aiohttp.ClientResponse) -> str:
    """An error response's body as text, for the message that names the failure."""
    raw = await upstream.read()
    return raw.decode("utf-8", "replace").strip()


def retry_after_header(headers: Any) -> float | None:
    """Seconds an upstream asked to wait (`retry-after-ms`, then `Retry-After`); None: no ask."""
    for name, scale in (("retry-after-ms", 0.001), ("Retry-After", 1.0)):
        v = headers.get(name)
        if v is not None:
            try:
                return max(0.0, float(v) * scale)
            except ValueError:
                continue
    return None


def passed_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    """The headers of `upstream`'s answer that go on to the client (see `_PASSED`)."""
    h = upstream.headers
    return {k: v for k in _PASSED if (v := h.get(k)) is not None}
