"""Log files and workspace directories made ahead of task starts.

Every start makes two new inodes on the data dir's file system: the attempt's log file and, on a
first attempt, the task's workspace. On a busy ext4 (its allocator steps over recently freed
inodes one at a time) each cost 0.15-0.5 ms here, on the path from submit to running. A
background thread keeps a few of each, made under hidden names in the directories they belong
in, and a start renames one into place: a rename allocates nothing. Spares a killed node left
behind are hidden names that the next start removes.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path

from agentnode.trees import remove_tree

__all__ = ["SPARE_PREFIX", "Spares"]

log = logging.getLogger(__name__)

#: Names of spares start with this; nothing else in logs/ or workspaces/ does.
SPARE_PREFIX = ".spare-"


class Spares:
    """Keeps `keep` spare log files in `logs` and spare directories in `workspaces`."""

    def __init__(self, logs: Path, workspaces: Path, *, keep: int = 4) -> None:
        self._dirs = {"log": logs, "workspace": workspaces}
        self._ready: dict[str, list[Path]] = {"log": [], "workspace": []}
        self._keep = keep
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        for d in self._dirs.values():
            d.mkdir(parents=True, exist_ok=True)
            for left in d.glob(SPARE_PREFIX + "*"):
                remove_tree(left)
        self._thread = threading.Thread(target=self._fill, name="agentnode-spares", daemon=True)
        self._thread.start()

    def open_log(self, path: Path) -> int:
        """Opens `path` for appending (close-on-exec), from a spare file when one is ready."""
        self._place("log", path)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def make_workspace(self, path: Path) -> Path:
        """Makes the directory `path` from a spare when one is ready (a retry finds its own)."""
        self._place("workspace", path)
        return path

    def refill(self) -> None:
        """Makes up for the spares taken. Call it once a start is done: the thread that makes
        them runs Python, and woken mid-start it would take turns with the start for the GIL
        at every system call (measured: 0.2-0.3 ms more from starting to running)."""
        self._wake.set()

    def _place(self, kind: str, path: Path) -> None:
        if path.exists() or path.parent != self._dirs[kind]:
            return
        with self._lock:
            spare = self._ready[kind].pop() if self._ready[kind] else None
        if spare is None:
            return
        try:
            os.rename(spare, path)
        except OSError as e:  # the caller creates it the usual way
            log.warning("cannot use spare %s for %s: %s", spare, path, e)
            remove_tree(spare)

    def _fill(self) -> None:
        while not self._closed:
            self._wake.clear()
            for kind, d in self._dirs.items():
                while not self._closed and len(self._ready[kind]) < self._keep:
                    spare = d / f"{SPARE_PREFIX}{uuid.uuid4().hex}"
                    try:
                        if kind == "log":
                            os.close(os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                        else:
                            spare.mkdir()
                    except OSError as e:  # a full disk, say: starts create their own
                        log.warning("cannot make a spare in %s: %s", d, e)
                        break
                    with self._lock:
                        self._ready[kind].append(spare)
            self._wake.wait()

    def close(self) -> None:
        """Stops the thread and removes the spares not used."""
        self._closed = True
        self._wake.set()
        self._thread.join()
        with self._lock:
            for spares in self._ready.values():
                for spare in spares:
                    remove_tree(spare)
                spares.clear()
