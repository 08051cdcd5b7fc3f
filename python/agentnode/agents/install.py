"""What installing an agent runtime into the node's cache shares between runtimes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["replace_install", "staging_dir"]


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
