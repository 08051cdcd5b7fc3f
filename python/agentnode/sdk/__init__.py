"""The SDK agents use inside a task: memory over the node's HTTP API, working memory, the
task's own heartbeat and checkpoints, and the node's tools."""

from typing import TYPE_CHECKING

from agentnode import _lazy

if TYPE_CHECKING:
    from agentnode.sdk.memory import Memory
    from agentnode.sdk.task import ThisTask
    from agentnode.sdk.tools import Tools
    from agentnode.sdk.working import WorkingMemory

__all__ = ["Memory", "ThisTask", "Tools", "WorkingMemory"]

__getattr__ = _lazy.exports(
    __name__,
    {"Memory": "memory", "ThisTask": "task", "Tools": "tools", "WorkingMemory": "working"},
)
