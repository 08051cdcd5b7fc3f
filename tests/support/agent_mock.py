"""A scripted mock upstream for agent tests, run as a process (e.g. inside a test's netns):
`python agent_mock.py KIND 'SCRIPT_JSON' [EMBEDDING_SIZE]` prints its base URL, then one JSON line per request
as it starts to answer it: the path, how many messages it carried, the last one's role, the tool results it
was sent (OpenAI's or Anthropic's), the user's texts, the turn given, and whether it asked for a stream."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import deque
from typing import Any

from agentnode.inference.mock import MockUpstream, Turn


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The tool results a conversation carries: OpenAI's `tool` messages, Anthropic's
    `tool_result` blocks."""
    results = []
    for m in messages:
        if m.get("role") == "tool":
            results.append(str(m.get("content")))
        elif m.get("role") == "user" and isinstance(m.get("content"), list):
            results += [
                str(b.get("content")) for b in m["content"] if b.get("type") == "tool_result"
            ]
    return results


def _user_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The texts of the user's messages (a string, or Anthropic's text blocks)."""
    texts = []
    for m in messages:
        if m.get("role") != "user":
            continue
        if isinstance(m.get("content"), str):
            texts.append(m["content"])
        elif isinstance(m.get("content"), list):
            texts += [str(b.get("text")) for b in m["content"] if b.get("type") == "text"]
    return texts


def _line(r: dict[str, Any]) -> str:
    messages = (r["json"] or {}).get("messages") or []
    turn = r.get("turn")
    return json.dumps(
        {
            "path": r["path"],
            "model": (r["json"] or {}).get("model"),
            "messages": len(messages),
            "last_role": messages[-1].get("role") if messages else None,
            "tool_results": _tool_results(messages),
            "user_texts": _user_texts(messages),
            "turn": None if turn is None else turn.text or turn.tool_calls[0].name,
            "tools": len((r["json"] or {}).get("tools") or []),
            "stream": bool((r["json"] or {}).get("stream")),
        }
    )


async def main(kind: str, script: str, embedding_size: int) -> None:
    mock = MockUpstream(
        kind,
        script=deque(Turn.parse(t) for t in json.loads(script)),
        embedding_size=embedding_size,
        # Written before the answer's status line: a client never knows more than the test.
        on_answer=lambda r: print(_line(r), flush=True),
    )
    await mock.start()
    print(mock.base_url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3))
