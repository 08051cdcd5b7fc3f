"""The memory HTTP API: an aiohttp sub-application the daemon mounts (or runs alone on loopback).

Routes (bodies and answers in JSON, or msgpack with `Content-Type`/`Accept: application/msgpack`):

    POST   /v1/memory/episodic/{namespace}/{task}        {"value", "id"?, "ttl"?, "sync"?} or
                                                         {"records": [{"value", "id"?, "ttl"?}], "sync"?}
    GET    /v1/memory/episodic/{namespace}/{task}        ?since_ns&until_ns&limit&order=newest|oldest
    GET    /v1/memory/episodic/{namespace}/{task}/{id}
    DELETE /v1/memory/episodic/{namespace}/{task}/{id}
    POST   /v1/memory/episodic/{namespace}/{task}/end    {"ttl": seconds}
    GET    /v1/memory/episodic                           ?prefix=  -> the tenant's (namespace, task)s
    PUT    /v1/objects/{name}                            streamed body -> {"name", "digest", "size"}
    GET    /v1/objects/{name}                            streamed content, digest in ETag
    DELETE /v1/objects/{name}
    GET    /v1/objects                                   ?prefix=
    ...    /v1/memory/vectors/...                        see `storage.vector_api`

The episodic routes call `storage.operations`, which the memory socket (`storage.memsocket`)
serves too: one implementation of each operation behind both doors.

Every request carries `Authorization: Bearer <token>`; the tenant comes from the token alone.
Errors answer 400/401/403/404/409/413 with `{"error": "<what failed and what to do>"}`.

The vector routes (`storage.vector_api.vectors_app`) are passed as `make_app(..., vectors=app)`
and mounted at `/v1/memory/vectors/` behind the same authentication, error and codec handling:
their handlers call `principal(request)`, `check_task`, `await read_body(request)` and
`reply(request, data)`, and raise `StorageError`s (`VectorError` is one).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from aiohttp import web

from agentnode.errors import AuthError, MemoryKeyError, StorageError, ValueTooLargeError
from agentnode.storage import operations as ops
from agentnode.storage.episodic import EpisodicStore
from agentnode.storage.objects import ObjectStore
from agentnode.storage.tenancy import Authenticator, Principal

__all__ = ["MSGPACK", "check_task", "make_app", "principal", "read_body", "reply"]

MSGPACK = "application/msgpack"
EPISODIC = web.AppKey("episodic", EpisodicStore)
OBJECTS = web.AppKey("objects", ObjectStore)
AUTH = web.AppKey("auth", Authenticator)
MAX_BODY = web.AppKey("max_body", int)
_PRINCIPAL = web.RequestKey("principal", Principal)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def principal(request: web.Request) -> Principal:
    """The authenticated principal of a request under the memory API."""
    p: Principal = request[_PRINCIPAL]
    return p


def check_task(request: web.Request, task: str) -> str:
    """`task`, unless the request's credential is pinned to another task (then AuthError)."""
    return ops.check_task(principal(request), task)


