"""The node's control API (aiohttp): tasks, logs, events, checkpoints, node, metrics.

Two applications share the handlers. `admin_app` is served on the admin unix socket, whose file
mode is its access control (and on the optional TCP listener behind a bearer token). `task_app`
is served on the task socket bound into every task: it accepts only per-task tokens, reaches
only that task's own record, checkpoint and heartbeat, and mounts the memory API scoped to the
task's tenant.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from agentnode.agents.kinds import AgentSpec, agents_cache
from agentnode.agents.kinds import prepare as prepare_agent
from agentnode.agents.protocol import add_protocol_routes
from agentnode.audit import timeline
from agentnode.errors import (
    AgentnodeError,
    AuditError,
    AuthError,
    DiskFullError,
    MemoryKeyError,
    QueueFullError,
    StorageError,
    TaskError,
)
from agentnode.http_common import BodyTooLarge, flag, json_body, until_client_leaves
from agentnode.inference.attribution import Attribution
from agentnode.inference.attribution import Principal as InferencePrincipal
from agentnode.inference.config import ProxyConfig
from agentnode.isolation.spec import SpecError
from agentnode.node.metrics import NodeMetrics
from agentnode.node.runner import Node
from agentnode.storage.api import principal
from agentnode.storage.operations import Operation
from agentnode.storage.tenancy import Principal
from agentnode.tasks.model import _TENANT as TENANT_NAME
from agentnode.tasks.model import TERMINAL, State, Task, cpu_request
from agentnode.tasks.store import body_of
from agentnode.tasks.submission import BadField, spec_from_json
from agentnode.tools.api import add_tool_routes
from agentnode.tools.registry import Caller
from agentnode.tools.toolbox import caller_for

__all__ = [
    "admin_app",
    "spec_from_json",
    "task_app",
    "task_attribution",
    "task_json",
    "task_operations",
]

NODE = web.AppKey("node", Node)
PINNED = web.AppKey("pinned", bool)
METRICS = web.AppKey("metrics", NodeMetrics)
_OPENAPI = Path(__file__).with_name("openapi.json")
_MAX_CHECKPOINT = 64 << 20

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadField as e:
        return _error(400, str(e), e.field)
    except SpecError as e:
        return _error(400, str(e), e.field)
    except QueueFullError as e:
        return _error(429, str(e))
    except (DiskFullError, AuditError) as e:  # the node's disk: the request is not at fault
        return _error(507, str(e))
    except TaskError as e:
        status = 404 if str(e).startswith("no task") else 409
        return _error(status, str(e))
    except BodyTooLarge as e:
        return _error(413, str(e))
    except StorageError:
        raise  # the memory API's guard answers it with its own status and kind
    except AgentnodeError as e:
        return _error(400, str(e))
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        answer = _error(e.status, _http_error(request, e))
        if "Allow" in e.headers:  # a 405's
            answer.headers["Allow"] = e.headers["Allow"]
        return answer


def _http_error(request: web.Request, e: web.HTTPException) -> str:
    """aiohttp's own refusals (no route, a wrong method, a body over the size limit) in this
    API's words."""
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
    if e.status == 404:
        return f"no route {request.method} {request.path} (the routes are in /openapi.json)"
    return f"{e.reason.lower()} ({(e.text or '').removeprefix(f'{e.status}: ').rstrip('.')})"


def _bearer_guard(token: str) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # A header's bytes that are not UTF-8 arrive as lone surrogates: keep them as bytes.
        given_bytes = given.encode(errors="surrogateescape")
        if request.path != "/healthz" and not (
            scheme == "Bearer" and hmac.compare_digest(given_bytes, token.encode())
        ):
            return _error(401, "missing or wrong bearer token (use the node's api_token)")
        return await handler(request)

    return guard


# -- request parsing ----------------------------------------------------------------------------

_EGRESS = ("allow", "allow_hosts", "egress_rate", "conn_rate")


def task_json(node: Node, task: Task) -> dict[str, Any]:
    """A task as the API shows it (live accounting while it runs): the task's own fields and
    its sandbox in the sandbox's JSON form."""
    return row_json(node, body_of(task))


