"""What installing an agent runtime into the node's cache shares between runtimes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentnode.errors import TaskError

__all__ = ["STAMP", "recorded", "replace_install", "required", "staging_dir"]

#: The file an install writes last, into its home: what it installed (versions, size).
STAMP = "agentnode-install.json"


def recorded(home: Path, *, complete: bool) -> dict[str, Any] | None:
    """What the install in `home` recorded, with `home` itself; None when it has no stamp or
    is not `complete` (the runtime's own check of its files)."""
    try:
        stamp: dict[str, Any] = json.loads((home / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return {**stamp, "home": str(home)} if complete else None


def required(
    cache: Path, name: str, title: str, status: Callable[[Path], dict[str, Any] | None]
) -> Path:
    """CACHE/NAME when runtime `title` is installed there (`status`); else `TaskError` saying
    how to install it."""
    if status(cache) is None:
        raise TaskError(
            f"{title} is not installed in {cache / name} (run: sudo agentnode agents install {name})"
        )
    return cache / name


def staging_dir(cache: Path, name: str) -> Path:
    """Where this process builds a new install of `name` (`CACHE/.NAME-PID`, made empty),
    after removing those that installs killed before they finished left behind (their
    process is gone)."""
    for old in cache.glob(f".{name}-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    staging = cache / f".{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def replace_install(staging: Path, home: Path) -> None:
    """Puts the complete install `staging` at `home`, then removes the one it replaces: a task
    starting meanwhile sees the old install or the new one, never half of one."""
    old = home.with_name(f".{home.name}-old-{os.getpid()}")
    if home.exists():
        home.rename(old)
    staging.rename(home)
    shutil.rmtree(old, ignore_errors=True)
