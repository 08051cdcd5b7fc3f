"""The SDK agents use inside a task: memory over the node's HTTP API, and working memory."""

from agentnode.sdk.memory import Memory
from agentnode.sdk.working import WorkingMemory

__all__ = ["Memory", "WorkingMemory"]
