"""A real `agentnode run` in a subprocess, on a private data dir and socket, for tests and benches."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentnode import _native
from agentnode.node.client import NodeClient
from agentnode.node.restore import node_id, release_pins

FINAL = ("succeeded", "failed", "timed_out", "cancelled", "lost")

#: Every daemon made in this process, in order: what a test made is discarded when it ends
#: (conftest's `discard_daemons`).
made: list[Daemon] = []


class Daemon:
    """`agentnode run --data-dir ROOT/data --socket ROOT/api.sock --config ROOT/agentnode.toml`."""

    def __init__(self, root: Path, config: str = "", prefix: tuple[str, ...] = ()) -> None:
        self.root = root
        #: Put before the daemon's argv (e.g. nsenter into a test's netns).
        self.prefix = prefix
        self.data = root / "data"
        self.socket = root / "api.sock"
        self.config = root / "agentnode.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(config)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.client = NodeClient(self.socket)
        made.append(self)

    def start(self, *, timeout: float = 30.0) -> None:
        argv = [*self.prefix, sys.executable, "-m", "agentnode", "run", "--config", str(self.config),
                "--data-dir", str(self.data), "--socket", str(self.socket)]  # fmt: skip
        self.lines = []
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.wait_for_line("agentnode: doctor:", timeout=timeout)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, *, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.1)  # let the reader drain the last lines
                if any(line.startswith(prefix) for line in self.lines):
                    continue
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.lines}")
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} line within {timeout} s: {self.lines}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 60.0) -> int:
        """Sends `sig` and returns the daemon's exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def pins_left(self) -> bool:
        """Whether the node's exit recorder is pinned (under the host's bpffs, or the node's
        own at DATA_DIR/bpf), found without mounting a bpffs to look."""
        return (self.data / "bpf" / "node").exists() or (
            Path("/sys/fs/bpf/agentnode") / node_id(self.data)
        ).exists()

    def discard(self) -> None:
        """Ends the node for good, as its test's data dir goes: stops the daemon if it runs,
        then kills what its tasks left running (tasks outlive a `kill -9` or a stop with
        keep_tasks, for a next start that will not come), removes its cgroup subtree
        (`k<node>`, in every hierarchy) and unpins its exit recorder."""
        with contextlib.suppress(ValueError):
            made.remove(self)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if not self.data.exists():
            return  # never started
        # The node's own next start would sweep the subtree; its close removes it.
        _native.Launcher(node=node_id(self.data)).close()
        if self.pins_left() or os.path.ismount(self.data / "bpf"):
            release_pins(self.data)  # and the node's own bpffs, if it mounted one

    def submit(self, command: list[str], **fields: Any) -> dict[str, Any]:
        """POST /v1/tasks with small default requests (so capacity never limits a test)."""
        body = {"command": command, "cpus": 0.1, "memory": "32M", **fields}
        task: dict[str, Any] = self.client.call("POST", "/v1/tasks", body)
        return task

    def task(self, task_id: str) -> dict[str, Any]:
        task: dict[str, Any] = self.client.call("GET", f"/v1/tasks/{task_id}")
        return task

    def wait(
        self,
        task_id: str,
        *,
        states: tuple[str, ...] = FINAL,
        timeout: float = 30.0,
        poll: float = 0.02,
    ) -> dict[str, Any]:
        """The task once in one of `states`, asked for every `poll` seconds (a benchmark that
        times the task from inside polls seldom: each poll is work for the node)."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task["state"] in states:
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still {task['state']} after {timeout} s")
            time.sleep(poll)

    def log(self, task_id: str, attempt: int = 1) -> str:
        return (self.data / "logs" / f"{task_id}.{attempt}.log").read_text()


@contextlib.contextmanager
def daemon(root: Path, config: str = "", prefix: tuple[str, ...] = ()) -> Iterator[Daemon]:
    """A started daemon, stopped (SIGTERM, then SIGKILL) and discarded when the block ends."""
    d = Daemon(root, config, prefix)
    d.start()
    try:
        yield d
    finally:
        d.discard()
