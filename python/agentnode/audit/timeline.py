"""One task's timeline: its audit records in order, read from the log's per-task index.

`GET /v1/tasks/{id}/timeline` answers a JSON list (`?after=SEQ` for what came after a record
already seen); `?follow=1` streams the records as JSON lines until the task has ended. Each
entry is the audit record without its chain fields (`prev`, `hash`), so the kinds the node
writes (`state`, `exec`, `egress_denied`, `llm_call`, `tool_call`, `checkpoint`, `oom`,
`pids_limit`) and any a later layer adds come through as they are.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from agentnode.audit.log import MAX_SEQ, AuditLog
from agentnode.http_common import flag, until_client_leaves
from agentnode.tasks.model import TERMINAL, Task

__all__ = ["add_routes", "entries"]

_CHAIN = ("prev", "hash")
_FOLLOW_POLL_S = 0.1
#: How long a follow waits for an ended task's last state record before it ends anyway (a
#: node stopping may never write it).
_LAST_RECORD_S = 5.0
_ENDS = frozenset(s.value for s in TERMINAL)
_MAX_SEQ_DIGITS = len(str(MAX_SEQ))


def entries(log: AuditLog, task: str, *, after: int = 0) -> list[dict[str, Any]]:
    """`task`'s records after seq `after`, oldest first, without chain fields."""
    return [
        {k: v for k, v in r.items() if k not in _CHAIN} for r in log.task_records(task, after=after)
    ]


def add_routes(
    router: web.UrlDispatcher,
    *,
    task_of: Callable[[web.Request], Task],
    log_of: Callable[[web.Request], AuditLog],
    running: Callable[[web.Request, str], bool],
) -> None:
    """Adds `GET /v1/tasks/{id}/timeline`. `task_of` finds the task and checks the caller may
    see it; `running` says whether the task may still add records."""

    async def timeline(request: web.Request) -> web.StreamResponse:
        task = task_of(request)
        log = log_of(request)
        raw = request.query.get("after", "0")
        # ASCII digits only: int() takes '²' and other scripts' digits too.
        if not (
            raw.isascii() and raw.isdigit() and len(raw) <= _MAX_SEQ_DIGITS and int(raw) < MAX_SEQ
        ):
            return web.json_response(
                {
                    "error": f"after: must be a record seq (a whole number), got {raw[:40]!r}",
                    "field": "after",
                },
                status=400,
            )
        after = int(raw)
        try:
            follow = flag(request.query, "follow")
        except ValueError as e:
            return web.json_response({"error": f"follow: {e}", "field": "follow"}, status=400)
        await asyncio.to_thread(log.flush)
        if not follow:
            return web.json_response(await asyncio.to_thread(entries, log, task.id, after=after))
        return await until_client_leaves(functools.partial(stream, task, log, after))(request)

    async def stream(
        task: Task, log: AuditLog, after: int, request: web.Request, resp: web.StreamResponse
    ) -> None:
        resp.content_type = "application/x-ndjson"
        await resp.prepare(request)
        # The manager records a task's end before its state record reaches the log: the
        # stream ends with that record, not with the end it reads first.
        closed, ended_at = False, None
        while True:
            ended = task_of(request).state in TERMINAL and not running(request, task.id)
            if ended:
                await asyncio.to_thread(log.flush)  # its last records
                ended_at = ended_at or time.monotonic()
            batch = await asyncio.to_thread(entries, log, task.id, after=after)
            if batch:
                await resp.write("".join(json.dumps(e) + "\n" for e in batch).encode())
                after = batch[-1]["seq"]
                states = [e["state"] for e in batch if e["kind"] == "state"]
                closed = states[-1] in _ENDS if states else closed
            if ended_at is not None and (closed or time.monotonic() - ended_at > _LAST_RECORD_S):
                break
            if request.transport is None or request.transport.is_closing():
                return  # the client left while there was nothing to send
            await asyncio.sleep(_FOLLOW_POLL_S)

    router.add_get("/v1/tasks/{id}/timeline", timeline)
