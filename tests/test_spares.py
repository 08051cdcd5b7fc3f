"""Spare log files and workspaces: used by starts, replaced, swept after a crash, removed at close."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agentnode.node.spares import SPARE_PREFIX, Spares


def spares_in(d: Path) -> list[Path]:
    return sorted(d.glob(SPARE_PREFIX + "*"))


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def ready(s: Spares) -> bool:
    """Whether the thread has handed over both kinds in full: a spare on disk it has not
    listed yet would let a take find one fewer, and the thread make one more."""
    return all(len(r) == 2 for r in s._ready.values())


def test_starts_take_spares_that_the_thread_replaces_when_told(tmp_path: Path) -> None:
    logs, ws = tmp_path / "logs", tmp_path / "workspaces"
    s = Spares(logs, ws, keep=2)
    try:
        wait_for(lambda: ready(s))
        assert len(spares_in(logs)) == len(spares_in(ws)) == 2
        before = {p.stat().st_ino for p in spares_in(logs)}
        fd = s.open_log(logs / "t1.1.log")
        os.write(fd, b"hello\n")
        os.close(fd)
        assert (logs / "t1.1.log").stat().st_ino in before  # a spare, renamed into place
        assert (logs / "t1.1.log").read_bytes() == b"hello\n"
        assert s.make_workspace(ws / "t1").is_dir()
        time.sleep(0.1)
        assert len(spares_in(logs)) == len(spares_in(ws)) == 1  # not replaced mid-start...
        s.refill()
        wait_for(lambda: ready(s))  # ...but after
        assert len(spares_in(logs)) == len(spares_in(ws)) == 2
        # An existing file or directory is never replaced: a retry keeps its workspace.
        (ws / "t1" / "keep").write_text("x")
        s.make_workspace(ws / "t1")
        assert (ws / "t1" / "keep").read_text() == "x"
        fd = s.open_log(logs / "t1.1.log")
        os.close(fd)
        assert (logs / "t1.1.log").read_bytes() == b"hello\n"
    finally:
        s.close()
    assert spares_in(logs) == spares_in(ws) == []


def test_a_killed_nodes_spares_are_removed_at_start(tmp_path: Path) -> None:
    logs, ws = tmp_path / "logs", tmp_path / "workspaces"
    logs.mkdir()
    (ws / f"{SPARE_PREFIX}old").mkdir(parents=True)
    (logs / f"{SPARE_PREFIX}old").write_bytes(b"")
    (logs / "task.1.log").write_bytes(b"kept")
    s = Spares(logs, ws, keep=1)
    try:
        wait_for(lambda: len(spares_in(logs)) == 1 and len(spares_in(ws)) == 1)
        assert (
            not (logs / f"{SPARE_PREFIX}old").exists() and not (ws / f"{SPARE_PREFIX}old").exists()
        )
        assert (logs / "task.1.log").read_bytes() == b"kept"
    finally:
        s.close()
