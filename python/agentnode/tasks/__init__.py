"""Durable task lifecycle: model and state machine, RocksDB store, retries, tokens, scheduling."""

from agentnode.tasks.manager import Limits, TaskManager
from agentnode.tasks.model import CLASSES, TERMINAL, State, Task, TaskSpec
from agentnode.tasks.retry import RetryPolicy
from agentnode.tasks.store import TaskStore
from agentnode.tasks.tokens import TokenKey

__all__ = [
    "CLASSES",
    "TERMINAL",
    "Limits",
    "RetryPolicy",
    "State",
    "Task",
    "TaskManager",
    "TaskSpec",
    "TaskStore",
    "TokenKey",
]
