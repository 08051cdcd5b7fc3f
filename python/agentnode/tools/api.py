"""`GET /v1/tools` and `POST /v1/tools/{name}/call` on the node API (the task socket, where a
task's token names the caller, and the admin API, where the node's operator says whom a call
is for)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agentnode.http_common import BodyTooLarge, json_body
from agentnode.tools.registry import Caller
from agentnode.tools.service import ToolService, key_problem

__all__ = ["add_tool_routes"]

#: The caller of a request: (request, JSON body or None for a listing) -> Caller.
CallerOf = Callable[[web.Request, dict[str, Any] | None], Caller | Awaitable[Caller]]
_CALL_KEYS = {"arguments", "idempotency_key", "task", "tenant"}


def _bad(message: str, field: str) -> web.Response:
    return web.json_response({"error": f"{field}: {message}", "field": field}, status=400)


def add_tool_routes(app: web.Application, service: ToolService, caller_of: CallerOf) -> None:
    """Adds the two routes to `app`. A call's body: `{"arguments": {...}, "idempotency_key":
    "..."}` (and, on the admin API, `"task"` or `"tenant"` to say whom it is for). The answer
    is the normalised result, status 200 whatever its class."""

    async def resolve(request: web.Request, body: dict[str, Any] | None) -> Caller:
        caller = caller_of(request, body)
        if not isinstance(caller, Caller):
            caller = await caller
        return caller

    async def list_tools(request: web.Request) -> web.Response:
        caller = await resolve(request, None)
        return web.json_response({"tools": await service.list(caller.tenant)})

    async def call(request: web.Request) -> web.Response:
        try:
            body = await json_body(request) if request.can_read_body else {}
        except BodyTooLarge as e:
            return web.json_response({"error": str(e)}, status=413)
        except ValueError as e:
            return _bad(str(e), "body")
        if not isinstance(body, dict):
            return _bad("must be a JSON object", "body")
        for key in body:
            if key not in _CALL_KEYS:
                return _bad(f"unknown field (known: {', '.join(sorted(_CALL_KEYS))})", key)
        if not isinstance(body.get("arguments", {}), dict):
            return _bad("must be a JSON object", "arguments")
        key = body.get("idempotency_key")
        if key is not None and (problem := key_problem(key)):
            return _bad(problem, "idempotency_key")
        caller = await resolve(request, body)
        result = await service.call(
            request.match_info["name"], body.get("arguments", {}), caller, idempotency_key=key
        )
        return web.Response(text=json.dumps(result), content_type="application/json")

    app.router.add_get("/v1/tools", list_tools)
    app.router.add_post("/v1/tools/{name}/call", call)
