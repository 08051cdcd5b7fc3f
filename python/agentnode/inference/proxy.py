"""The proxy's request handling: one request is attributed to a tenant (and task), checked
against budgets and tenant/task limits, answered from the cache or sent down the route's
deployments in fallback order (weighted within one model), each with its own RPM/TPM window,
circuit breaker and retries. Fallback happens only before the first byte reaches the client;
after that an upstream failure becomes an SSE error event. Usage is split into buckets, priced
exactly and written to the ledger off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

from agentnode.inference.attribution import UNKNOWN_KEY, Attribution, key_attribution
from agentnode.inference.call import (
    ENDPOINTS,
    FREE,
    Call,
    estimate_tokens,
    patched,
    response_cache_key,
    validate,
)
from agentnode.inference.config import Deployment, ProxyConfig, Route
from agentnode.inference.errors import error_event, error_response
from agentnode.inference.limits import Window
from agentnode.inference.metrics import Metrics
from agentnode.inference.pricing import Usage, anthropic_usage, cost, openai_usage, saving
from agentnode.inference.prompt_cache import anthropic_marks, cache_key
from agentnode.inference.routing import Router
from agentnode.inference.spend import SPEND_HEADER, comment
from agentnode.inference.sse import EventStream, UsageReader, sse_events
from agentnode.inference.store import LedgerRow, Store
from agentnode.inference.upstream import (
    RETRYABLE,
    DeploymentState,
    Retryable,
    passed_headers,
    read_text,
    retry_after_header,
)

__all__ = ["MAX_BODY", "Proxy"]

# Request headers the client may send that the upstream must see (Anthropic's API version, betas).
_FORWARD = ("anthropic-version", "anthropic-beta", "openai-organization", "openai-project")
# Seconds a finished stream's connection may take to end its HTTP framing and be reused.
_TAIL_WAIT = 1.0
# The largest request body read (aiohttp refuses a larger one with 413).
MAX_BODY = 64 << 20
_TOO_LARGE = f"request body is over the {MAX_BODY}-byte limit"


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
        self.deployments = {n: DeploymentState(d, config) for n, d in config.deployments.items()}
        self.router = Router(self.deployments.values())
        self.tenant_windows: dict[tuple[str, str, str | None], Window] = {}
        self.metrics = Metrics()
        self._tails: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stops waiting for the ends of finished upstream streams (called at shutdown)."""
        for t in self._tails:
            t.cancel()
        await asyncio.gather(*self._tails, return_exceptions=True)

    # ---- entry points -----------------------------------------------------------------------

    async def handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        """Answers one client request to `endpoint` (a key of `ENDPOINTS`)."""
        fmt = ENDPOINTS[endpoint][0]
        # Authenticate first: a stranger learns nothing, not even how we validate bodies.
        principal = self.attribution(request, self.config)
        if principal is None:
            return self._reject(endpoint, fmt, 401, UNKNOWN_KEY, "invalid_api_key")
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
        problem = validate(endpoint, payload)
        if problem:
            return self._reject(endpoint, fmt, 400, problem, "invalid_request")
        call = Call(endpoint, body, payload, principal)
        route_name = request.headers.get("x-agentnode-route") or call.model
        route = call.route = self.config.routes.get(route_name)
        if endpoint in FREE:
            return await self._forward(request, call, route)
        call.tokens_estimate = estimate_tokens(len(body), payload)
        refusal = self._admit(call)
        if refusal is not None:
            return refusal
        cache_header = request.headers.get("x-agentnode-cache", "").lower()
        if cache_header == "on" or (cache_header != "off" and route is not None and route.cache):
            call.cache_key = response_cache_key(principal.tenant, endpoint, payload)
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
        retried: bool = False,
    ) -> web.Response:
        self.metrics.requests[(endpoint, status)] += 1
        return error_response(
            fmt, status, message, code=code, retry_after=retry_after, retried=retried
        )

    def _admit(self, call: Call) -> web.Response | None:
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

    # ---- retries and fallback ----------------------------------------------------------------

    async def _forward(
        self, request: web.Request, call: Call, route: Route | None
    ) -> web.StreamResponse:
        candidates = self.router.candidates(call, route)
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
            tpm_entry = None
            if call.endpoint not in FREE:
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
                except Retryable as e:
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
        # The upstream's own 429/503/504/529 (and its Retry-After) tell the client more than a
        # 502: Anthropic's SDK raises OverloadedError for a 529, which agents back off from.
        status = last_status if last_status in (429, 503, 504, 529) else 502
        return self._reject(
            call.endpoint,
            call.fmt,
            status,
            "every upstream failed: " + "; ".join(errors),
            "upstream_failed",
            retry_after=last_retry_after if status in (429, 503, 529) else None,
            # A wait the upstream asked for is the client's to take; after a 502 or a 504
            # the proxy's own retries and fallbacks were the tries worth making.
            retried=status in (502, 504),
        )

    def _deployment_wait(self, state: DeploymentState, call: Call) -> float:
        wait = 0.0
        if state.rpm:
            wait = state.rpm.wait_time(1)
        if state.tpm:
            wait = max(wait, state.tpm.wait_time(call.tokens_estimate))
        return wait

    async def _attempt(
        self,
        request: web.Request,
        call: Call,
        state: DeploymentState,
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
        body = patched(call.body, call.payload, changes)
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
            raise Retryable(
                f"timed out after {d.connect_timeout if connecting else _waited(d, call)} s "
                + ("connecting" if connecting else "waiting for the response"),
                status=504,
                connection=connecting,
            ) from None
        except aiohttp.ClientError as e:
            raise Retryable(f"cannot reach {url}: {e}", connection=True) from None
        try:
            if upstream.status in RETRYABLE or upstream.status >= 500:
                text = await read_text(upstream)
                raise Retryable(
                    f"HTTP {upstream.status}: {text[:200]}",
                    status=upstream.status,
                    retry_after=retry_after_header(upstream.headers),
                )
            if upstream.status != 200:
                # The client's own mistake: pass the provider's error through unchanged.
                raw = await upstream.read()
                self._finish(call, d, model, upstream.status, Usage(), cache_hit=False)
                return web.Response(
                    body=raw,
                    status=upstream.status,
                    content_type="application/json",
                    headers=self._spend_header(call) | passed_headers(upstream),
                )
            if call.stream:
                return await self._stream(
                    request, call, state, model, upstream, wants_usage, tpm_entry
                )
            return await self._complete(call, state, model, upstream, tpm_entry)
        except TimeoutError:
            raise Retryable(f"no response within {_waited(d, call)} s", status=504) from None
        except aiohttp.ClientError as e:
            raise Retryable(f"connection failed: {e}") from None
        finally:
            # A fully read response returns its connection to the pool; anything else (client
            # gone, error) closes it, which is what cancels the upstream's work.
            if upstream.content.at_eof():
                upstream.release()
            elif call.upstream_complete:
                self._release_after_tail(upstream)
            else:
                upstream.close()

    def _prompt_cache(self, call: Call, d: Deployment) -> dict[str, Any]:
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
        call: Call,
        state: DeploymentState,
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
            raise Retryable(
                f"deployment {d.name} returned a body that is not JSON ({len(raw)} bytes)"
            ) from None
        usage = (anthropic_usage if d.kind == "anthropic" else openai_usage)(obj.get("usage"))
        if tpm_entry is not None and state.tpm:
            state.tpm.adjust(tpm_entry, usage.total)
        self._finish(call, d, model, 200, usage, cache_hit=False)
        if call.cache_key is not None:
            self.store.cache_put(call.cache_key, {"stream": False}, raw, self.config.cache_ttl)
        return web.Response(
            body=raw,
            content_type="application/json",
            headers=self._spend_header(call) | passed_headers(upstream),
        )

    async def _stream(
        self,
        request: web.Request,
        call: Call,
        state: DeploymentState,
        model: str,
        upstream: aiohttp.ClientResponse,
        wants_usage: bool,
        tpm_entry: list[float] | None,
    ) -> web.StreamResponse:
        d = state.deployment
        events = sse_events(upstream)
        # Fallback stays possible until the first event: read it before answering the client.
        try:
            first = await anext(events)
        except StopAsyncIteration:
            raise Retryable(f"deployment {d.name} closed the stream before any event") from None
        except ValueError as e:
            raise Retryable(f"deployment {d.name} sent a stream that is not SSE: {e}") from None
        response = EventStream(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            | passed_headers(upstream)
        )
        await response.prepare(request)
        reader = UsageReader(d.kind, call.endpoint, wants_usage)
        sent: list[bytes] | None = [] if call.cache_key is not None else None
        status = 200
        billed = False
        event: bytes | None = first
        try:
            while event is not None:
                out = reader.feed(event)
                call.upstream_complete = reader.done
                if reader.done:
                    # Its usage is whole: bill it now, and tell the task its spend with this
                    # call in it, in a comment before the last event (one write, as before).
                    self._bill(call, state, model, 200, reader, tpm_entry)
                    billed = True
                if out is not None and sent is not None:
                    sent.append(out)
                if billed:
                    out = self._spend_comment(call) + (out or b"")
                if out:
                    await response.write(out)
                # Past the last event, a connection the upstream drops or half-closes must not
                # turn a complete answer into a 502 (nor keep it out of the cache).
                event = None if reader.done else await anext(events, None)
        except (asyncio.CancelledError, ConnectionResetError):
            # First: aiohttp's ClientConnectionResetError from writing to a gone client is also
            # a ClientError, and must not be mistaken for an upstream failure below.
            # The client left; _attempt closes the upstream. Bill what is known (Anthropic
            # reports input tokens up front) with nginx's "client closed request" status.
            if not billed:
                self._bill(call, state, model, 499, reader, tpm_entry)
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            status = 502
            what = "timed out" if isinstance(e, TimeoutError) else f"failed: {e}"
            await response.write(
                error_event(call.fmt, f"upstream {d.name} {what} mid-stream (partial response)")
            )
        if not billed:
            self._bill(call, state, model, status, reader, tpm_entry)
        if sent is not None and status == 200 and call.cache_key is not None:
            self.store.cache_put(
                call.cache_key, {"stream": True}, b"".join(sent), self.config.cache_ttl
            )
        await response.write_eof()
        return response

    def _bill(
        self,
        call: Call,
        state: DeploymentState,
        model: str,
        status: int,
        reader: UsageReader,
        tpm_entry: list[float] | None,
    ) -> None:
        """A stream's usage so far: its deployment's TPM window corrected, its ledger row."""
        usage = reader.usage()
        if tpm_entry is not None and state.tpm:
            state.tpm.adjust(tpm_entry, usage.total)
        self._finish(call, state.deployment, model, status, usage, cache_hit=False)

    def _spend_header(self, call: Call) -> dict[str, str]:
        """The header telling a task's call its task's spend so far (spend.py); none for a
        call billed to no task."""
        p = call.principal
        if p.task is None:
            return {}
        return {SPEND_HEADER: str(self.store.task_spend.get((p.tenant, p.task), Decimal(0)))}

    def _spend_comment(self, call: Call) -> bytes:
        """The same for a stream, as an SSE comment (b"" for a call billed to no task)."""
        p = call.principal
        if p.task is None:
            return b""
        return comment(self.store.task_spend.get((p.tenant, p.task), Decimal(0)))

    async def _replay(
        self, request: web.Request, call: Call, meta: dict[str, Any], body: bytes
    ) -> web.StreamResponse:
        self.metrics.cache_hits += 1
        self._finish(call, None, call.model, 200, Usage(), cache_hit=True)
        headers = {"x-agentnode-cache": "hit"}
        if not meta["stream"]:
            headers |= self._spend_header(call)
            return web.Response(body=body, content_type="application/json", headers=headers)
        response = web.StreamResponse(headers=headers | {"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # A hit costs nothing: the spend is whole before the first byte.
        await response.write(self._spend_comment(call) + body)
        await response.write_eof()
        return response

    def _finish(
        self,
        call: Call,
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


def _waited(d: Deployment, call: Call) -> float:
    """The timeout a call to `d` ran out of: a stream's wait for bytes, or a whole answer's."""
    return d.first_byte_timeout if call.stream else d.timeout
