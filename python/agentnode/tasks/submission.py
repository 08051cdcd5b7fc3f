"""What a task submission body (`POST /v1/tasks`, and the Agent Protocol's task creation,
which submits through it) means: a `TaskSpec`, or `BadField` naming the first bad field."""

from __future__ import annotations

from typing import Any

from agentnode.errors import TaskError
from agentnode.isolation.spec import FIELDS, Sandbox, check_duration
from agentnode.tasks.model import CLASSES, TaskSpec

__all__ = ["BadField", "spec_from_json"]

#: The fields of a POST /v1/tasks body besides the sandbox's (`agentnode.isolation.spec.FIELDS`).
_TASK_FIELDS = (
    "tenant", "command", "priority", "heartbeat", "retries", "retry_lost", "cpu_request"
)  # fmt: skip


class BadField(Exception):
    """A request field is missing or malformed: 400 naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def spec_from_json(body: Any) -> TaskSpec:
    """A TaskSpec from a POST /v1/tasks body; BadField names the first bad field."""
    if not isinstance(body, dict):
        raise BadField("body", "must be a JSON object")
    for key in body:
        if key not in _TASK_FIELDS and key not in FIELDS:
            known = ", ".join(sorted((*_TASK_FIELDS, *FIELDS)))
            raise BadField(key, f"unknown field (known: {known})")
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
    retries = body.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)):
        raise BadField("retries", f"must be an integer, got {retries!r}")
    retry_lost = body.get("retry_lost", True)
    if not isinstance(retry_lost, bool):
        raise BadField("retry_lost", f"must be true or false, got {retry_lost!r}")
    try:
        sandbox = Sandbox.from_json({k: v for k, v in body.items() if k in FIELDS})
        sandbox.check_host()
        heartbeat = body.get("heartbeat")
        return TaskSpec(
            tenant=tenant,
            command=tuple(command),
            cls=priority,
            sandbox=sandbox,
            heartbeat_s=None if heartbeat is None else check_duration("heartbeat", heartbeat),
            retries=retries,
            retry_lost=retry_lost,
            cpu_request=body.get("cpu_request"),
        )
    except TaskError as e:
        head = str(e).split(" ", 2)[:2]
        raise BadField(next((k for k in _TASK_FIELDS if k in head), "body"), str(e)) from None