def row_json(node: Node, body: dict[str, Any]) -> dict[str, Any]:
    """`task_json` of a task given as its record's body (`agentnode.tasks.store.body_of`),
    which is what a page of stored tasks holds."""
    spec = body["spec"]
    history = body["history"]
    out: dict[str, Any] = {
        "id": body["id"],
        "tenant": spec["tenant"],
        "priority": spec["cls"],
        "command": list(spec["command"]),
        "state": body["state"],
        "attempt": body["attempt"],
        "reason": body["reason"],
        "exit_code": body["exit_code"],
        "submitted_at": history[0][1],
        "history": [list(h) for h in history],
        "heartbeat": spec.get("heartbeat_s"),
        "retries": spec.get("retries"),
        "retry_lost": spec.get("retry_lost", True),
        **spec["sandbox"],
        "cpu_request": cpu_request(
            cpus=spec["sandbox"]["cpus"], given=spec.get("cpu_request"), agent=spec.get("agent", "")
        ),
        "agent": spec.get("agent") or None,
    }
    running = node.running.get(body["id"])
    if running is not None and running.proc.result is None:
        with contextlib.suppress(AgentnodeError):
            out["stats"] = asdict(running.proc.stats())
    return out


def _task(request: web.Request) -> Task:
    node = request.app[NODE]
    task_id = request.match_info["id"]
    p = principal(request) if request.app.get(PINNED) else None
    if p is not None and p.task != task_id:
        raise web.HTTPForbidden(
            text=json.dumps({"error": f"this token belongs to task {p.task}, not {task_id}"}),
            content_type="application/json",
        )
    return node.manager.get(task_id)


async def _body(request: web.Request) -> Any:
    try:
        return await json_body(request)
    except BodyTooLarge:
        raise  # a 413
    except ValueError as e:
        raise BadField("body", str(e)) from None


# -- handlers -----------------------------------------------------------------------------------


async def _submit(request: web.Request) -> web.Response:
    body = await _body(request)
    node = request.app[NODE]
    agent = body.pop("agent", None) if isinstance(body, dict) else None
    spec = spec_from_json(body)
    if agent is not None:
        try:
            spec = prepare_agent(
                spec,
                AgentSpec.parse(agent),
                network_given=bool(body.get("network")),
                cache=agents_cache(node.config.data_dir),
            )
        except TaskError as e:
            raise BadField("agent", str(e)) from None
    inv = node.inventory
    if spec.cpu_millis > inv.allocatable_cpu_millis:
        raise BadField(
            "cpus" if spec.cpu_request is None else "cpu_request",
            f"reserves {spec.cpu_millis / 1000:g} CPUs, this node has "
            f"{inv.allocatable_cpu_millis / 1000:g} allocatable (it could never start)",
        )
    if spec.memory_bytes > inv.allocatable_memory_bytes:
        raise BadField(
            "memory",
            f"requests {spec.memory_bytes >> 20} MiB, this node has "
            f"{inv.allocatable_memory_bytes >> 20} MiB allocatable (it could never start)",
        )
    key = _idempotency_key(request, body)
    task, created = await node.submit_once(spec, key=key)
    return web.json_response(
        task_json(node, task),
        status=201 if created else 200,
        headers=None if created else {"Idempotent-Replayed": "true"},
    )


