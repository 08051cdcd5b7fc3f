"""The SDK agents use inside a task: memory over the node's HTTP API, working memory, and the
task's own heartbeat and checkpoints."""

from typing import TYPE_CHECKING

from agentnode import _lazy

if TYPE_CHECKING:
    from agentnode.sdk.memory import Memory
    from agentnode.sdk.task import ThisTask
    from agentnode.sdk.working import WorkingMemory

__all__ = ["Memory", "ThisTask", "WorkingMemory"]

__getattr__ = _lazy.exports(
    __name__, {"Memory": "memory", "ThisTask": "task", "WorkingMemory": "working"}
)
