"""The Agent Protocol's own Python client (`agent-protocol-client` from PyPI, which needs
pydantic 1, so it runs from a venv of its own) driving one task on a node:
`python ap_sdk_client.py BASE_URL TOKEN 'CREATE_BODY_JSON' [FIRST_INPUT]` creates the task,
executes steps until `is_last` (each with the input "next", or the first with FIRST_INPUT and
the others none), lists steps and artifacts (every answer parsed by the client's models),
downloads each artifact, uploads one, asks for an unknown task, and prints one JSON report."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from typing import Any

from agent_protocol_client import (
    AgentApi,
    ApiClient,
    ApiException,
    Configuration,
    StepRequestBody,
    TaskRequestBody,
)


async def main(base: str, token: str, body: dict[str, Any], first: str | None) -> dict[str, Any]:
    config = Configuration(host=base)
    async with ApiClient(config, header_name="Authorization", header_value=f"Bearer {token}") as c:
        api = AgentApi(c)
        task = await api.create_agent_task(task_request_body=TaskRequestBody(**body))
        steps = []
        for i in range(50):
            given = "next" if first is None else first if i == 0 else None
            step = await api.execute_agent_task_step(
                task_id=task.task_id, step_request_body=StepRequestBody(input=given)
            )
            steps.append(step)
            if step.is_last:
                break
        listed = await api.list_agent_task_steps(task_id=task.task_id, page_size=100)
        with tempfile.TemporaryDirectory() as tmp:
            note = os.path.join(tmp, "note.txt")  # the client uploads a file by its path
            with open(note, "w") as f:
                f.write("from the client")
            uploaded = await api.upload_agent_task_artifacts(
                task_id=task.task_id, file=note, relative_path="given"
            )
        artifacts = await api.list_agent_task_artifacts(task_id=task.task_id, page_size=100)
        contents = {}
        for a in artifacts.artifacts:
            data = await api.download_agent_task_artifact(
                task_id=task.task_id, artifact_id=a.artifact_id
            )
            contents[f"{a.relative_path}/{a.file_name}".lstrip("/")] = bytes(data).decode(
                errors="replace"
            )
        try:
            await api.get_agent_task(task_id="t-nope")
            missing = 200
        except ApiException as e:
            missing = e.status
        tasks = await api.list_agent_tasks()
    return {
        "task_id": task.task_id,
        "steps": [
            {
                "name": s.name,
                "output": s.output,
                "is_last": s.is_last,
                "delivered": (s.additional_output or {}).get("input_delivered"),
            }
            for s in steps
        ],
        "listed": [s.step_id for s in listed.steps],
        "executed": [s.step_id for s in steps],
        "uploaded": uploaded.agent_created,
        "artifacts": contents,
        "missing": missing,
        "tasks": [t.task_id for t in tasks.tasks],
    }


if __name__ == "__main__":
    first = sys.argv[4] if len(sys.argv) > 4 else None
    report = asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), first))
    print(json.dumps(report))
