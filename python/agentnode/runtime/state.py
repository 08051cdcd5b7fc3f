"""What the runtime checkpoints: the model API it speaks, the conversation in that API's
format (every tool result recorded in it), how many model answers it holds, and when the first
attempt started."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from agentnode.errors import TaskError
from agentnode.runtime.formats import Call, Format

__all__ = ["State"]

#: Bumped when the checkpoint's shape changes (an older one is refused, not misread).
_VERSION = 2


@dataclass(kw_only=True)
class State:
    """One run's progress; `steps` counts the model answers in `messages`, `inbox` the bytes
    of the task's inbox already added to them (`runtime.inbox`)."""

    api: str
    messages: list[dict[str, Any]]
    steps: int = 0
    started: float = field(default_factory=time.time)
    inbox: int = 0

    def pending(self, fmt: Format) -> list[Call]:
        """The last answer's tool calls that have no recorded result yet."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "assistant":
                done = fmt.results(self.messages[i + 1 :])
                return [c for c in fmt.calls(self.messages[i]) if c.id not in done]
        return []

    def answer(self, fmt: Format) -> str | None:
        """The final answer: the last message, when it is the model's and calls no tool."""
        last = self.messages[-1]
        if last["role"] == "assistant" and not fmt.calls(last):
            return fmt.text(last)
        return None

    def dump(self) -> bytes:
        """The checkpoint blob."""
        return json.dumps(
            {"v": _VERSION, "api": self.api, "messages": self.messages, "steps": self.steps,
             "started": self.started, "inbox": self.inbox},
            separators=(",", ":"),
        ).encode()  # fmt: skip

    @classmethod
    def load(cls, blob: bytes) -> State:
        """A state from `dump`'s blob; `TaskError` when it is not one."""
        try:
            obj = json.loads(blob)
            if obj["v"] != _VERSION:
                raise ValueError(f"version {obj['v']!r}, this runtime reads {_VERSION}")
            # "inbox" is newer than version 2's first checkpoints: none read one.
            return cls(api=str(obj["api"]), messages=list(obj["messages"]),
                       steps=int(obj["steps"]), started=float(obj["started"]),
                       inbox=int(obj.get("inbox", 0)))  # fmt: skip
        except (ValueError, KeyError, TypeError) as e:
            raise TaskError(f"the task's checkpoint is not a runtime checkpoint ({e})") from None
