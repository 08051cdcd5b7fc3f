"""The node's control API (aiohttp): tasks, logs, events, checkpoints, node, metrics.

Two applications share the handlers. `admin_app` is served on the admin unix socket, whose file
mode is its access control (and on the optional TCP listener behind a bearer token). `task_app`
is served on the task socket bound into every task: it accepts only per-task tokens, reaches
only that task's own record, checkpoint and heartbeat, and mounts the memory API scoped to the
task's tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from agentnode.agents.kinds import AgentSpec, agents_cache
from agentnode.agents.kinds import prepare as prepare_agent
from agentnode.errors import AgentnodeError, QueueFullError, StorageError, TaskError
from agentnode.inference.config import ProxyConfig
from agentnode.inference.server import Attribution, key_attribution
from agentnode.inference.server import Principal as InferencePrincipal
from agentnode.isolation.task import capability_number
from agentnode.isolation.units import parse_bind, parse_duration, parse_size
from agentnode.node.metrics import NodeMetrics
from agentnode.node.runner import Node
from agentnode.storage.api import principal
from agentnode.storage.tenancy import Principal
from agentnode.tasks.model import CLASSES, TERMINAL, State, Task, TaskSpec

__all__ = ["admin_app", "spec_from_json", "task_app", "task_attribution", "task_json"]

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


class BadField(Exception):
    """A request field is missing or malformed: 400 naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadField as e:
        return _error(400, str(e), e.field)
    except QueueFullError as e:
        return _error(429, str(e))
    except TaskError as e:
        status = 404 if str(e).startswith("no task") else 409
        return _error(status, str(e))
    except StorageError:
        raise  # the memory API's guard answers it with its own status and kind
    except AgentnodeError as e:
        return _error(400, str(e))


def _bearer_guard(token: str) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if request.path != "/healthz" and not (
            scheme == "Bearer" and hmac.compare_digest(given.encode(), token.encode())
        ):
            return _error(401, "missing or wrong bearer token (use the node's api_token)")
        return await handler(request)

    return guard


# -- request parsing ----------------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, *, parse: Callable[..., float] | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, str) and parse is not None:
        try:
            return parse(value, option=key)
        except AgentnodeError as e:
            raise BadField(key, str(e).removeprefix(f"{key}: ")) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadField(key, f"must be a number, got {value!r}")
    if value <= 0:
        raise BadField(key, f"must be positive, got {value!r}")
    return value


def _binds(body: dict[str, Any], key: str) -> list[tuple[str, str, bool]]:
    specs = body.get(key, [])
    if not isinstance(specs, list) or not all(isinstance(x, str) for x in specs):
        raise BadField(key, 'must be a list of "HOST[:DEST]" strings')
    try:
        return [(*parse_bind(x, option=key), key == "rw") for x in specs]
    except AgentnodeError as e:
        raise BadField(key, str(e).removeprefix(f"{key}: ")) from None


_SANDBOX = ("cpu_weight", "memory_high", "swap", "tmp_size", "userns", "caps", "rootfs", "cwd",
            "hostname")  # fmt: skip
_EGRESS = ("allow", "allow_hosts", "egress_rate", "conn_rate")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")


def _sandbox(body: dict[str, Any]) -> dict[str, Any]:
    """The exec-style sandbox options present in `body`, checked."""
    out: dict[str, Any] = {}
    weight = body.get("cpu_weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 10000:
            raise BadField("cpu_weight", f"must be an integer from 1 to 10000, got {weight!r}")
        out["cpu_weight"] = weight
    for key in ("memory_high", "swap", "tmp_size"):
        size = _number(body, key, parse=parse_size)
        if size is not None:
            out[key] = int(size)
    if "userns" in body:
        if not isinstance(body["userns"], bool):
            raise BadField("userns", f"must be true or false, got {body['userns']!r}")
        out["userns"] = body["userns"]
    caps = body.get("caps", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise BadField("caps", "must be a list of capability names")
    for cap in caps:
        try:
            capability_number(cap)
        except AgentnodeError as e:
            raise BadField("caps", str(e)) from None
    out["caps"] = tuple(caps)
    for key in ("rootfs", "cwd"):
        path = body.get(key)
        if path is None:
            continue
        if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
            raise BadField(key, f"must be an absolute path without '..', got {path!r}")
        if key == "rootfs" and not os.path.isdir(path):
            raise BadField(key, f"{path!r} is not a directory (give a root file system tree)")
        out[key] = path
    out.update(_egress(body))
    hostname = body.get("hostname")
    if hostname is not None:
        if not isinstance(hostname, str) or not _HOSTNAME.fullmatch(hostname):
            raise BadField(
                "hostname", f"must be 1-64 letters, digits, '.' or '-', got {hostname!r}"
            )
        out["hostname"] = hostname
    return out


def _egress(body: dict[str, Any]) -> dict[str, Any]:
    """The egress rules and rates in `body`, type-checked (their syntax is TaskSpec's to check);
    absent ones are empty."""
    out: dict[str, Any] = {}
    for key in ("allow", "allow_hosts"):
        rules = body.get(key, [])
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise BadField(key, f"must be a list of rule strings, got {rules!r}")
        out[key] = tuple(rules)
    for key in ("egress_rate", "conn_rate"):
        rate = body.get(key)
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, str | int)):
            raise BadField(key, f"must be a string like '1MiB/s' or an integer, got {rate!r}")
        out[key] = rate
    return out


