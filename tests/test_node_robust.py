"""The node survives what one task or one client does: a task whose start raises, a poison
record across restarts, forged or stale credentials, a client that leaves, a stall, a full disk.

Real daemons (`agentnode run` subprocesses) on private data dirs; bad records are written into
the task store the way an older version or a missed check would have left them."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from agentnode.tasks import TaskStore
from agentnode.tasks.model import State, Task, TaskSpec
from conftest import root_only
from node_daemon import Daemon, daemon

pytestmark = root_only


def forged(spec: TaskSpec, **fields: Any) -> TaskSpec:
    """`spec` with `fields` set past its checks: what a check that missed a case lets through."""
    for name, value in fields.items():
        object.__setattr__(spec, name, value)
    return spec


def seed(data: Path, *specs: TaskSpec, state: State = State.QUEUED) -> list[str]:
    """Writes tasks straight into a stopped node's store, in `state`; returns their ids."""
    store = TaskStore(data / "tasks")
    ids = []
    tasks = []
    now = time.time()
    for spec in specs:
        history = [(State.QUEUED.value, now)]
        if state is not State.QUEUED:
            history.append((state.value, now))
        t = Task(id=uuid.uuid4().hex, seq=store.next_seq(), spec=spec, state=state,
                 history=tuple(history))  # fmt: skip
        ids.append(t.id)
        tasks.append(t)
    store.put_now(*tasks)
    store.close()
    return ids


def small(command: list[str], **fields: Any) -> TaskSpec:
    return TaskSpec(tenant="t", command=tuple(command), cpu_millis=100,
                    memory_bytes=32 << 20, **fields)  # fmt: skip


def failed_or_unreadable(d: Daemon, task_id: str) -> str:
    """A poison task ends failed with the reason it did not start; a record no version's checks
    can read any more is refused when shown (it never starts either)."""
    from agentnode.errors import AgentnodeError

    try:
        task = d.wait(task_id, timeout=30)
    except AgentnodeError as e:
        return f"unreadable: {e}"
    assert task["state"] == "failed", task
    assert task["reason"].startswith("did not start: "), task["reason"]
    assert "\n" not in task["reason"]
    return str(task["reason"])


def test_a_task_whose_start_raises_fails_alone_and_never_wedges_the_loop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = [small(["sh", "-c", f"echo ok{i}"]) for i in range(3)]
    poison = [
        forged(small(["true"]), user="4294967296"),  # OverflowError in the id switch
        forged(small(["true"]), user="1:99999999999999999999"),
        forged(small(["true"]), pids=2**63),  # the kernel refuses it: CgroupError
        forged(small(["true"]), rootfs=str(tmp_path / "gone")),  # no such root
    ]
    mixed = [good[0], *poison[:2], good[1], *poison[2:], good[2]]
    ids = seed(data, *mixed)
    # Its log path taken by a directory: an OSError no check of the spec could catch.
    odd = seed(data, small(["true"]))[0]
    (data / "logs").mkdir(parents=True)
    (data / "logs" / f"{odd}.1.log").mkdir()
    # A poison task that was starting when the last node died: lost, retried, fails again.
    restarted = seed(data, forged(small(["true"], retries=1), user="4294967296"),
                     state=State.STARTING)[0]  # fmt: skip
    with daemon(tmp_path) as d:
        for i, spec in zip(ids, mixed, strict=True):
            if spec in good:
                assert d.wait(i)["state"] == "succeeded"
            else:
                failed_or_unreadable(d, i)
        reason = failed_or_unreadable(d, odd)
        assert "IsADirectoryError" in reason or "Is a directory" in reason, reason
        failed_or_unreadable(d, restarted)
        after = d.submit(["true"])
        assert d.wait(after["id"])["state"] == "succeeded", "the loop still starts tasks"
        assert d.client.call("GET", "/healthz") == {"ok": True, "scheduler": "ok"}
        assert not any("Traceback" in line for line in d.lines), d.lines
    # The poison records are still there after a restart: nothing wedges on them.
    with daemon(tmp_path) as d:
        task = d.submit(["true"])
        assert d.wait(task["id"])["state"] == "succeeded"
        assert d.client.call("GET", "/healthz")["scheduler"] == "ok"
        ps = d.client.call("GET", "/v1/tasks?all=1")
        assert task["id"] in {t["id"] for t in ps}
