"""What is sent to the running agent while it runs (an Agent Protocol step's `input`): the
task's inbox, a file at $AGENTNODE_INBOX (read-only inside the task) to which the node appends
one JSON object a line, `{"input": TEXT, "additional_input": OBJECT|null}`.

The runtime reads what is new before each model call and adds each input to the conversation
as a user message; its checkpoint keeps how far it has read, so a retried attempt neither loses
an input nor adds one twice. Any agent can do the same: read the file from the offset it last
stopped at, whole lines only (the node may be writing the last one)."""

from __future__ import annotations

import json
import os

from agentnode.errors import TaskError

__all__ = ["INBOX_ENV", "Inbox", "open_inbox"]

#: The variable naming the inbox file (set only for tasks that have one).
INBOX_ENV = "AGENTNODE_INBOX"


class Inbox:
    """The inbox file at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self, offset: int) -> tuple[list[str], int]:
        """The inputs after byte `offset` (whole lines only) and the offset after them."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        texts = []
        for line in data[:end].splitlines():
            try:
                text = json.loads(line)["input"]
            except (ValueError, KeyError, TypeError):
                raise TaskError(
                    f"the inbox at {self.path} holds a line that is not an input object "
                    f"({line[:80]!r})"
                ) from None
            if isinstance(text, str) and text:
                texts.append(text)
        return texts, offset + end


def open_inbox() -> Inbox | None:
    """This task's inbox, or None when it has none."""
    path = os.environ.get(INBOX_ENV)
    return Inbox(path) if path else None