def _bad_field(e: TaskError, known: Iterable[str]) -> BadField:
    """TaskSpec's errors name the field in their first words."""
    head = str(e).split(" ", 2)[:2]
    return BadField(next((k for k in known if k in head), "body"), str(e))


def spec_from_json(body: Any) -> TaskSpec:
    """A TaskSpec from a POST /v1/tasks body; BadField names the first bad field."""
    if not isinstance(body, dict):
        raise BadField("body", "must be a JSON object")
    known = {
        "tenant",
        "command",
        "priority",
        "cpus",
        "memory",
        "pids",
        "timeout",
        "heartbeat",
        "env",
        "network",
        *_EGRESS,
        "user",
        "retries",
        "ro",
        "rw",
        "publish",
        *_SANDBOX,
    }
    for key in body:
        if key not in known:
            raise BadField(key, f"unknown field (known: {', '.join(sorted(known))})")
    tenant = body.get("tenant", "default")
    if not isinstance(tenant, str):
        raise BadField("tenant", "must be a string")
    command = body.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(a, str) and a for a in command)
    ):
        raise BadField("command", "must be a non-empty list of non-empty strings")
    priority = body.get("priority", "normal")
    if priority not in CLASSES:
        raise BadField("priority", f"must be one of {', '.join(CLASSES)}, got {priority!r}")
    env = body.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise BadField("env", "must be an object of string values")
    cpus = _number(body, "cpus")
    memory = _number(body, "memory", parse=parse_size)
    pids = _number(body, "pids")
    if pids is not None and not isinstance(pids, int):
        raise BadField("pids", f"must be an integer, got {pids!r}")
    binds = _binds(body, "ro") + _binds(body, "rw")
    fields: dict[str, Any] = _sandbox(body)
    publish = body.get("publish", [])
    if not isinstance(publish, list) or not all(isinstance(r, str) for r in publish):
        raise BadField("publish", f'must be a list of "HOSTPORT:PORT" strings, got {publish!r}')
    fields["publish"] = tuple(publish)
    retries = body.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)):
        raise BadField("retries", f"must be an integer, got {retries!r}")
    timeout = _number(body, "timeout", parse=parse_duration)
    heartbeat = _number(body, "heartbeat", parse=parse_duration)
    if cpus is not None:
        fields["cpu_millis"] = max(1, round(cpus * 1000))
    if memory is not None:
        fields["memory_bytes"] = int(memory)
    if timeout is not None:
        fields["timeout_s"] = float(timeout)
    try:
        return TaskSpec(
            tenant=tenant,
            command=tuple(command),
            cls=priority,
            pids=pids,
            heartbeat_s=heartbeat,
            env=tuple(env.items()),
            network=body.get("network", ""),
            user=str(body.get("user", "65534")),
            retries=retries,
            binds=tuple(binds),
            **fields,
        )
    except TaskError as e:
        raise _bad_field(e, known) from None


def task_json(node: Node, task: Task) -> dict[str, Any]:
    """A task as the API shows it (live accounting while it runs)."""
    spec = task.spec
    out: dict[str, Any] = {
        "id": task.id,
        "tenant": spec.tenant,
        "priority": spec.cls,
        "command": list(spec.command),
        "state": task.state.value,
        "attempt": task.attempt,
        "reason": task.reason,
        "exit_code": task.exit_code,
        "submitted_at": task.history[0][1],
        "history": [list(h) for h in task.history],
        "cpus": spec.cpu_millis / 1000,
        "memory": spec.memory_bytes,
        "pids": spec.pids,
        "timeout": spec.timeout_s,
        "user": spec.user,
        "retries": spec.retries,
        "ro": [f"{s}:{d}" for s, d, w in spec.binds if not w],
        "rw": [f"{s}:{d}" for s, d, w in spec.binds if w],
        "network": spec.network,
        "allow": list(spec.allow),
        "allow_hosts": list(spec.allow_hosts),
        "egress_rate": spec.egress_rate,
        "conn_rate": spec.conn_rate,
        "publish": list(spec.publish),
        **{key: getattr(spec, key) for key in _SANDBOX},
        "agent": spec.agent or None,
    }
    running = node.running.get(task.id)
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


# -- handlers -----------------------------------------------------------------------------------


async def _submit(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        raise BadField("body", "is not valid JSON") from None
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
            "cpus",
            f"requests {spec.cpu_millis / 1000:g} CPUs, this node has "
            f"{inv.allocatable_cpu_millis / 1000:g} allocatable (it could never start)",
        )
    if spec.memory_bytes > inv.allocatable_memory_bytes:
        raise BadField(
            "memory",
            f"requests {spec.memory_bytes >> 20} MiB, this node has "
            f"{inv.allocatable_memory_bytes >> 20} MiB allocatable (it could never start)",
        )
    task = await node.submit(spec)
    return web.json_response(task_json(request.app[NODE], task), status=201)


