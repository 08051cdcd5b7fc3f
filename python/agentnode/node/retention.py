"""Retention: ended tasks' workspaces, logs and records are removed once they are old enough.

A background sweep runs every `interval` (and on `agentnode gc`); it walks the task store in
small batches on a thread (`TaskManager.sweep`), so a node with a long history never stalls
starts or API calls to clean it. Failed tasks may be kept longer than the rest
(`[retention] failed`), as they are the ones someone comes back to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from agentnode.tasks.manager import TaskManager
from agentnode.trees import remove_tree

__all__ = ["Retention"]

log = logging.getLogger("agentnode.retention")


class Retention:
    """Sweeps `manager`'s ended tasks and their files under `data_dir`."""

    def __init__(
        self,
        manager: TaskManager,
        *,
        data_dir: Path,
        ended_s: float,
        failed_s: float,
        interval_s: float,
    ) -> None:
        self.manager = manager
        self.workspaces = data_dir / "workspaces"
        self.logs = data_dir / "logs"
        self.ended_s = ended_s
        self.failed_s = failed_s
        self.interval_s = interval_s
        #: Tasks removed since the node started.
        self.removed = 0
        # One sweep at a time: `agentnode gc` during a background sweep waits for it, then runs.
        self._lock = asyncio.Lock()
        self._loop: asyncio.Task[None] | None = None
        # A flag, not Task.cancel(): a sweep's batch runs on a thread that a cancel would not
        # stop, and the store must not close under it.
        self._closing = False
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self._every_interval())

    async def run_now(self) -> int:
        """Sweeps now; returns how many tasks were removed."""
        async with self._lock:
            n = await self.manager.sweep(
                ended_s=self.ended_s,
                failed_s=self.failed_s,
                remove_files=self._remove_files,
                stop=lambda: self._closing,
            )
        self.removed += n
        if n:
            log.info("retention removed %d ended tasks", n)
        return n

    async def close(self) -> None:
        """Stops sweeping: a sweep under way ends after its current batch, before this returns."""
        self._closing = True
        self._wake.set()
        if self._loop is not None:
            await self._loop
        async with self._lock:  # an `agentnode gc` under way
            pass

    async def _every_interval(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            if self._closing:
                return
            try:
                await self.run_now()
            except Exception as e:  # the next interval tries again; the node runs on
                log.error("retention sweep failed: %s", e)

    def _remove_files(self, task_ids: list[str]) -> None:
        """Each task's workspace and logs (every attempt's, rotated ones too)."""
        for task_id in task_ids:
            workspace = self.workspaces / task_id
            remove_tree(workspace)
            if workspace.exists():
                log.warning("retention cannot remove all of %s", workspace)
            for path in self.logs.glob(f"{task_id}.*"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