_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _idempotency_key(request: web.Request, body: Any) -> tuple[str, str] | None:
    """The request's `Idempotency-Key` and a digest of its body (None: no key)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _KEY.fullmatch(key):
        raise BadField("Idempotency-Key", "must be 1-255 printable ASCII characters, no spaces")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return key, hashlib.sha256(canonical).hexdigest()


#: Tasks in one page when a client pages without a `limit`, and the most it may ask for.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


async def _list(request: web.Request) -> web.Response:
    """Live tasks (from memory); with `all=1` or an ended `state`, every stored task, in
    pages. `limit` or `cursor` asks for the paged form, {"tasks", "next_cursor"}; without them
    the answer is a bare list (every live task, or the first `MAX_LIMIT` stored ones with a
    `Next-Cursor` header when more follow)."""
    node = request.app[NODE]
    q = request.query
    state = q.get("state")
    if state is not None and state not in {s.value for s in State}:
        raise BadField(
            "state", f"unknown state {state!r} (use {', '.join(s.value for s in State)})"
        )
    tenant = q.get("tenant")  # a filter: a name no tenant has matches nothing
    everything = _flag(q, "all")
    paged = "limit" in q or "cursor" in q
    limit = _limit(q["limit"]) if "limit" in q else (DEFAULT_LIMIT if paged else MAX_LIMIT)
    tasks, after = node.manager.page(
        after=_cursor(q["cursor"]) if "cursor" in q else 0,
        limit=limit,
        ended=everything,
        tenant=tenant,
        state=None if state is None else State(state),
        since=_time("since", q.get("since")),
        until=_time("until", q.get("until")),
    )
    rows = [row_json(node, t) for t in tasks]
    next_cursor = None if after is None else _encode_cursor(after)
    if paged:
        return web.json_response({"tasks": rows, "next_cursor": next_cursor})
    headers = None if next_cursor is None else {"Next-Cursor": next_cursor}
    return web.json_response(rows, headers=headers)


_CURSOR = re.compile(r"c1\.(\d{1,19})")


def _encode_cursor(after: int) -> str:
    """A page cursor: the seq of the last task looked at, which stays valid as tasks arrive
    (they take higher seqs) and as old ones are removed."""
    return base64.urlsafe_b64encode(f"c1.{after}".encode()).decode().rstrip("=")


def _cursor(text: str) -> int:
    try:
        m = _CURSOR.fullmatch(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        m = None
    if m is None:
        raise BadField("cursor", f"{text[:40]!r} is not a cursor this node gave (omit it to start)")
    return int(m.group(1))


def _flag(query: Any, name: str) -> bool:
    try:
        return flag(query, name)
    except ValueError as e:
        raise BadField(name, str(e)) from None


def _limit(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 4 and 1 <= int(text) <= MAX_LIMIT):
        raise BadField("limit", f"must be a whole number within 1..{MAX_LIMIT}, got {text[:40]!r}")
    return int(text)


def _time(name: str, text: str | None) -> float | None:
    """Seconds since the epoch in a `since`/`until` parameter."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadField(
            name, f"must be seconds since the epoch (like 1760000000), got {text[:40]!r}"
        )
    return value


async def _get(request: web.Request) -> web.Response:
    return web.json_response(task_json(request.app[NODE], _task(request)))


async def _cancel(request: web.Request) -> web.Response:
    task = await request.app[NODE].cancel(request.match_info["id"])
    return web.json_response(task_json(request.app[NODE], task), status=202)


async def _put_egress(request: web.Request) -> web.Response:
    """Replaces a task's egress rules and rates (absent ones become empty): live while it runs."""
    node = request.app[NODE]
    task = _task(request)
    body = await _body(request)
    if not isinstance(body, dict):
        raise BadField("body", "must be a JSON object")
    for key in body:
        if key not in _EGRESS:
            raise BadField(key, f"unknown field (known: {', '.join(_EGRESS)})")
    # Absent rules become empty; the sandbox checks the rest when they replace the old ones.
    rules: dict[str, Any] = {
        key: body.get(key, [] if key.startswith("allow") else None) for key in _EGRESS
    }
    replace(task.spec.sandbox, **rules)  # a SpecError is a 400 naming the field
    done = await node.update_egress(task.id, rules)
    return web.json_response(task_json(node, done))


async def _heartbeat(request: web.Request) -> web.Response:
    request.app[NODE].heartbeat(_task(request).id)
    return web.json_response({"ok": True})


@until_client_leaves
async def _logs(request: web.Request, resp: web.StreamResponse) -> None:
    node = request.app[NODE]
    task = _task(request)
    follow = _flag(request.query, "follow")
    resp.content_type, resp.charset = "text/plain", "utf-8"
    await resp.prepare(request)
    attempt = 1
    offset = 0
    while True:
        current = node.manager.get(task.id)
        path = node.log_path(task.id, attempt)
        if path.exists():
            with path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < offset:
                    offset = 0  # rotated past its cap: go on from its marker line
                f.seek(offset)
                while chunk := f.read(1 << 16):
                    await resp.write(chunk)
                    offset += len(chunk)
        if attempt < current.attempt:
            attempt, offset = attempt + 1, 0
            continue
        if not follow or (current.state in TERMINAL and task.id not in node.running):
            break
        if request.transport is None or request.transport.is_closing():
            return  # the client left while there was nothing to send
        await asyncio.sleep(0.05)


@until_client_leaves
async def _events(request: web.Request, resp: web.StreamResponse) -> None:
    node = request.app[NODE]
    resp.content_type = "text/event-stream"
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    async with node.events() as queue:
        ended = False
        while not ended:
            # Under load transitions come faster than one write each: send all that wait.
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            if None in events:
                ended = True
                del events[events.index(None) :]
            if events:
                await resp.write(
                    "".join(
                        f"event: transition\ndata: {json.dumps(e)}\n\n" for e in events
                    ).encode()
                )