async def _list(request: web.Request) -> web.Response:
    node = request.app[NODE]
    tenant = request.query.get("tenant")
    state = request.query.get("state")
    if state is not None and state not in {s.value for s in State}:
        raise BadField(
            "state", f"unknown state {state!r} (use {', '.join(s.value for s in State)})"
        )
    everything = request.query.get("all") in ("1", "true")
    tasks = [
        t
        for t in node.manager.tasks.values()
        if (tenant is None or t.spec.tenant == tenant)
        and (state is None or t.state.value == state)
        and (everything or state is not None or t.state not in TERMINAL)
    ]
    tasks.sort(key=lambda t: t.seq)
    return web.json_response([task_json(node, t) for t in tasks])


async def _get(request: web.Request) -> web.Response:
    return web.json_response(task_json(request.app[NODE], _task(request)))


async def _cancel(request: web.Request) -> web.Response:
    task = await request.app[NODE].cancel(request.match_info["id"])
    return web.json_response(task_json(request.app[NODE], task), status=202)


async def _put_egress(request: web.Request) -> web.Response:
    """Replaces a task's egress rules and rates (absent ones become empty): live while it runs."""
    node = request.app[NODE]
    task = _task(request)
    try:
        body = await request.json()
    except ValueError:
        raise BadField("body", "is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadField("body", "must be a JSON object")
    for key in body:
        if key not in _EGRESS:
            raise BadField(key, f"unknown field (known: {', '.join(_EGRESS)})")
    rules = _egress(body)
    try:
        replace(task.spec, **rules)
    except TaskError as e:
        raise _bad_field(e, _EGRESS) from None
    done = await node.update_egress(task.id, rules)
    return web.json_response(task_json(node, done))


async def _heartbeat(request: web.Request) -> web.Response:
    request.app[NODE].heartbeat(_task(request).id)
    return web.json_response({"ok": True})


async def _logs(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    task = _task(request)
    follow = request.query.get("follow") in ("1", "true")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    attempt = 1
    offset = 0
    while True:
        current = node.manager.get(task.id)
        path = node.log_path(task.id, attempt)
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                while chunk := f.read(1 << 16):
                    await resp.write(chunk)
                    offset += len(chunk)
        if attempt < current.attempt:
            attempt, offset = attempt + 1, 0
            continue
        if not follow or (current.state in TERMINAL and task.id not in node.running):
            break
        await asyncio.sleep(0.05)
    await resp.write_eof()
    return resp


async def _events(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
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
    await resp.write_eof()
    return resp


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
    await asyncio.to_thread(request.app[NODE].manager.store.write_checkpoint, task.id, blob)
    return web.json_response({"bytes": len(blob)})


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


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _openapi(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_OPENAPI, headers={"Content-Type": "application/json"})


def _add_task_routes(r: web.UrlDispatcher) -> None:
    """The routes about one task, which a task's own token may also use (on the task socket)."""
    r.add_get("/v1/tasks/{id}", _get)
    r.add_post("/v1/tasks/{id}/heartbeat", _heartbeat)
    r.add_get("/v1/tasks/{id}/logs", _logs)
    r.add_get("/v1/tasks/{id}/checkpoint", _get_checkpoint)
    r.add_put("/v1/tasks/{id}/checkpoint", _put_checkpoint)


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
    _add_task_routes(r)
    r.add_get("/v1/events", _events)
    r.add_get("/v1/node", _node)
    r.add_get("/metrics", _metrics)
    r.add_get("/healthz", _healthz)
    r.add_get("/openapi.json", _openapi)
    return app


class TaskTokens:
    """The memory API's authenticator for per-task tokens: the task's tenant, pinned to it."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def authenticate(self, token: str) -> Principal | None:
        task = self._node.manager.task_of_token(token)
        return None if task is None else Principal(task.spec.tenant, task.id)


def task_attribution(node: Node) -> Attribution:
    """The inference proxy's attribution inside the node: a task's token (the SDKs send it as
    their API key) bills that task and its tenant; anything else goes by the proxy's own keys."""

    def attribute(request: web.Request, config: ProxyConfig) -> InferencePrincipal | None:
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key", "")
        task = node.manager.task_of_token(key) if key else None
        if task is None:
            return key_attribution(request, config)
        tenant = task.spec.tenant
        return InferencePrincipal(tenant, task.id, config.tenants.get(tenant), pinned=True)

    return attribute


def task_app(node: Node, memory: web.Application) -> web.Application:
    """The task socket's API: `memory` (from `storage.api.make_app` with `TaskTokens(node)`,
    whose guard authenticates every request) plus the task's own record, logs, checkpoint and
    heartbeat. Memory routes stay at their usual paths so `agentnode.sdk.Memory` works as is."""
    memory.middlewares.append(_errors)
    memory[NODE] = node
    memory[PINNED] = True
    _add_task_routes(memory.router)
    return memory
