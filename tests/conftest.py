"""Shared fixtures. Tests run as root on a real kernel: they create real kernel objects."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import pytest

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def run_cli(
    args: Sequence[str], *, user: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m agentnode ARGS` (as another uid when `user` is given)."""
    argv = [sys.executable, "-m", "agentnode", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
