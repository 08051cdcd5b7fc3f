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
import shutil
from pathlib import Path

from agentnode.tasks.manager import TaskManager
from agentnode.tasks.model import Task

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
        #: Tasks removed since the node started (metrics).
        self.removed = 0
        # One sweep at a time: `agentnode gc` during a background sweep waits for it, then runs.
        self._lock = asyncio.Lock()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self._every_interval())

    async def run_now(self) -> int:
        """Sweeps now; returns how many tasks were removed."""
        async with self._lock:
            n = await self.manager.sweep(
                ended_s=self.ended_s, failed_s=self.failed_s, remove_files=self._remove_files
            )
        self.removed += n
        if n:
            log.info("retention removed %d ended tasks", n)
        return n

    async def close(self) -> None:
        """Stops the background sweep (a sweep under way stops between two batches)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.run_now()
            except Exception as e:  # the next interval tries again; the node runs on
                log.error("retention sweep failed: %s", e)

    def _remove_files(self, tasks: list[Task]) -> None:
        """Each task's workspace and logs (every attempt's, rotated ones too)."""
        for t in tasks:
            workspace = self.workspaces / t.id
            shutil.rmtree(workspace, ignore_errors=True)
            if workspace.exists():
                log.warning("retention cannot remove all of %s", workspace)
            for path in self.logs.glob(f"{t.id}.*"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
