"""What installing an agent runtime into the node's cache shares between runtimes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["replace_install"]


def replace_install(staging: Path, home: Path) -> None:
    """Puts the complete install `staging` at `home`, then removes the one it replaces: a task
    starting meanwhile sees the old install or the new one, never half of one."""
    old = home.with_name(f".{home.name}-old-{os.getpid()}")
    if home.exists():
        home.rename(old)
    staging.rename(home)
    shutil.rmtree(old, ignore_errors=True)
