"""`ExecTrace`: every exec inside every task of this node instance, as audit records.

The BPF program (`ebpf/exec.bpf.c`) reports each exec under the instance's cgroup2 subtree with
the task cgroup's id; this maps the id to the task once the node knows it (`watch`). A task's
first execs happen before its spawn returns, so events of a cgroup not yet known wait (a bounded
number) and are written when the task is named, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentnode import _native
from agentnode.errors import AuditError

__all__ = ["ExecTrace", "cgroup2_level", "exec_record"]

log = logging.getLogger("agentnode.audit")

#: Events kept for cgroups no task has been named for yet (a zygote's, or a spawn in flight).
_MAX_UNCLAIMED = 4096


def exec_record(
    raw: tuple[int, int, int, int, int, bytes, bytes, bool], *, task: str, tenant: str
) -> dict[str, Any]:
    """The audit record of one raw event from `ExecTracerHandle.events()`."""
    _, time_ns, pid, ppid, uid, filename, argv, truncated = raw
    args = argv.split(b"\0")
    if args and args[-1] == b"":
        args.pop()
    return {
        "kind": "exec",
        "time": time.time() - (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time_ns) / 1e9,
        "task": task,
        "tenant": tenant,
        "pid": pid,
        "ppid": ppid,
        "uid": uid,
        "filename": filename.decode(errors="replace"),
        "argv": [a.decode(errors="replace") for a in args],
        "argv_truncated": truncated,
    }


class ExecTrace:
    """The tracer attached to the node instance's cgroup2 directory `instance`; each named
    task's execs go to `sink`. Use `start()` on the event loop."""

    def __init__(self, instance: Path, *, sink: Callable[[dict[str, Any]], object]) -> None:
        self._handle = _native.ExecTracerHandle(instance, cgroup2_level(instance))
        self._sink = sink
        self._tasks: dict[int, tuple[str, str]] = {}
        self._cgroups: dict[str, int] = {}
        self._unclaimed: dict[int, list[tuple[int, int, int, int, int, bytes, bytes, bool]]] = {}
        self._unclaimed_count = 0
        self._lost = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_instance(cls, *, sink: Callable[[dict[str, Any]], object]) -> ExecTrace:
        """The tracer for this process's node instance (`agentnode.isolation`'s cgroups)."""
        from agentnode.isolation.task import _instance

        return cls(_instance().dirs()[0], sink=sink)

    def start(self) -> None:
        """Reads events as they come, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._handle.events_fd(), self.poll)

    def watch(self, cgroup_dir: Path, *, task: str, tenant: str) -> None:
        """Attributes the execs in `cgroup_dir` to `task` (those already seen, then the rest)."""
        cgroup = _native.cgroup_id(cgroup_dir)
        # Those read already come first: everything still in the ring buffer is newer.
        for raw in self._unclaimed.pop(cgroup, []):
            self._unclaimed_count -= 1
            self._sink(exec_record(raw, task=task, tenant=tenant))
        self._tasks[cgroup] = (task, tenant)
        self._cgroups[task] = cgroup
        self.poll()

    def forget(self, task: str) -> None:
        """Stops attributing `task`'s cgroup (the task ended; its id may be reused)."""
        self.poll()
        cgroup = self._cgroups.pop(task, None)
        if cgroup is not None:
            self._tasks.pop(cgroup, None)

    def poll(self) -> None:
        """Writes every queued event of a named task; keeps the others for `watch`."""
        for raw in self._handle.events():
            owner = self._tasks.get(raw[0])
            if owner is not None:
                self._sink(exec_record(raw, task=owner[0], tenant=owner[1]))
            else:
                if self._unclaimed_count >= _MAX_UNCLAIMED:
                    # The oldest cgroup's: a task spawned by code that never named it, or
                    # a spare's; a task being started now is the newest.
                    _, dropped = next(iter(self._unclaimed.items()))
                    del self._unclaimed[dropped[0][0]]
                    self._unclaimed_count -= len(dropped)
                    log.debug("dropping %d execs of unnamed cgroup %d", len(dropped), dropped[0][0])
                self._unclaimed.setdefault(raw[0], []).append(raw)
                self._unclaimed_count += 1
        lost = self._handle.lost()
        if lost > self._lost:
            log.warning("exec tracing lost %d events to a full ring buffer", lost - self._lost)
            self._sink({"kind": "exec_lost", "count": lost - self._lost})
            self._lost = lost

    def close(self) -> None:
        """Reads what is left and detaches the program."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._handle.events_fd())
        self.poll()
        self._handle.close()


def cgroup2_level(path: Path) -> int:
    """How many levels below the cgroup2 hierarchy's root `path` is (the root is 0), counted
    from the real root: in a cgroup namespace the mount shows a subtree, named in mountinfo."""
    best: tuple[Path, Path] | None = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ", 1)[0] != "cgroup2":
                continue
            fields = pre.split(" ")
            root, point = Path(fields[3]), Path(fields[4])
            if path.is_relative_to(point) and (
                best is None or len(point.parts) > len(best[1].parts)
            ):
                best = (root, point)
    if best is None:
        raise AuditError(f"{path} is not on a cgroup2 mount (exec tracing needs cgroup2)")
    root, point = best
    return len(root.parts) - 1 + len(path.relative_to(point).parts)
