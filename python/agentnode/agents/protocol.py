"""The Agent Protocol (agentprotocol.ai, v1) on the node's control API, so the clients and
benchmarks that speak it can drive any agent on the node.

The `agent-protocol` package on PyPI (1.0.2) pins pydantic 1 and FastAPI, which this node's
dependencies cannot share, so these routes follow its OpenAPI document (`/ap/v1/...`, the
models of its `agent_protocol.models`) on the node's aiohttp app instead:

- An AP task is a node task, with the same id. `POST /ap/v1/agent/tasks` submits an agent task
  whose goal is the AP `input`: the reference runtime (`agentnode.runtime`) unless
  `additional_input.agent` names `autogpt` or `openclaw`; `additional_input.model` (default: the
  first model the node's proxy serves), `.tools`, `.max_steps` (runtime) and `.steps`
  (autogpt) are passed on, and `.task` holds any other fields of `POST /v1/tasks` (sandbox,
  limits, retries, ...), checked as there. The input is kept in the task's environment
  (`AGENTNODE_AP_INPUT`), which is also what marks a node task as an AP task.
- The agent runs on its own; its steps are what the node records about it in the task's
  timeline, in order: model calls (`llm_call`), tool calls, execs and egress denials, then,
  once the task has ended, a last step (`is_last`) whose output is the task's last line of
  output. `POST .../steps` executes the next one: it answers it as soon as the agent has taken
  it (waiting up to `STEP_WAIT_S`) and records that it was executed in the audit log
  (`ap_step`), which is what `GET .../steps` lists, so the list survives a daemon restart.
  A step's `input` goes first to the running agent: appended to the task's inbox
  ($AGENTNODE_INBOX inside, `TaskStore.inbox_path` outside; the reference runtime adds it to
  its conversation before its next model call), or, once the agent has ended, nowhere, which
  the step's `additional_output.input_delivered` says.
- Artifacts are the regular files in the task's workspace (symlinks are neither listed nor
  followed); an artifact's id is a digest of its path. Uploads go into the workspace
  (`ap_upload` in the audit log marks them as not agent-created).

Routes are on the admin API, authenticated like the rest of it. `/ap/v1/...` is tenant
`default`'s; `/t/TENANT/ap/v1/...` is TENANT's: each tenant sees only its own AP tasks, and
another's id answers 404 as an unknown one does. Errors are the AP's `{"message": ...}`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from agentnode.agents.kinds import AgentSpec, agents_cache
from agentnode.agents.kinds import prepare as prepare_agent
from agentnode.audit.timeline import entries
from agentnode.errors import (
    AgentnodeError,
    AuditError,
    DiskFullError,
    QueueFullError,
    TaskError,
)
from agentnode.http_common import BodyTooLarge, json_body
from agentnode.node.runner import INBOX, INBOX_ENV, Node
from agentnode.runtime.cli import this_python
from agentnode.tasks.model import _TENANT as TENANT_NAME
from agentnode.tasks.model import TERMINAL, Task
from agentnode.tasks.submission import BadField, spec_from_json
from agentnode.trees import regular_files

__all__ = ["STEP_WAIT_S", "add_protocol_routes"]

#: How long `POST .../steps` waits for the agent's next step before answering 504.
STEP_WAIT_S = 120.0
#: The environment variables an AP task's input is kept in.
INPUT_ENV, ADDITIONAL_ENV = "AGENTNODE_AP_INPUT", "AGENTNODE_AP_ADDITIONAL_INPUT"
#: Timeline records that are an agent's steps.
_STEP_KINDS = ("llm_call", "tool_call", "exec", "egress_denied")
_FINAL = "final"
_MAX_INPUT = 64 << 10
_MAX_UPLOAD = 64 << 20
_MAX_ARTIFACTS = 10_000
_PAGE_MAX = 100
_POLL_S = 0.1
_RECORD_NOISE = ("seq", "time", "task", "tenant", "kind")

_NODE = web.AppKey("ap_node", Node)
_LOCKS = web.AppKey("ap_step_locks", dict)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    """An AP request the node refuses: answered as `{"message": ...}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _handler(func: Callable[[web.Request, Node, str], Awaitable[web.StreamResponse]]) -> _Handler:
    """`func(request, node, tenant)` with the AP's error bodies."""

    async def handle(request: web.Request) -> web.StreamResponse:
        tenant = request.match_info.get("tenant", "default")
        try:
            if not TENANT_NAME.fullmatch(tenant):
                raise _Refused(400, f"invalid tenant {tenant!r} (1-128 letters, digits, _.-)")
            return await func(request, request.app[_NODE], tenant)
        except _Refused as e:
            return web.json_response({"message": str(e)}, status=e.status)
        except (QueueFullError, DiskFullError, AuditError) as e:
            # The node's own state, not the request: the queue full (429), or its disk, where
            # the task store or the audit log cannot write (507, as the node's API answers).
            status = 429 if isinstance(e, QueueFullError) else 507
            return web.json_response({"message": str(e)}, status=status)
        except AgentnodeError as e:  # a field of the task it would submit
            return web.json_response({"message": str(e)}, status=422)

    return handle


# -- tasks --------------------------------------------------------------------------------------


def _env(task: Task) -> dict[str, str]:
    return dict(task.spec.sandbox.env)


def _ap_task(node: Node, tenant: str, task_id: str) -> Task:
    """The tenant's AP task `task_id`; 404 for another tenant's, a non-AP task, or none."""
    try:
        task = node.manager.get(task_id)
    except TaskError:
        task = None
    if task is None or task.spec.tenant != tenant or INPUT_ENV not in _env(task):
        raise _Refused(404, f"no task {task_id!r} (list tasks to see valid ids)")
    return task


def _default_model(node: Node) -> str:
    inference = node.config.inference
    for deployment in inference.deployments.values() if inference is not None else ():
        for model in deployment.models:
            return str(model)
    raise _Refused(
        422, "no model: give additional_input.model, or serve one on the node's [inference]"
    )


def _option(extra: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """`extra[name]` checked to be a `kind` (a positive one for int); missing or null is
    `default`, as the protocol's optional fields are."""
    value: Any = extra.get(name)
    if value is None:
        return default
    if type(value) is not kind or (isinstance(value, int) and value < 1):
        what = "a positive int" if kind is int else f"a {kind.__name__}"
        raise _Refused(422, f"additional_input.{name}: must be {what}, got {value!r}")
    return value


def _submission(node: Node, tenant: str, text: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The POST /v1/tasks body of an AP task: the agent `extra` names, `text` its goal."""
    # Every option is checked whichever agent reads it: one that is wrong is never ignored.
    kind = _option(extra, "agent", str, "runtime")
    tools = _option(extra, "tools", list)
    if tools is not None and not all(isinstance(t, str) and t and "," not in t for t in tools):
        raise _Refused(422, f"additional_input.tools: must be tool names, got {tools!r}")
    max_steps, steps = _option(extra, "max_steps", int), _option(extra, "steps", int)
    if kind not in ("runtime", "autogpt", "openclaw"):
        raise _Refused(
            422, f"additional_input.agent: {kind!r} is not one of runtime, autogpt, openclaw"
        )
    model = _option(extra, "model", str) or _default_model(node)
    binds, env = this_python()
    agent: dict[str, Any] = {"kind": kind, "model": model}
    if kind == "runtime":
        command = [sys.executable, "-m", "agentnode.runtime", "--model", model]
        if tools is not None:
            command += ["--tools", ",".join(tools)]
        if max_steps is not None:
            command += ["--max-steps", str(max_steps)]
        command += ["--", text]
        agent = {"kind": "python", "model": model}
    else:
        command = [text]
        if steps is not None:
            agent["steps"] = steps
    fields = _option(extra, "task", dict, {})
    taken = sorted(set(fields) & {"tenant", "command", "agent"})
    if taken:
        raise _Refused(422, f"additional_input.task: {', '.join(taken)} cannot be given here")
    given_env = fields.get("env", {})
    if not isinstance(given_env, dict):
        raise _Refused(422, f"additional_input.task.env: must be an object, got {given_env!r}")
    ro = fields.get("ro", [])
    return {
        **fields,
        "tenant": tenant,
        "command": command,
        "ro": [*binds, *(ro if isinstance(ro, list) else [ro])],
        "env": {
            **given_env,
            **env,
            INPUT_ENV: text,
            ADDITIONAL_ENV: json.dumps(extra),
            INBOX_ENV: INBOX,
        },
        "agent": agent,
    }


async def _create_task(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    body = await _json_body(request)
    text, extra = body.get("input"), body.get("additional_input")
    if not isinstance(text, str) or not text.strip():
        raise _Refused(422, "input: the task's goal, a non-empty string, is required")
    if len(text.encode()) > _MAX_INPUT:
        raise _Refused(422, f"input: {len(text.encode())} bytes, at most {_MAX_INPUT}")
    if extra is not None and not isinstance(extra, dict):
        raise _Refused(422, f"additional_input: must be an object or null, got {extra!r}")
    submission = _submission(node, tenant, text, extra or {})
    agent = submission.pop("agent")
    try:
        spec = prepare_agent(
            spec_from_json(submission),
            AgentSpec.parse(agent),
            network_given=bool(submission.get("network")),
            cache=agents_cache(node.config.data_dir),
        )
    except BadField as e:
        raise _Refused(422, str(e)) from None
    task, _ = await node.submit_once(spec, key=None)
    return web.json_response(await _task_json(node, task))


async def _task_json(node: Node, task: Task) -> dict[str, Any]:
    env = _env(task)
    return {
        "task_id": task.id,
        "input": env[INPUT_ENV],
        "additional_input": json.loads(env.get(ADDITIONAL_ENV) or "{}") or None,
        "artifacts": await asyncio.to_thread(_artifacts, node, task),
    }


def _ap_tasks(node: Node, tenant: str) -> Iterator[Task]:
    """The tenant's AP tasks, live and stored, in submission order."""
    after: int | None = 0
    while after is not None:
        rows, after = node.manager.page(after=after, limit=1000, ended=True, tenant=tenant)
        for row in rows:
            env = dict(row["spec"]["sandbox"].get("env") or {})
            if INPUT_ENV in env:
                yield node.manager.get(row["id"])


def _page(request: web.Request, items: list[Any], key: str) -> dict[str, Any]:
    """One page of `items` as `{key: [...], "pagination": {...}}` (AP's query parameters)."""
    numbers = {}
    for name, default in (("current_page", 1), ("page_size", 10)):
        raw = request.query.get(name, str(default))
        if not raw.isdigit() or int(raw) < 1:
            raise _Refused(400, f"{name}: must be a whole number from 1, got {raw!r}")
        numbers[name] = int(raw)
    page, size = numbers["current_page"], min(numbers["page_size"], _PAGE_MAX)
    return {
        key: items[(page - 1) * size : page * size],
        "pagination": {
            "total_items": len(items),
            "total_pages": math.ceil(len(items) / size),
            "current_page": page,
            "page_size": size,
        },
    }


async def _list_tasks(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    # On the loop, like GET /v1/tasks: the manager's live tasks change only there.
    tasks = list(_ap_tasks(node, tenant))
    page = _page(request, tasks, "tasks")
    page["tasks"] = [await _task_json(node, t) for t in page["tasks"]]
    return web.json_response(page)


async def _get_task(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    task = _ap_task(node, tenant, request.match_info["task_id"])
    return web.json_response(await _task_json(node, task))


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; no body (none, or an empty one) is `{}` (AP bodies are
    optional). A body that is there is JSON: one of only whitespace is refused as any other
    that is not."""
    if not request.body_exists:
        return {}
    try:
        # The node's reader: a body too large, nested too deeply or holding a lone surrogate
        # is refused like on every other route, not a 500.
        body = await json_body(request)
    except BodyTooLarge as e:
        raise _Refused(413, str(e)) from None
    except ValueError as e:
        raise _Refused(400, f"the body {e}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise _Refused(422, "the body must be a JSON object")
    return body


# -- steps --------------------------------------------------------------------------------------


def _ended(node: Node, task: Task) -> bool:
    return node.manager.get(task.id).state in TERMINAL and task.id not in node.running


def _record_step(record: dict[str, Any]) -> tuple[str, str]:
    """A timeline record's step name and output."""
    kind = record["kind"]
    if kind == "llm_call":
        detail = f"{record.get('model')}"
        output = (
            f"{record.get('endpoint')} on {record.get('model')} (status {record.get('status')}): "
            f"{record.get('input')} tokens in (+{record.get('cached_input')} cached), "
            f"{record.get('output')} out (+{record.get('reasoning')} reasoning), "
            f"{record.get('cost')} USD"
        )
    elif kind == "tool_call":
        detail = str(record.get("tool"))
        output = f"tool {record.get('tool')}: {record.get('class')}"
    elif kind == "exec":
        detail = os.path.basename(str(record.get("filename")))
        output = " ".join(record.get("argv") or [])
    else:
        detail = f"{record.get('address')}:{record.get('port')}"
        output = f"connection to {detail} denied: {record.get('reason')}"
    return f"{kind} {detail}", output


def _last_line(node: Node, task: Task) -> str:
    """The task's last line of output (its answer, for the runtime), from its last attempt."""
    path = node.log_path(task.id, node.manager.get(task.id).attempt)
    try:
        with path.open("rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line.strip()), "")


def _timeline(node: Node, task: Task) -> list[dict[str, Any]]:
    node.audit.flush()
    return entries(node.audit, task.id)


def _steps(node: Node, task: Task) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The steps executed so far (oldest first) and the next one the agent has taken, if any."""
    ended = _ended(node, task)  # before the records: none can follow an end seen first
    records = _timeline(node, task)
    executed = {r["step"]: r for r in records if r["kind"] == "ap_step"}
    taken = [r for r in records if r["kind"] in _STEP_KINDS]
    steps: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    for r in taken:
        name, output = _record_step(r)
        step: dict[str, Any] = {
            "step_id": str(r["seq"]), "name": name, "output": output,
            "additional_output": {k: v for k, v in r.items() if k not in _RECORD_NOISE},
            "artifacts": [], "is_last": False}  # fmt: skip
        if step["step_id"] in executed:
            steps.append(step)
        elif pending is None:
            pending = step
    if ended and pending is None:
        current = node.manager.get(task.id)
        final: dict[str, Any] = {
            "step_id": _FINAL, "name": "finish", "output": _last_line(node, task),
            "additional_output": {"state": current.state.value, "exit_code": current.exit_code,
                                  "reason": current.reason},
            "artifacts": _artifacts(node, task), "is_last": True}  # fmt: skip
        if _FINAL in executed:
            steps.append(final)
        else:
            pending = final
    for step in steps:
        marker = executed[step["step_id"]]
        step.update(task_id=task.id, status="completed", input=marker.get("input"))
        step["additional_input"] = marker.get("additional_input")
        if marker.get("input"):
            step["additional_output"]["input_delivered"] = marker.get("delivered", False)
    return steps, pending


async def _list_steps(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    task = _ap_task(node, tenant, request.match_info["task_id"])
    steps, _ = await asyncio.to_thread(_steps, node, task)
    return web.json_response(_page(request, steps, "steps"))


async def _get_step(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    task = _ap_task(node, tenant, request.match_info["task_id"])
    steps, _ = await asyncio.to_thread(_steps, node, task)
    step_id = request.match_info["step_id"]
    for step in steps:
        if step["step_id"] == step_id:
            return web.json_response(step)
    raise _Refused(404, f"task {task.id} has no executed step {step_id!r}")


async def _execute_step(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    task = _ap_task(node, tenant, request.match_info["task_id"])
    body = await _json_body(request)
    text, extra = body.get("input"), body.get("additional_input")
    if text is not None and not isinstance(text, str):
        raise _Refused(422, f"input: must be a string or null, got {text!r}")
    if text is not None and len(text.encode()) > _MAX_INPUT:
        raise _Refused(422, f"input: {len(text.encode())} bytes, at most {_MAX_INPUT}")
    if extra is not None and not isinstance(extra, dict):
        raise _Refused(422, f"additional_input: must be an object or null, got {extra!r}")
    locks: dict[str, asyncio.Lock] = request.app[_LOCKS]
    # One step at a time per task: two concurrent posts must not both take the same step.
    lock = locks.setdefault(task.id, asyncio.Lock())
    async with lock:
        # The input goes to the agent at once (its inbox), whichever step this post answers.
        delivered = bool(text) and not _ended(node, task)
        if delivered:
            line = json.dumps({"input": text, "additional_input": extra}).encode()
            await asyncio.to_thread(node.manager.store.deliver, task.id, line)
        deadline = asyncio.get_running_loop().time() + STEP_WAIT_S
        while True:
            steps, pending = await asyncio.to_thread(_steps, node, task)
            if steps and steps[-1]["is_last"]:
                locks.pop(task.id, None)
                raise _Refused(409, f"task {task.id} has ended and its last step was executed")
            if pending is not None:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise _Refused(
                    504, f"the agent took no new step in {STEP_WAIT_S:g} s (post the step again)"
                )
            await asyncio.sleep(_POLL_S)
        marker = {"kind": "ap_step", "task": task.id, "tenant": tenant,
                  "step": pending["step_id"], "input": text,
                  "additional_input": extra, "delivered": delivered}  # fmt: skip
        await asyncio.to_thread(node.audit.append, marker)
        if pending["is_last"]:
            locks.pop(task.id, None)
    pending.update(task_id=task.id, status="completed", input=text)
    pending["additional_input"] = extra
    if text:
        # Not silently dropped: an agent that has ended can be sent nothing.
        pending["additional_output"]["input_delivered"] = delivered
    return web.json_response(pending)


# -- artifacts ----------------------------------------------------------------------------------


def _workspace(node: Node, task: Task) -> Path:
    return node.config.data_dir / "workspaces" / task.id


def _artifact_id(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()[:32]


def _uploaded(node: Node, task: Task) -> set[str]:
    return {r["path"] for r in _timeline(node, task) if r["kind"] == "ap_upload"}


def _artifacts(node: Node, task: Task) -> list[dict[str, Any]]:
    uploaded = _uploaded(node, task)
    out: list[dict[str, Any]] = []
    # Symlinks are neither listed nor followed: a task could point one anywhere on the host.
    for relative in regular_files(_workspace(node, task)):
        if len(out) == _MAX_ARTIFACTS:
            break
        folder, name = os.path.split(relative)
        out.append({"artifact_id": _artifact_id(relative), "agent_created": relative not in
                    uploaded, "file_name": name, "relative_path": folder})  # fmt: skip
    return out


async def _list_artifacts(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    task = _ap_task(node, tenant, request.match_info["task_id"])
    artifacts = await asyncio.to_thread(_artifacts, node, task)
    return web.json_response(_page(request, artifacts, "artifacts"))


def _open_under(root: Path, relative: str, flags: int) -> int:
    """An fd for `relative` under `root` opened one component at a time with O_NOFOLLOW, so
    neither a `..` nor a symlink the task swapped in can lead outside; O_CREAT makes missing
    directories (owned like `root`) and the file. Only a regular file with one link is opened
    (a FIFO the task made there would block the opening thread for good; a hard link could
    lead to a file of the host), and O_TRUNC applies once it is known to be one."""
    parts = relative.split("/")
    if not relative or "\0" in relative or any(p in ("", ".", "..") for p in parts):
        raise _Refused(422, f"relative_path: {relative!r} is not a relative path in the workspace")
    create = bool(flags & os.O_CREAT)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise _Refused(409, "the task has no workspace (yet: it is made when it starts)") from None
    try:
        owner = os.fstat(fd)
        for part in parts[:-1]:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.chown(part, owner.st_uid, owner.st_gid, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        opening = (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK
        out = os.open(parts[-1], opening, 0o644, dir_fd=fd)
        try:
            st = os.fstat(out)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise _Refused(404 if not create else 422, f"{relative}: not a regular file")
            os.set_blocking(out, True)
            if flags & os.O_TRUNC:
                os.ftruncate(out, 0)
            if create:
                os.fchown(out, owner.st_uid, owner.st_gid)
        except BaseException:
            os.close(out)
            raise
        return out
    except OSError as e:
        # ENXIO: a FIFO with no reader, opened to write without blocking.
        why = "not a regular file" if e.errno == errno.ENXIO else e.strerror
        raise _Refused(404 if not create else 422, f"{relative}: {why}") from None
    finally:
        os.close(fd)


async def _download(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    task = _ap_task(node, tenant, request.match_info["task_id"])
    artifact_id = request.match_info["artifact_id"]
    root = _workspace(node, task)
    relative = await asyncio.to_thread(
        lambda: next((p for p in regular_files(root) if _artifact_id(p) == artifact_id), None)
    )
    if relative is None:
        raise _Refused(404, f"task {task.id} has no artifact {artifact_id!r}")
    fd = await asyncio.to_thread(_open_under, root, relative, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _Refused(404, f"task {task.id} has no artifact {artifact_id!r}")
        # A task names its files: nothing of the name may break out of the header.
        name = re.sub(r'[^\x20-\x7e]|["\\]', "_", os.path.basename(relative))
        resp = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
        await resp.prepare(request)
        while chunk := await asyncio.to_thread(f.read, 1 << 20):
            await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _upload(request: web.Request, node: Node, tenant: str) -> web.StreamResponse:
    task = _ap_task(node, tenant, request.match_info["task_id"])
    try:
        relative, data = await _read_upload(request)
    except (ValueError, HttpProcessingError) as e:  # a body that is not what it says it is
        text = e.message if isinstance(e, HttpProcessingError) else str(e)
        reason = (text.strip().splitlines() or [type(e).__name__])[0].rstrip(":")
        raise _Refused(400, f"the body is not valid multipart/form-data: {reason}") from None
    root = _workspace(node, task)

    def write() -> None:
        fd = _open_under(root, relative, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    await asyncio.to_thread(write)
    record = {"kind": "ap_upload", "task": task.id, "tenant": tenant, "path": relative}
    await asyncio.to_thread(node.audit.append, record)
    folder, name = os.path.split(relative)
    return web.json_response({"artifact_id": _artifact_id(relative), "agent_created": False,
                              "file_name": name, "relative_path": folder})  # fmt: skip


async def _read_upload(request: web.Request) -> tuple[str, bytes]:
    """The upload's path in the workspace and its bytes, from its multipart form."""
    if not request.content_type.startswith("multipart/"):
        raise _Refused(422, "upload an artifact as multipart/form-data: file, relative_path")
    reader = await request.multipart()
    folder, data, name = "", b"", None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _Refused(422, "a nested multipart body is not an artifact")
        if part.name == "relative_path":
            folder = (await part.text()).rstrip("/")
        elif part.name == "file":
            name = part.filename or "artifact"
            chunks = []
            size = 0
            while chunk := await part.read_chunk(1 << 16):
                size += len(chunk)
                if size > _MAX_UPLOAD:
                    raise _Refused(413, f"file: larger than {_MAX_UPLOAD >> 20} MiB")
                chunks.append(chunk)
            data = b"".join(chunks)
        else:  # not silently dropped: a client's misspelt relative_path would land elsewhere
            raise _Refused(422, f"{part.name!r}: an upload's parts are file and relative_path")
    if name is None:
        raise _Refused(422, "file: the upload has no file part")
    return (f"{folder}/{name}" if folder else name), data


def add_protocol_routes(app: web.Application, node: Node) -> None:
    """Adds the Agent Protocol's v1 routes under `/ap/v1` (tenant `default`) and
    `/t/{tenant}/ap/v1` to the admin `app`."""
    app[_NODE] = node
    app[_LOCKS] = {}
    routes = (
        ("POST", "/agent/tasks", _create_task),
        ("GET", "/agent/tasks", _list_tasks),
        ("GET", "/agent/tasks/{task_id}", _get_task),
        ("POST", "/agent/tasks/{task_id}/steps", _execute_step),
        ("GET", "/agent/tasks/{task_id}/steps", _list_steps),
        ("GET", "/agent/tasks/{task_id}/steps/{step_id}", _get_step),
        ("POST", "/agent/tasks/{task_id}/artifacts", _upload),
        ("GET", "/agent/tasks/{task_id}/artifacts", _list_artifacts),
        ("GET", "/agent/tasks/{task_id}/artifacts/{artifact_id}", _download),
    )
    for prefix in ("/ap/v1", "/t/{tenant}/ap/v1"):
        for method, path, func in routes:
            app.router.add_route(method, prefix + path, _handler(func))
