"""Heartbeat times that outlive the daemon, for re-adopted tasks' heartbeat deadlines.

A task's last heartbeat is the modification time of a file of its own, and the daemon's last
check of heartbeats that of one more file: one `utime` per heartbeat and per check pass, no
store write. A later daemon that re-adopts a task gives it what was left of its heartbeat
period when the earlier daemon last checked: the time no daemon ran does not count against it
(it could not reach a task socket then), as with a daemon that was stopped (SIGSTOP)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["BeatLog"]

# The daemon's own file: task ids never start with a dot.
_CHECKED = ".checked"


class BeatLog:
    """The heartbeat times of running tasks with a heartbeat deadline, in `directory`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory

    def beat(self, task_id: str) -> None:
        """Records a heartbeat (or a start, which counts as one) of `task_id` now."""
        path = self.directory / task_id
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch(mode=0o600)

    def checked(self) -> None:
        """Records that the daemon judged heartbeats now."""
        path = self.directory / _CHECKED
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch(mode=0o600)

    def ended(self, task_id: str) -> None:
        """Forgets `task_id` (it no longer runs here)."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / task_id).unlink()

    def missed_s(self, task_id: str) -> float:
        """How long `task_id` had gone without a heartbeat when heartbeats were last checked
        (0 when either time is unknown: a task started by a daemon that kept none)."""
        try:
            beat = (self.directory / task_id).stat().st_mtime
            checked = (self.directory / _CHECKED).stat().st_mtime
        except FileNotFoundError:
            return 0.0
        return max(0.0, checked - beat)

    def sweep(self, *, keep: set[str]) -> None:
        """Removes the times of every task but `keep` (those an earlier daemon left)."""
        for path in self.directory.iterdir():
            if path.name != _CHECKED and path.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
