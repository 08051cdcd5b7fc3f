"""Durable task lifecycle: model and state machine, RocksDB store, retries, tokens, scheduling."""

from agentnode import _lazy

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
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

__getattr__ = _lazy.exports(
    __name__,
    {
        "Limits": "manager",
        "TaskManager": "manager",
        "CLASSES": "model",
        "TERMINAL": "model",
        "State": "model",
        "Task": "model",
        "TaskSpec": "model",
        "RetryPolicy": "retry",
        "TaskStore": "store",
        "TokenKey": "tokens",
    },
)
