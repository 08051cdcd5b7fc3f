"""`ThisTask`: what code running as a node task says to the node about itself.

Heartbeats (when the task was submitted with a heartbeat timeout), checkpoints (saved through
the API; a retried attempt finds its last one at $AGENTNODE_CHECKPOINT) and its own record. The
endpoint and credential come from the environment the node gives every task. Checkpoints go over
the node's memory socket when it is announced ($AGENTNODE_MEMORY_SOCKET; `sdk.memsocket`), which
costs a step a fraction of an HTTP request; a checkpoint larger than its frames goes over HTTP.
"""

from __future__ import annotations

import json
import os
from typing import Any

from agentnode.errors import AgentnodeError, ConfigError, TaskError
from agentnode.sdk.memsocket import ENV, MAX_FRAME, SocketClient
from agentnode.sdk.transport import connect, request

__all__ = ["ThisTask"]

#: What a checkpoint's request adds to its blob on the memory socket (with room to spare).
_FRAMING = 256


class ThisTask:
    """The running task's own API; synchronous, one per thread."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        env = os.environ
        url, token, self.id = (
            env.get("AGENTNODE_URL"),
            env.get("AGENTNODE_TOKEN"),
            env.get("AGENTNODE_TASK_ID", ""),
        )
        if not url or not token or not self.id:
            raise ConfigError(
                "not running as an agentnode task (AGENTNODE_URL, AGENTNODE_TOKEN and "
                "AGENTNODE_TASK_ID are unset)"
            )
        self._url = url
        self._conn, self._base = connect(url, timeout=timeout)
        self._auth = {"Authorization": f"Bearer {token}"}
        sock = env.get(ENV)
        self._socket = SocketClient(sock, token, timeout=timeout) if sock else None

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        target = f"{self._base}/v1/tasks/{self.id}{path}"
        return request(self._conn, method, target, body, self._auth,
                       where=f"node task API at {self._url}", what=f"{method} {path or 'task'}")  # fmt: skip

    def heartbeat(self) -> None:
        """Tells the node this task is alive (resets its heartbeat timeout)."""
        self._call("POST", "/heartbeat")

    def _over_socket(self, op: str, args: dict[str, Any]) -> Any:
        assert self._socket is not None
        try:
            # Both replace or read what they name: safe to send again on a new connection.
            return self._socket.call(op, args, retry=True)
        except AgentnodeError as e:
            raise TaskError(f"{op}: {e}") from None

    def save_checkpoint(self, blob: bytes) -> None:
        """Stores `blob` durably as this task's checkpoint (replacing the previous one)."""
        if self._socket is not None and len(blob) < MAX_FRAME - _FRAMING:
            self._over_socket("task.checkpoint.put", {"blob": blob})
        else:
            self._call("PUT", "/checkpoint", blob)

    def checkpoint(self) -> bytes | None:
        """The last checkpoint saved by this or an earlier attempt, or None."""
        path = os.environ.get("AGENTNODE_CHECKPOINT")
        if path:
            with open(path, "rb") as f:
                return f.read()
        if self._socket is not None:
            found: bytes | None = self._over_socket("task.checkpoint.get", {})["blob"]
            return found
        try:
            return self._call("GET", "/checkpoint")
        except TaskError as e:
            if "has no checkpoint" in str(e):
                return None
            raise

    def close(self) -> None:
        """Closes the connections."""
        self._conn.close()
        if self._socket is not None:
            self._socket.close()

    def info(self) -> dict[str, Any]:
        """This task's record: state, attempt, limits, live accounting."""
        result: dict[str, Any] = json.loads(self._call("GET", ""))
        return result