async def read_body(request: web.Request) -> Any:
    """The decoded JSON or msgpack body; malformed or oversized bodies raise StorageError."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ValueTooLargeError(
            f"request body is over the {request.config_dict[MAX_BODY]}-byte limit "
            "(send smaller batches, or large data to /v1/objects)"
        ) from e
    try:
        if request.content_type == MSGPACK:
            return msgpack.unpackb(raw)
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, msgpack.ExtraData) as e:
        kind = "msgpack" if request.content_type == MSGPACK else "JSON"
        raise MemoryKeyError(f"request body is not valid {kind} ({e})") from e
    except RecursionError:
        raise MemoryKeyError("request body is nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def reply(request: web.Request, data: Any, *, status: int = 200) -> web.Response:
    """Answers `data` in msgpack if the client accepts it, else JSON."""
    if MSGPACK in request.headers.get("Accept", ""):
        return web.Response(body=msgpack.packb(data), status=status, content_type=MSGPACK)
    return web.json_response(data, status=status)


@web.middleware
async def _guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        found = (
            request.config_dict[AUTH].authenticate(token) if scheme == "Bearer" and token else None
        )
        if found is None:
            raise AuthError("missing or unknown bearer token (set AGENTNODE_TOKEN)")
        request[_PRINCIPAL] = found
        return await handler(request)
    except StorageError as e:
        status = 403 if isinstance(e, AuthError) and _PRINCIPAL in request else e.status
        return web.json_response({"error": str(e), "kind": type(e).__name__}, status=status)


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise MemoryKeyError(f"query parameter {name}={raw!r} is not an integer") from None


def _args(request: web.Request, **more: Any) -> dict[str, Any]:
    """An operation's arguments: the route's parts and `more`."""
    return {**request.match_info, **more}


async def _append(request: web.Request) -> web.Response:
    body = await read_body(request)
    if not isinstance(body, dict):
        raise MemoryKeyError("body must be an object with 'value' or 'records'")
    answer = ops.append(request.app[EPISODIC], principal(request), {**body, **request.match_info})
    return reply(request, await ops.settle(answer), status=201)


async def _scan(request: web.Request) -> web.Response:
    q = request.query
    args = _args(
        request,
        **{k: _query_int(request, k) for k in ("since_ns", "until_ns", "limit") if k in q},
        **({"order": q["order"]} if "order" in q else {}),
    )
    answer = ops.scan(request.app[EPISODIC], principal(request), args)
    return reply(request, await ops.settle(answer))


async def _get(request: web.Request) -> web.Response:
    return reply(request, ops.get(request.app[EPISODIC], principal(request), _args(request)))


async def _delete(request: web.Request) -> web.Response:
    await ops.delete(request.app[EPISODIC], principal(request), _args(request))
    return web.Response(status=204)


async def _end(request: web.Request) -> web.Response:
    body = await read_body(request)
    ttl = body.get("ttl") if isinstance(body, dict) else None
    answer = await ops.end(request.app[EPISODIC], principal(request), _args(request, ttl=ttl))
    return reply(request, answer)


async def _list_tasks(request: web.Request) -> web.Response:
    args = {"prefix": request.query.get("prefix", "")}
    return reply(request, ops.tasks(request.app[EPISODIC], principal(request), args))


async def _put_object(request: web.Request) -> web.Response:
    store = request.app[OBJECTS]
    w = store.writer(principal(request).tenant, request.match_info["name"])
    try:
        async for chunk in request.content.iter_chunked(1 << 16):
            await asyncio.to_thread(w.write, chunk)
    except BaseException:
        w.abort()
        raise
    info = await asyncio.to_thread(w.commit)
    return reply(request, info.to_wire(), status=201)


async def _get_object(request: web.Request) -> web.StreamResponse:
    store = request.app[OBJECTS]
    tenant, name = principal(request).tenant, request.match_info["name"]
    info = store.stat(tenant, name)
    chunks = store.read(tenant, name)
    resp = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "ETag": f'"{info.digest}"'}
    )
    resp.content_length = info.size
    await resp.prepare(request)
    while (chunk := await asyncio.to_thread(next, chunks, b"")) != b"":
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _delete_object(request: web.Request) -> web.Response:
    tenant = principal(request).tenant
    await asyncio.to_thread(request.app[OBJECTS].delete, tenant, request.match_info["name"])
    return web.Response(status=204)


async def _list_objects(request: web.Request) -> web.Response:
    infos = request.app[OBJECTS].list(principal(request).tenant, request.query.get("prefix", ""))
    return reply(request, {"objects": [i.to_wire() for i in infos]})


def make_app(
    *,
    episodic: EpisodicStore,
    objects: ObjectStore,
    auth: Authenticator,
    max_body: int = 4 << 20,
    vectors: web.Application | None = None,
) -> web.Application:
    """The memory API over the given stores. `vectors` is mounted at /v1/memory/vectors/."""
    app = web.Application(middlewares=[_guard], client_max_size=max_body)
    app[EPISODIC] = episodic
    app[OBJECTS] = objects
    app[AUTH] = auth
    app[MAX_BODY] = max_body
    ep = "/v1/memory/episodic"
    app.router.add_get(ep, _list_tasks)
    app.router.add_post(ep + "/{namespace}/{task}", _append)
    app.router.add_get(ep + "/{namespace}/{task}", _scan)
    app.router.add_post(ep + "/{namespace}/{task}/end", _end)
    app.router.add_get(ep + "/{namespace}/{task}/{id}", _get)
    app.router.add_delete(ep + "/{namespace}/{task}/{id}", _delete)
    app.router.add_get("/v1/objects", _list_objects)
    app.router.add_put("/v1/objects/{name}", _put_object)
    app.router.add_get("/v1/objects/{name}", _get_object)
    app.router.add_delete("/v1/objects/{name}", _delete_object)
    if vectors is not None:
        app.add_subapp("/v1/memory/vectors/", vectors)
    return app