async def _get_checkpoint(request: web.Request) -> web.Response:
    task = _task(request)
    blob = await asyncio.to_thread(request.app[NODE].manager.store.read_checkpoint, task.id)
    if blob is None:
        return _error(404, f"task {task.id} has no checkpoint")
    return web.Response(body=blob, content_type="application/octet-stream")


async def _put_checkpoint(request: web.Request) -> web.Response:
    task = _task(request)
    try:
        blob = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"checkpoint is over the {_MAX_CHECKPOINT}-byte limit")
    return web.json_response(_save_checkpoint(request.app[NODE], task, blob))


def _save_checkpoint(node: Node, task: Task, blob: bytes) -> dict[str, Any]:
    """Stores `blob` as `task`'s checkpoint, audited: what both doors to it do."""
    # A database put on the loop, as the task records are written: cheaper than a hand-off to
    # a thread and back, and an agent checkpoints every step.
    node.manager.store.write_checkpoint(task.id, blob)
    node.audit.append(
        {"kind": "checkpoint", "task": task.id, "tenant": task.spec.tenant, "bytes": len(blob)}
    )
    return {"bytes": len(blob)}


def task_operations(node: Node) -> dict[str, Operation]:
    """The task's own checkpoint as memory socket operations (`storage.memsocket`), for a
    token pinned to its task: `task.checkpoint.put` `{"blob"}` -> `{"bytes"}`, and
    `task.checkpoint.get` -> `{"blob"}` (None when it has none)."""

    def own(who: Principal, args: Mapping[str, Any]) -> Task:
        if who.task is None or args.get("task", who.task) != who.task:
            raise AuthError(f"this token belongs to task {who.task}, not {args.get('task')}")
        return node.manager.get(who.task)

    def put(who: Principal, args: Mapping[str, Any]) -> dict[str, Any]:
        blob = args.get("blob")
        if not isinstance(blob, bytes):
            raise MemoryKeyError("'blob' must be bytes (msgpack bin)")
        return _save_checkpoint(node, own(who, args), blob)

    async def get(who: Principal, args: Mapping[str, Any]) -> dict[str, Any]:
        task = own(who, args)
        return {"blob": await asyncio.to_thread(node.manager.store.read_checkpoint, task.id)}

    return {"task.checkpoint.put": put, "task.checkpoint.get": get}


async def _node(request: web.Request) -> web.Response:
    node = request.app[NODE]
    inv = node.inventory
    cpu, mem = node.free()
    return web.json_response(
        {
            "cpu_millis": inv.cpu_millis,
            "memory_bytes": inv.memory_bytes,
            "allocatable_cpu_millis": inv.allocatable_cpu_millis,
            "allocatable_memory_bytes": inv.allocatable_memory_bytes,
            "free_cpu_millis": cpu,
            "free_memory_bytes": mem,
            "gpus": [asdict(g) for g in inv.gpus],
            "queued": node.manager.queued_count(),
            "running": len(node.running),
            "admitting": node.admitting,
        }
    )


async def _gc(request: web.Request) -> web.Response:
    """Runs the retention sweep now (`agentnode gc`)."""
    removed = await request.app[NODE].retention.run_now()
    return web.json_response({"removed": removed})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    """200 while the node can take and start work; 503 naming what is failing otherwise."""
    node = request.app[NODE]
    checks = node.health()
    ok = all(v == "ok" for v in checks.values())
    body = {"ok": ok, **checks, "disk_full": node.manager.store.disk_full is not None}
    return web.json_response(body, status=200 if ok else 503)


async def _openapi(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_OPENAPI, headers={"Content-Type": "application/json"})


def _add_task_routes(r: web.UrlDispatcher) -> None:
    """The routes about one task, which a task's own token may also use (on the task socket)."""
    r.add_get("/v1/tasks/{id}", _get)
    r.add_post("/v1/tasks/{id}/heartbeat", _heartbeat)
    r.add_get("/v1/tasks/{id}/logs", _logs)
    r.add_get("/v1/tasks/{id}/checkpoint", _get_checkpoint)
    r.add_put("/v1/tasks/{id}/checkpoint", _put_checkpoint)
    timeline.add_routes(
        r,
        task_of=_task,
        log_of=lambda request: request.app[NODE].audit,
        running=lambda request, task_id: task_id in request.app[NODE].running,
    )


