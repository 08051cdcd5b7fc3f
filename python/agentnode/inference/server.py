"""The proxy's HTTP server: OpenAI- and Anthropic-compatible endpoints over configured upstreams.

One request: attribute it to a tenant (and task), check budgets and tenant/task limits, try the
cache, then walk the route's deployments in fallback order (weighted within one model), each
with its own RPM/TPM window, circuit breaker and retries. Fallback happens only before the first
byte reaches the client; after that an upstream failure becomes an SSE error event. Usage is
split into buckets, priced exactly and written to the ledger off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from itertools import accumulate
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from yarl import URL

from agentnode.inference.config import Deployment, ProxyConfig, Route, Tenant
from agentnode.inference.errors import error_event, error_response
from agentnode.inference.limits import Breaker, Window
from agentnode.inference.pricing import Usage, anthropic_usage, cost, openai_usage, saving
from agentnode.inference.prompt_cache import anthropic_marks, cache_key
from agentnode.inference.store import LedgerRow, Store

__all__ = ["PROXY", "Attribution", "Principal", "Proxy", "create_app", "key_attribution"]

RETRYABLE = frozenset({408, 409, 429})
# Endpoint name → (wire format, path appended to the deployment's base_url).
ENDPOINTS = {
    "chat": ("openai", "/chat/completions"),
    "completions": ("openai", "/completions"),
    "embeddings": ("openai", "/embeddings"),
    "responses": ("openai", "/responses"),
    "messages": ("anthropic", "/v1/messages"),
}
# Request headers the client may send that the upstream must see (Anthropic's API version, betas).
_FORWARD = ("anthropic-version", "anthropic-beta", "openai-organization", "openai-project")
# Seconds a finished stream's connection may take to end its HTTP framing and be reused.
_TAIL_WAIT = 1.0
# Upper bounds of the latency histogram's buckets, +Inf last (Prometheus' defaults).
_LATENCY_BUCKETS = Histogram.DEFAULT_BUCKETS
_LATENCY_LE = tuple("+Inf" if b == float("inf") else repr(float(b)) for b in _LATENCY_BUCKETS)
# Bytes of a request's leading part (tools, system, first messages) from which requests go to
# the deployment that has seen it: ~1,024 tokens, the shortest prefix providers cache.
_AFFINITY_MIN = 4096
# The field each endpoint cannot do without.
_REQUIRED = {
    "chat": "messages",
    "messages": "messages",
    "completions": "prompt",
    "embeddings": "input",
    "responses": "input",
}


_UNKNOWN_KEY = (
    "missing or unknown API key (a task uses its AGENTNODE_TOKEN, which the SDKs read from "
    "OPENAI_API_KEY/ANTHROPIC_API_KEY; others a key of [inference.tenants])"
)
_MAX_BODY = 64 << 20
_TOO_LARGE = f"request body is over the {_MAX_BODY}-byte limit"


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


class _Retryable(Exception):
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


class _DeploymentState:
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
        # Indexed by "is a stream": a stream may last as long as it keeps sending.
        self.timeouts = tuple(
            aiohttp.ClientTimeout(
                total=None if stream else d.timeout,
                sock_connect=d.connect_timeout,
                sock_read=d.first_byte_timeout,
            )
            for stream in (False, True)
        )


class _Call:
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


class _Metrics:
    """The proxy's Prometheus metrics, counted in plain dicts on the event loop and turned into
    metric families only when /metrics is scraped. prometheus_client's labelled children take a
    lock and go through several calls on every update; at ~8 updates a request that came to
    ~30 µs of a request's ~330 µs of CPU (old and new proxy side by side at 64 concurrent)."""

    __slots__ = ("attempts", "cache_hits", "cost", "latency", "registry", "requests", "tokens")

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.attempts: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.cost: defaultdict[str, float] = defaultdict(float)
        #: Per endpoint: a count per latency bucket (not cumulative), then the sum of seconds.
        self.latency: dict[str, list[float]] = {}
        self.cache_hits = 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def observe(self, endpoint: str, seconds: float) -> None:
        h = self.latency.get(endpoint)
        if h is None:
            h = self.latency[endpoint] = [0] * (len(_LATENCY_BUCKETS) + 1)
        h[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        """The metric families, for the registry's scrape."""
        requests = CounterMetricFamily(
            "agentnode_inference_requests", "Requests", labels=["endpoint", "status"]
        )
        for (endpoint, status), n in self.requests.items():
            requests.add_metric([endpoint, str(status)], n)
        attempts = CounterMetricFamily(
            "agentnode_inference_upstream_attempts",
            "Upstream attempts",
            labels=["deployment", "outcome"],
        )
        for labels, n in self.attempts.items():
            attempts.add_metric(labels, n)
        tokens = CounterMetricFamily(
            "agentnode_inference_tokens", "Tokens by bucket", labels=["tenant", "bucket"]
        )
        for labels, n in self.tokens.items():
            tokens.add_metric(labels, n)
        cost = CounterMetricFamily("agentnode_inference_cost_usd", "Cost", labels=["tenant"])
        for tenant, usd in self.cost.items():
            cost.add_metric([tenant], usd)
        latency = HistogramMetricFamily(
            "agentnode_inference_latency_seconds", "Request latency", labels=["endpoint"]
        )
        for endpoint, h in self.latency.items():
            buckets = list(zip(_LATENCY_LE, accumulate(h[:-1]), strict=True))
            latency.add_metric([endpoint], buckets, sum_value=h[-1])
        yield requests
        yield attempts
        yield tokens
        yield cost
        yield CounterMetricFamily(
            "agentnode_inference_cache_hits", "Cache hits", value=self.cache_hits
        )
        yield latency


class Proxy:
    """Request handling state: config, one ClientSession, store, limiters, breakers, metrics."""

    def __init__(
        self,
        config: ProxyConfig,
        store: Store,
        session: aiohttp.ClientSession,
        *,
        attribution: Attribution = key_attribution,
    ) -> None:
        self.config = config
        self.store = store
        self.session = session
        self.attribution = attribution
        self.deployments = {n: _DeploymentState(d, config) for n, d in config.deployments.items()}
        # (kind, model) → the deployments serving it: routing looks this up, never scans.
        self._pools: dict[tuple[str, str], list[_DeploymentState]] = {}
        for state in self.deployments.values():
            for m in state.deployment.models:
                self._pools.setdefault((state.deployment.kind, m), []).append(state)
        self.tenant_windows: dict[tuple[str, str, str | None], Window] = {}
        self.metrics = _Metrics()
        self._tails: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stops waiting for the ends of finished upstream streams (called at shutdown)."""
        for t in self._tails:
            t.cancel()
        await asyncio.gather(*self._tails, return_exceptions=True)

    # ---- entry points -----------------------------------------------------------------------

    async def handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        fmt = ENDPOINTS[endpoint][0]
        # Authenticate first: a stranger learns nothing, not even how we validate bodies.
        principal = self.attribution(request, self.config)
        if principal is None:
            return self._reject(endpoint, fmt, 401, _UNKNOWN_KEY, "invalid_api_key")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(endpoint, fmt, 413, _TOO_LARGE, "request_too_large")
        try:
            # Strictly UTF-8 (json.loads would take UTF-16 too): these bytes go upstream as-is.
            payload = json.loads(body.decode())
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, an int of 4,300+ digits
            return self._reject(
                endpoint, fmt, 400, "request body is not valid JSON", "invalid_json"
            )
        except RecursionError:
            return self._reject(
                endpoint, fmt, 400, "request body is nested too deeply", "invalid_json"
            )
        problem = _validate(endpoint, payload)
        if problem:
            return self._reject(endpoint, fmt, 400, problem, "invalid_request")
        call = _Call(endpoint, body, payload, principal)
        call.tokens_estimate = _estimate_tokens(len(body), payload)
        refusal = self._admit(call)
        if refusal is not None:
            return refusal
        route_name = request.headers.get("x-agentnode-route") or call.model
        route = call.route = self.config.routes.get(route_name)
        cache_header = request.headers.get("x-agentnode-cache", "").lower()
        if cache_header == "on" or (cache_header != "off" and route is not None and route.cache):
            call.cache_key = _cache_key(principal.tenant, endpoint, payload)
            hit = await self.store.cache_get(call.cache_key)
            if hit is not None:
                return await self._replay(request, call, *hit)
        return await self._forward(request, call, route)

    def _reject(
        self,
        endpoint: str,
        fmt: str,
        status: int,
        message: str,
        code: str,
        retry_after: float | None = None,
    ) -> web.Response:
        self.metrics.requests[(endpoint, status)] += 1
        return error_response(fmt, status, message, code=code, retry_after=retry_after)

    def _admit(self, call: _Call) -> web.Response | None:
        """Budgets, then the tenant's and task's rate limits; a refusal names what was hit."""
        p, fmt = call.principal, call.fmt
        t = p.limits
        if t is None:
            return None
        if t.budget is not None and self.store.tenant_spend[p.tenant] >= t.budget:
            spent = self.store.tenant_spend[p.tenant]
            return self._reject(
                call.endpoint,
                fmt,
                402,
                f"budget exceeded for tenant {p.tenant}: spent ${spent} of ${t.budget} "
                "(raise inference.tenants.<name>.budget)",
                "budget_exceeded",
            )
        if (
            p.task is not None
            and t.task_budget is not None
            and self.store.task_spend[(p.tenant, p.task)] >= t.task_budget
        ):
            return self._reject(
                call.endpoint,
                fmt,
                402,
                f"budget exceeded for task {p.task} of tenant {p.tenant}: "
                f"spent ${self.store.task_spend[(p.tenant, p.task)]} of ${t.task_budget}",
                "budget_exceeded",
            )
        checks: list[tuple[Window, float]] = []
        if t.rpm:
            checks.append(
                (self._window(("rpm", p.tenant, None), f"tenant {p.tenant} rpm", t.rpm), 1)
            )
        if t.tpm:
            w = self._window(("tpm", p.tenant, None), f"tenant {p.tenant} tpm", t.tpm)
            checks.append((w, call.tokens_estimate))
        if t.task_rpm and p.task is not None:
            w = self._window(("rpm", p.tenant, p.task), f"task {p.task} rpm", t.task_rpm)
            checks.append((w, 1))
        for w, amount in checks:
            wait = w.wait_time(amount)
            if wait > 0:
                return self._reject(
                    call.endpoint,
                    fmt,
                    429,
                    f"rate limit exceeded: {w.name} limit is {w.limit} per minute "
                    f"(retry after {wait:.1f} s)",
                    "rate_limit_exceeded",
                    retry_after=wait,
                )
        for w, amount in checks:
            w.take(amount)
        return None

    def _window(self, key: tuple[str, str, str | None], name: str, limit: int) -> Window:
        w = self.tenant_windows.get(key)
        if w is None:
            w = self.tenant_windows[key] = Window(name, limit)
        return w

    # ---- routing and retries ----------------------------------------------------------------

    def _candidates(self, call: _Call, route: Route | None) -> list[tuple[_DeploymentState, str]]:
        """Deployments in fallback order; within one model, a weighted random order, or for a
        request with a long prefix, the same weighted order for every request sharing it."""
        out: list[tuple[_DeploymentState, str]] = []
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

    async def _forward(
        self, request: web.Request, call: _Call, route: Route | None
    ) -> web.StreamResponse:
        candidates = self._candidates(call, route)
        if not candidates:
            return self._reject(
                call.endpoint,
                call.fmt,
                404,
                f"model {call.model!r} is not served here (GET /v1/models lists the models)",
                "model_not_found",
            )
        errors: list[str] = []
        limited: list[tuple[str, float]] = []
        last_status, last_retry_after = 502, None
        for state, model in candidates:
            d = state.deployment
            model_breaker = state.model_breakers[model]
            if not state.breaker.allows():
                errors.append(f"{d.name}: circuit open after repeated connection failures")
                continue
            if not model_breaker.allows():
                errors.append(f"{d.name}: circuit for {model} open after repeated failures")
                continue
            wait = self._deployment_wait(state, call)
            if wait > self.config.max_wait:
                limited.append((f"deployment {d.name}", wait))
                continue
            if wait > 0:
                await asyncio.sleep(wait)
            tpm_entry = state.tpm.take(call.tokens_estimate) if state.tpm else None
            if state.rpm:
                state.rpm.take(1)
            for attempt in range(d.retries + 1):
                try:
                    response = await self._attempt(request, call, state, model, tpm_entry)
                except _Retryable as e:
                    self.metrics.attempts[(d.name, "retryable")] += 1
                    breaker = state.breaker if e.connection else model_breaker
                    breaker.failure()
                    errors.append(f"{d.name}: {e}")
                    last_status, last_retry_after = e.status, e.retry_after
                    if attempt == d.retries or not breaker.allows():
                        break
                    if e.retry_after is not None:
                        if e.retry_after > self.config.max_retry_after:
                            break  # Waiting that long is worse than the next deployment.
                        delay = e.retry_after
                    else:
                        delay = random.uniform(0, self.config.backoff_base * 2**attempt)
                    await asyncio.sleep(delay)
                    continue
                self.metrics.attempts[(d.name, "ok")] += 1
                state.breaker.success()
                model_breaker.success()
                return response
        if limited and not errors:
            what, wait = min(limited, key=lambda x: x[1])
            return self._reject(
                call.endpoint,
                call.fmt,
                429,
                f"rate limit exceeded: {what} is at its RPM/TPM limit (retry after {wait:.1f} s)",
                "rate_limit_exceeded",
                retry_after=wait,
            )
        # The upstream's own 429/503/504 (and its Retry-After) tell the client more than a 502.
        status = last_status if last_status in (429, 503, 504) else 502
        return self._reject(
            call.endpoint,
            call.fmt,
            status,
            "every upstream failed: " + "; ".join(errors),
            "upstream_failed",
            retry_after=last_retry_after if status in (429, 503) else None,
        )

    def _deployment_wait(self, state: _DeploymentState, call: _Call) -> float:
        wait = 0.0
        if state.rpm:
            wait = state.rpm.wait_time(1)
        if state.tpm:
            wait = max(wait, state.tpm.wait_time(call.tokens_estimate))
        return wait

    async def _attempt(
        self,
        request: web.Request,
        call: _Call,
        state: _DeploymentState,
        model: str,
        tpm_entry: list[float] | None,
    ) -> web.StreamResponse:
        d = state.deployment
        # OpenAI streams report usage only when asked: ask always, hide it if the client didn't.
        wants_usage = True
        if call.stream and call.endpoint in ("chat", "completions"):
            opts = call.payload.get("stream_options")
            wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        changes = self._prompt_cache(call, d)
        if model != call.model:
            changes["model"] = model
        if not wants_usage:
            opts = call.payload.get("stream_options")
            changes["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
        body = _patched(call.body, call.payload, changes)
        headers = state.headers
        forwarded = {k: v for k in _FORWARD if (v := request.headers.get(k))}
        if forwarded:
            headers = headers | forwarded
        url = state.urls[call.endpoint]
        try:
            upstream = await self.session.post(
                url, data=body, headers=headers, timeout=state.timeouts[call.stream]
            )
        except TimeoutError as e:
            # Only a connect that timed out is the deployment's; a slow answer is the model's.
            connecting = isinstance(e, aiohttp.ConnectionTimeoutError)
            raise _Retryable(
                f"timed out after {d.connect_timeout if connecting else d.first_byte_timeout} s "
                + ("connecting" if connecting else "waiting for the response"),
                status=504,
                connection=connecting,
            ) from None
        except aiohttp.ClientError as e:
            raise _Retryable(f"cannot reach {url}: {e}", connection=True) from None
        try:
            if upstream.status in RETRYABLE or upstream.status >= 500:
                text = await _read_text(upstream)
                raise _Retryable(
                    f"HTTP {upstream.status}: {text[:200]}",
                    status=upstream.status,
                    retry_after=_retry_after(upstream.headers),
                )
            if upstream.status != 200:
                # The client's own mistake: pass the provider's error through unchanged.
                raw = await upstream.read()
                self._finish(call, d, model, upstream.status, Usage(), cache_hit=False)
                return web.Response(
                    body=raw, status=upstream.status, content_type="application/json"
                )
            if call.stream:
                return await self._stream(
                    request, call, state, model, upstream, wants_usage, tpm_entry
                )
            return await self._complete(call, state, model, upstream, tpm_entry)
        except TimeoutError:
            raise _Retryable(f"no response within {d.first_byte_timeout} s", status=504) from None
        except aiohttp.ClientError as e:
            raise _Retryable(f"connection failed: {e}") from None
        finally:
            # A fully read response returns its connection to the pool; anything else (client
            # gone, error) closes it, which is what cancels the upstream's work.
            if upstream.content.at_eof():
                upstream.release()
            elif call.upstream_complete:
                self._release_after_tail(upstream)
            else:
                upstream.close()

    def _prompt_cache(self, call: _Call, d: Deployment) -> dict[str, Any]:
        """Top-level fields to set so the provider's prompt cache hits (see prompt_cache)."""
        route = call.route
        mode = (route.prompt_cache if route else None) or d.prompt_cache
        if mode == "off" or (mode == "auto" and call.principal.task is None):
            return {}
        if d.kind == "anthropic":
            if call.endpoint != "messages":
                return {}
            ttl = (route.prompt_cache_ttl if route else None) or d.prompt_cache_ttl
            marks = anthropic_marks(call.payload, min_tokens=d.prompt_cache_min_tokens, ttl=ttl)
            return marks or {}
        if (
            d.prompt_cache_key != "off"
            and call.endpoint in ("chat", "responses")
            and "prompt_cache_key" not in call.payload
        ):
            p = call.principal
            return {"prompt_cache_key": cache_key(p.tenant, p.task, d.prompt_cache_key)}
        return {}

    def _release_after_tail(self, upstream: aiohttp.ClientResponse) -> None:
        """A stream whose last event came but whose HTTP framing has not ended yet (the final
        empty chunk is often a packet behind) keeps its connection once that arrives: a fresh
        TCP connection per stream would cost the next request a connect."""

        async def tail() -> None:
            try:
                async with asyncio.timeout(_TAIL_WAIT):
                    while await upstream.content.readany():
                        pass  # Nothing after the last event is the client's business.
            except (TimeoutError, aiohttp.ClientError):
                upstream.close()
            else:
                upstream.release()

        t = asyncio.create_task(tail())
        self._tails.add(t)
        t.add_done_callback(self._tails.discard)

    async def _complete(
        self,
        call: _Call,
        state: _DeploymentState,
        model: str,
        upstream: aiohttp.ClientResponse,
        tpm_entry: list[float] | None,
    ) -> web.Response:
        d = state.deployment
        raw = await upstream.read()
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            raise _Retryable(
                f"deployment {d.name} returned a body that is not JSON ({len(raw)} bytes)"
            ) from None
        usage = (anthropic_usage if d.kind == "anthropic" else openai_usage)(obj.get("usage"))
        if tpm_entry is not None and state.tpm:
            state.tpm.adjust(tpm_entry, usage.total)
        self._finish(call, d, model, 200, usage, cache_hit=False)
        if call.cache_key is not None:
            self.store.cache_put(call.cache_key, {"stream": False}, raw, self.config.cache_ttl)
        return web.Response(body=raw, content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        call: _Call,
        state: _DeploymentState,
        model: str,
        upstream: aiohttp.ClientResponse,
        wants_usage: bool,
        tpm_entry: list[float] | None,
    ) -> web.StreamResponse:
        d = state.deployment
        events = _sse_events(upstream)
        # Fallback stays possible until the first event: read it before answering the client.
        try:
            first = await anext(events)
        except StopAsyncIteration:
            raise _Retryable(f"deployment {d.name} closed the stream before any event") from None
        except ValueError as e:
            raise _Retryable(f"deployment {d.name} sent a stream that is not SSE: {e}") from None
        response = _EventStream(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        reader = _UsageReader(d.kind, call.endpoint, wants_usage)
        sent: list[bytes] | None = [] if call.cache_key is not None else None
        status = 200
        event: bytes | None = first
        try:
            while event is not None:
                out = reader.feed(event)
                call.upstream_complete = reader.done
                if out is not None:
                    await response.write(out)
                    if sent is not None:
                        sent.append(out)
                # Past the last event, a connection the upstream drops or half-closes must not
                # turn a complete answer into a 502 (nor keep it out of the cache).
                event = None if reader.done else await anext(events, None)
        except (asyncio.CancelledError, ConnectionResetError):
            # First: aiohttp's ClientConnectionResetError from writing to a gone client is also
            # a ClientError, and must not be mistaken for an upstream failure below.
            # The client left; _attempt closes the upstream. Bill what is known (Anthropic
            # reports input tokens up front) with nginx's "client closed request" status.
            self._finish(call, d, model, 499, reader.usage(), cache_hit=False)
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            status = 502
            what = "timed out" if isinstance(e, TimeoutError) else f"failed: {e}"
            await response.write(
                error_event(call.fmt, f"upstream {d.name} {what} mid-stream (partial response)")
            )
        usage = reader.usage()
        if tpm_entry is not None and state.tpm:
            state.tpm.adjust(tpm_entry, usage.total)
        self._finish(call, d, model, status, usage, cache_hit=False)
        if sent is not None and status == 200 and call.cache_key is not None:
            self.store.cache_put(
                call.cache_key, {"stream": True}, b"".join(sent), self.config.cache_ttl
            )
        await response.write_eof()
        return response

    async def _replay(
        self, request: web.Request, call: _Call, meta: dict[str, Any], body: bytes
    ) -> web.StreamResponse:
        self.metrics.cache_hits += 1
        self._finish(call, None, call.model, 200, Usage(), cache_hit=True)
        headers = {"x-agentnode-cache": "hit"}
        if not meta["stream"]:
            return web.Response(body=body, content_type="application/json", headers=headers)
        response = web.StreamResponse(headers=headers | {"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    def _finish(
        self,
        call: _Call,
        d: Deployment | None,
        model: str,
        status: int,
        usage: Usage,
        *,
        cache_hit: bool,
    ) -> None:
        """Metrics and spend now, so budgets see it at once; the ledger row is queued for the
        next group commit, which happens even if the client has left."""
        price = saved = Decimal(0)
        if d is not None:
            p = d.price_of(model)
            price, saved = cost(usage, p), saving(usage, p)
        latency = time.monotonic() - call.started
        tenant = call.principal.tenant
        m = self.metrics
        m.requests[(call.endpoint, status)] += 1
        m.observe(call.endpoint, latency)
        m.cost[tenant] += float(price)
        buckets = usage.as_dict()
        for bucket, n in buckets.items():
            if n:
                m.tokens[(tenant, bucket)] += n
        row = LedgerRow(
            time=time.time(),
            tenant=tenant,
            task=call.principal.task,
            model=model,
            deployment=d.name if d else None,
            endpoint=call.endpoint,
            status=status,
            cost=str(price),
            saving=str(saved),
            latency_ms=round(latency * 1000, 3),
            cache_hit=cache_hit,
            stream=call.stream,
            **buckets,
        )
        self.store.record(row)


class _EventStream(web.StreamResponse):
    """An SSE response whose headers leave with its first event, in one packet: it is only
    prepared once that event is in hand, so sending the headers alone would just cost the
    client an extra wakeup before its first token. (aiohttp ≥ 3.12 reads this flag.)"""

    _send_headers_immediately = False


class _UsageReader:
    """Reads usage out of SSE events and decides what the client sees."""

    __slots__ = ("_anthropic", "_kind", "_openai", "_responses", "_strip", "done")

    def __init__(self, kind: str, endpoint: str, wants_usage: bool) -> None:
        self._kind = kind
        self._responses = endpoint == "responses"
        self._strip = endpoint in ("chat", "completions") and not wants_usage
        self._anthropic: dict[str, Any] = {}
        self._openai: Any = None
        #: The stream's last event has been fed: what the upstream does after it is moot.
        self.done = False

    def feed(self, event: bytes) -> bytes | None:
        self.done = _is_last(event)
        if self._kind == "anthropic":
            if b"message_start" in event or b"message_delta" in event:
                obj = _data(event)
                if obj.get("type") == "message_start":
                    self._anthropic.update(obj.get("message", {}).get("usage") or {})
                elif obj.get("type") == "message_delta":
                    self._anthropic.update(obj.get("usage") or {})
            return event
        if self._responses:
            if b"response.completed" in event:
                self._openai = _data(event).get("response", {}).get("usage")
            return event
        # With include_usage every chunk carries `"usage":null`: no need to parse those. The
        # bytes `"usage":null` cannot occur inside a JSON string (its quotes would be escaped),
        # and a single `"usage"` means no other usage object hides elsewhere in the chunk.
        n = event.count(b'"usage"')
        if n == 0 or (n == 1 and (b'"usage":null' in event or b'"usage": null' in event)):
            return event
        obj = _data(event)
        if obj.get("usage"):
            self._openai = obj["usage"]
            if self._strip:
                if not obj.get("choices"):
                    return None  # The usage-only chunk the client did not ask for.
                del obj["usage"]
                return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        return event

    def usage(self) -> Usage:
        if self._kind == "anthropic":
            return anthropic_usage(self._anthropic)
        return openai_usage(self._openai)


def _is_last(event: bytes) -> bool:
    """Whether `event` ends its stream: OpenAI's [DONE], Anthropic's message_stop, or the
    Responses API's response.completed."""
    return (
        event.rstrip().endswith(b"data: [DONE]")
        or b"event: message_stop" in event
        or b"event: response.completed" in event
    )


def _data(event: bytes) -> dict[str, Any]:
    """The JSON of an SSE event's data lines ({} when there is none); ValueError on garbage."""
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines or lines == [b"[DONE]"]:
        return {}
    obj = json.loads(b"\n".join(lines))
    if not isinstance(obj, dict):
        raise ValueError("an SSE event's data is not a JSON object")
    return obj


async def _sse_events(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Whole SSE events (each ending in a blank line) as they arrive, never re-chunked."""
    buf = b""
    async for chunk in upstream.content.iter_any():
        buf += chunk
        if b"\r" in buf:  # CRLF framing, on buf so a CR/LF pair split across chunks joins
            buf = buf.replace(b"\r\n", b"\n")
        while (i := buf.find(b"\n\n")) >= 0:
            yield buf[: i + 2]
            buf = buf[i + 2 :]
    if buf.strip():
        raise ValueError("the upstream stream ended inside an event")


async def _read_text(upstream: aiohttp.ClientResponse) -> str:
    raw = await upstream.read()
    return raw.decode("utf-8", "replace").strip()


def _patched(body: bytes, payload: dict[str, Any], changes: dict[str, Any]) -> bytes:
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
    patched = payload | changes
    return json.dumps(patched, separators=(",", ":"), ensure_ascii=False).encode()


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("Retry-After", 1.0)):
        v = headers.get(name)
        if v is not None:
            try:
                return max(0.0, float(v) * scale)
            except ValueError:
                continue
    return None


def _validate(endpoint: str, payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return "request body must be a JSON object"
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        return "'model' is required and must be a non-empty string"
    if "stream" in payload and not isinstance(payload["stream"], bool):
        return "'stream' must be true or false"
    field = _REQUIRED[endpoint]
    if field not in payload:
        return f"'{field}' is required"
    if endpoint in ("chat", "messages") and not isinstance(payload["messages"], list):
        return "'messages' must be a list"
    if endpoint == "messages" and not isinstance(payload.get("max_tokens"), int):
        return "'max_tokens' is required and must be an integer"
    return None


def _estimate_tokens(body_bytes: int, payload: dict[str, Any]) -> int:
    """Before the call: ~4 bytes per prompt token plus the output cap. Never tokenizes."""
    out = payload.get("max_tokens") or payload.get("max_completion_tokens") or 0
    out = out or payload.get("max_output_tokens") or 0
    return body_bytes // 4 + (out if isinstance(out, int) else 0)


def _prefix_key(call: _Call) -> bytes | None:
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


def _rendezvous(pool: list[_DeploymentState], key: bytes) -> list[_DeploymentState]:
    """The pool in weighted rendezvous order for `key`: the same first choice for every request
    with this key while the pool is the same (so a provider's prompt cache, which lives with one
    deployment, hits), keys spread in proportion to the weights, and when the first choice is
    unavailable the next is again the same for all of them."""

    def score(s: _DeploymentState) -> float:
        h = hashlib.blake2b(key + s.deployment.name.encode(), digest_size=8).digest()
        u = (int.from_bytes(h) + 1) / (2**64 + 1)  # uniform in (0, 1)
        return -s.deployment.weight / math.log(u)

    return sorted(pool, key=score, reverse=True)


def _cache_key(tenant: str, endpoint: str, payload: dict[str, Any]) -> bytes:
    """Per tenant: a hit must not reveal what another tenant asked."""
    normal = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{tenant}\n{endpoint}\n{normal}".encode()).digest()


PROXY = web.AppKey("proxy", Proxy)
# Whether every route needs a credential (`create_app(require_credential=...)`).
_REQUIRE = web.AppKey("require_credential", bool)


def _credential(request: web.Request) -> Principal | web.Response | None:
    """For the routes that are not endpoints: with `require_credential`, the caller's principal,
    or a 401 in its provider's format; None when no credential is required. (Checked in each
    handler rather than by a middleware: a middleware would cost every endpoint request a
    wrapper, in the proxy's hot path.)"""
    proxy = request.app[PROXY]
    if not request.app[_REQUIRE]:
        return None
    principal = proxy.attribution(request, proxy.config)
    if principal is None:
        return error_response(_caller_format(request), 401, _UNKNOWN_KEY, code="invalid_api_key")
    return principal


async def _unrouted(request: web.Request) -> web.Response:
    """Whatever no route serves: 404, or 405 for a known path, in the caller's provider format
    (aiohttp's own answers are plain text), after the credential if one is required."""
    refused = _credential(request)
    if isinstance(refused, web.Response):
        return refused
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            allowed |= (await resource.resolve(request))[1]
    fmt = _caller_format(request)
    where = f"{request.method} {request.path}"
    if not allowed:
        return error_response(fmt, 404, f"Not Found: {where}", code="not_found")
    answer = error_response(
        fmt,
        405,
        f"Method Not Allowed: {where} (use {', '.join(sorted(allowed))})",
        code="method_not_allowed",
    )
    answer.headers["Allow"] = ",".join(sorted(allowed))
    return answer


def create_app(
    config: ProxyConfig,
    *,
    attribution: Attribution = key_attribution,
    require_credential: bool = False,
    on_row: Callable[[LedgerRow], object] | None = None,
) -> web.Application:
    """The aiohttp application; the store and the shared ClientSession live in cleanup_ctx.

    `require_credential` (the node's proxy, which tasks reach under every egress policy): every
    route needs a key `attribution` knows, and a task's token cannot read the proxy's metrics
    (they hold every tenant's spend). `on_row` sees every ledger row as it is recorded (the
    node's audit log)."""
    app = web.Application(client_max_size=_MAX_BODY)
    app[_REQUIRE] = require_credential

    async def resources(app: web.Application) -> AsyncIterator[None]:
        store = await Store.open(config.state_dir, retention_days=config.ledger_retention_days)
        store.on_record = on_row
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        # No cookie jar: one session serves every tenant, and no upstream cookie may cross over.
        session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar()
        )
        proxy = Proxy(config, store, session, attribution=attribution)
        app[PROXY] = proxy
        try:
            yield
        finally:
            await proxy.close()
            await session.close()
            await store.close()

    app.cleanup_ctx.append(resources)

    def endpoint(name: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await request.app[PROXY].handle(request, name)

        return handler

    app.router.add_post("/v1/chat/completions", endpoint("chat"))
    app.router.add_post("/v1/completions", endpoint("completions"))
    app.router.add_post("/v1/embeddings", endpoint("embeddings"))
    app.router.add_post("/v1/responses", endpoint("responses"))
    app.router.add_post("/v1/messages", endpoint("messages"))
    app.router.add_get("/v1/models", _models)
    # [\s\S], not '.': a path may hold a newline (%0A), which '.' leaves to aiohttp's
    # plain-text 404.
    app.router.add_get(r"/v1/models/{model_id:[\s\S]+}", _model)
    app.router.add_get("/v1/usage", _usage)
    app.router.add_get("/metrics", _metrics)
    # Last: tried only once no route above matched the path and method.
    app.router.add_route("*", r"/{tail:[\s\S]*}", _unrouted)
    return app


def _served_models(config: ProxyConfig, kind: str | None) -> list[str]:
    """Model and route names a client can call, sorted; of one deployment kind if given."""
    names = {m for d in config.deployments.values() if kind in (None, d.kind) for m in d.models}
    return sorted(names | {r.name for r in config.routes.values() if names & set(r.models)})


# Anthropic's API reports release dates; the proxy has none, and its docs allow the epoch.
_EPOCH = "1970-01-01T00:00:00Z"


def _model_object(fmt: str, name: str) -> dict[str, Any]:
    if fmt == "anthropic":
        return {
            "type": "model",
            "id": name,
            "display_name": name,
            "created_at": _EPOCH,
            "lifecycle": "active",
        }
    return {"id": name, "object": "model", "created": 0, "owned_by": "agentnode"}


def _caller_format(request: web.Request) -> str:
    """Anthropic's SDK sends `anthropic-version` on every request; OpenAI's never does."""
    return "anthropic" if "anthropic-version" in request.headers else "openai"


async def _model(request: web.Request) -> web.Response:
    """One model (`GET /v1/models/{id}`) in the caller's format; 404 when not served here."""
    refused = _credential(request)
    if isinstance(refused, web.Response):
        return refused
    fmt = _caller_format(request)
    name = request.match_info["model_id"]
    if name not in _served_models(request.app[PROXY].config, fmt if fmt == "anthropic" else None):
        return error_response(
            fmt,
            404,
            f"model {name!r} is not served here (GET /v1/models lists the models)",
            code="model_not_found",
        )
    return web.json_response(_model_object(fmt, name))


async def _models(request: web.Request) -> web.Response:
    """The models list in the caller's format (see `_caller_format`)."""
    refused = _credential(request)
    if isinstance(refused, web.Response):
        return refused
    cfg = request.app[PROXY].config
    if _caller_format(request) == "openai":
        data = [_model_object("openai", n) for n in _served_models(cfg, None)]
        return web.json_response({"object": "list", "data": data})
    names = _served_models(cfg, "anthropic")
    # Anthropic pages with limit (default 20, at most 1000) and the after_id/before_id cursors.
    q = request.query
    limit_arg = q.get("limit", "20")
    if not (limit_arg.isascii() and limit_arg.isdigit() and len(limit_arg) <= 4) or not (
        1 <= int(limit_arg) <= 1000
    ):
        return error_response(
            "anthropic",
            400,
            f"limit={limit_arg!r} must be an integer from 1 to 1000",
            code="invalid_request",
        )
    limit = int(limit_arg)
    for cursor in ("after_id", "before_id"):
        if cursor in q and q[cursor] not in names:
            return error_response(
                "anthropic",
                400,
                f"{cursor}={q[cursor]!r} is not a model listed here",
                code="invalid_request",
            )
    if "before_id" in q:
        end = names.index(q["before_id"])
        page, has_more = names[max(0, end - limit) : end], end > limit
    else:
        start = names.index(q["after_id"]) + 1 if "after_id" in q else 0
        page, has_more = names[start : start + limit], start + limit < len(names)
    return web.json_response(
        {
            "data": [_model_object("anthropic", n) for n in page],
            "has_more": has_more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
    )


async def _usage(request: web.Request) -> web.Response:
    proxy = request.app[PROXY]
    principal = proxy.attribution(request, proxy.config)
    if principal is None:
        return error_response(_caller_format(request), 401, _UNKNOWN_KEY, code="invalid_api_key")
    group_by = tuple(g for g in request.query.get("group_by", "tenant").split(",") if g)
    try:
        # A tenant sees only its own spending; without tenants configured, everything.
        only = principal.tenant if principal.limits is not None or principal.pinned else None
        rows = await proxy.store.usage(group_by, tenant=only)
    except ValueError as e:
        return error_response("openai", 400, str(e), code="invalid_group_by")
    return web.json_response({"object": "list", "group_by": list(group_by), "data": rows})


async def _metrics(request: web.Request) -> web.Response:
    principal = _credential(request)
    if isinstance(principal, web.Response):
        return principal
    if principal is not None and principal.pinned:
        return error_response(
            "openai",
            403,
            "a task's token cannot read the proxy's metrics (they cover every tenant)",
            code="forbidden",
        )
    body = generate_latest(request.app[PROXY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})
