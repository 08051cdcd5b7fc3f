"""The SDK agents use inside a task: memory over the node's HTTP API, working memory, and the
task's own heartbeat and checkpoints, and the node's tools."""

from agentnode.sdk.memory import Memory
from agentnode.sdk.task import ThisTask
from agentnode.sdk.tools import Tools
from agentnode.sdk.working import WorkingMemory

__all__ = ["Memory", "ThisTask", "Tools", "WorkingMemory"]