def admin_app(node: Node, metrics: NodeMetrics, *, token: str | None = None) -> web.Application:
    """The full control API; with `token`, every route but /healthz needs it as a bearer."""
    middlewares: list[Middleware] = [_errors] if token is None else [_bearer_guard(token), _errors]
    app = web.Application(middlewares=middlewares, client_max_size=_MAX_CHECKPOINT)
    app[NODE] = node
    app[METRICS] = metrics
    r = app.router
    r.add_post("/v1/tasks", _submit)
    r.add_get("/v1/tasks", _list)
    r.add_post("/v1/tasks/{id}/cancel", _cancel)
    r.add_put("/v1/tasks/{id}/egress", _put_egress)
    r.add_post("/v1/gc", _gc)
    _add_task_routes(r)
    add_tool_routes(app, node.tools.service, functools.partial(_admin_caller, node))
    r.add_get("/v1/events", _events)
    r.add_get("/v1/node", _node)
    r.add_get("/metrics", _metrics)
    r.add_get("/healthz", _healthz)
    r.add_get("/openapi.json", _openapi)
    add_protocol_routes(app, node)
    return app


class TaskTokens:
    """The memory API's authenticator for per-task tokens: the task's tenant, pinned to it."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def authenticate(self, token: str) -> Principal | None:
        task = self._node.manager.task_of_token(token)
        return None if task is None else Principal(task.spec.tenant, task.id)


def task_attribution(node: Node) -> Attribution:
    """The inference proxy's attribution inside the node, where tasks reach it under every
    egress policy: a running task's token (the SDKs send it as their API key) bills that task
    and its tenant; a key of a configured tenant bills that tenant; nothing else is admitted.
    The task billed is the one the token names: an `x-agentnode-task` header is never read."""

    def attribute(request: web.Request, config: ProxyConfig) -> InferencePrincipal | None:
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key", "")
        if not key:
            return None
        task = node.manager.task_of_token(key)
        if task is not None:
            tenant = task.spec.tenant
            return InferencePrincipal(tenant, task.id, config.tenants.get(tenant), pinned=True)
        given = key.encode(errors="surrogateescape")  # a header's non-UTF-8 bytes
        for t in config.tenants.values():
            if any(hmac.compare_digest(given, k.encode()) for k in t.api_keys):
                return InferencePrincipal(t.name, None, t)
        return None

    return attribute


def task_app(node: Node, memory: web.Application) -> web.Application:
    """The task socket's API: `memory` (from `storage.api.make_app` with `TaskTokens(node)`,
    whose guard authenticates every request) plus the task's own record, logs, checkpoint and
    heartbeat. Memory routes stay at their usual paths so `agentnode.sdk.Memory` works as is."""
    memory.middlewares.append(_errors)
    memory[NODE] = node
    memory[PINNED] = True
    _add_task_routes(memory.router)
    add_tool_routes(memory, node.tools.service, functools.partial(_task_caller, node))
    return memory


def _workspaces(node: Node) -> Path:
    return node.config.data_dir / "workspaces"


def _admin_caller(node: Node, request: web.Request, body: dict[str, Any] | None) -> Caller:
    """On the admin API a call is for a task (`task`: its tenant, workspace and network) or
    for a tenant (`tenant`, default "default": no workspace, no network)."""
    given = body if body is not None else dict(request.query)
    task_id = given.get("task")
    if task_id is not None:
        if not isinstance(task_id, str):
            raise BadField("task", "must be a task id")
        return caller_for(node.manager.get(task_id), _workspaces(node))
    tenant = given.get("tenant", "default")
    # The name becomes part of paths (sessions, MCP server workspaces): the tasks' rule.
    if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
        raise BadField(
            "tenant",
            f"invalid tenant {tenant!r} (use 1-128 letters, digits, '_', '.', '-', starting with a letter or digit)",
        )
    return Caller(task="", tenant=tenant)


def _task_caller(node: Node, request: web.Request, body: dict[str, Any] | None) -> Caller:
    """On the task socket the token names the task; it cannot act for another."""
    p = principal(request)
    assert p is not None and p.task is not None
    if body is not None and any(k in body for k in ("task", "tenant")):
        raise BadField("task", "a task's token calls tools for that task only")
    return node.task_caller(p.task)
