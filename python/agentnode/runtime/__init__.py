"""The reference runtime: a think/act loop for custom agents run as node tasks.

It calls a model through the node's proxy (OpenAI chat completions), the node's tools through
the API, and checkpoints after every model answer and tool result, so a retried task continues
where the killed one stopped without asking the model again or re-running a recorded tool call.
`python -m agentnode.runtime "TASK" --model M` inside a task; `agentnode agent "TASK"` on a host.
"""

from typing import TYPE_CHECKING

from agentnode import _lazy

if TYPE_CHECKING:
    from agentnode.runtime.loop import Agent, Limits, Stopped
    from agentnode.runtime.state import State

__all__ = ["Agent", "Limits", "State", "Stopped"]

__getattr__ = _lazy.exports(
    __name__, {"Agent": "loop", "Limits": "loop", "Stopped": "loop", "State": "state"}
)
