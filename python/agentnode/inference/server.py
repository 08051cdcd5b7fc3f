"""The proxy's HTTP server: the aiohttp application with the OpenAI- and Anthropic-compatible
endpoints (handled by `Proxy`), the models list, usage and metrics, and the provider-format
answers for everything else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from agentnode.inference.attribution import UNKNOWN_KEY, Attribution, Principal, key_attribution
from agentnode.inference.config import ProxyConfig
from agentnode.inference.errors import error_response
from agentnode.inference.proxy import MAX_BODY, Proxy
from agentnode.inference.store import LedgerRow, Store

__all__ = ["PROXY", "create_app"]

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
        return error_response(_caller_format(request), 401, UNKNOWN_KEY, code="invalid_api_key")
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
    app = web.Application(client_max_size=MAX_BODY)
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
    app.router.add_post("/v1/messages/count_tokens", endpoint("count_tokens"))
    app.router.add_get("/v1/models", _models)
    # [\s\S], not '.': a path may hold a newline (%0A), which '.' leaves to aiohttp's
    # plain-text 404.
    app.router.add_get(r"/v1/models/{model_id:[\s\S]+}", _model)
    app.router.add_get("/v1/usage", _usage)
    app.router.add_get("/metrics", _metrics)
    # Last: tried only once no route above matched the path and method.
    app.router.add_route("*", r"/{tail:[\s\S]*}", _unrouted)
    return app


def _served_models(config: ProxyConfig, kind: str) -> list[str]:
    """Model and route names a client of `kind`'s format can call (its endpoints reach only
    deployments of that kind), sorted."""
    names = {m for d in config.deployments.values() if kind == d.kind for m in d.models}
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
    if name not in _served_models(request.app[PROXY].config, fmt):
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
        data = [_model_object("openai", n) for n in _served_models(cfg, "openai")]
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
        return error_response(_caller_format(request), 401, UNKNOWN_KEY, code="invalid_api_key")
    group_by = tuple(g for g in request.query.get("group_by", "tenant").split(",") if g)
    task = request.query.get("task")
    if principal.pinned:
        # A task's token sees its own task's spending, as it sees only its own memory.
        if task not in (None, principal.task):
            return error_response(
                _caller_format(request),
                403,
                "a task's token reads its own task's usage only (leave out task= or name it)",
                code="forbidden",
            )
        task = principal.task
    try:
        # A tenant sees only its own spending; without tenants configured, everything.
        only = principal.tenant if principal.limits is not None or principal.pinned else None
        rows = await proxy.store.usage(group_by, tenant=only, task=task)
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
