"""The mock upstream's scripted turns, read back by the official SDKs: OpenAI `tool_calls` and
Anthropic `tool_use`, streamed and not, then its default answers once the script is used up."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import ContentBlock, TextBlock, ToolUseBlock

from agentnode.inference.mock import MockUpstream, ToolCall, Turn

SCRIPT = [
    Turn(tool_calls=(ToolCall("add", {"a": 2, "b": 3}), ToolCall("now"))),
    Turn(text="thinking", tool_calls=(ToolCall("write", {"path": "x"}, id="call_fixed"),)),
    Turn(text="done: 5"),
]


@pytest.fixture
def mocks() -> Iterator[dict[str, MockUpstream]]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    found: dict[str, MockUpstream] = {}

    async def start() -> None:
        for kind in ("openai", "anthropic"):
            found[kind] = await MockUpstream(kind).start()
        ready.set()

    thread = threading.Thread(target=lambda: loop.run_until_complete(start()) or loop.run_forever())
    thread.start()
    ready.wait(10)
    yield found
    for m in found.values():
        asyncio.run_coroutine_threadsafe(m.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _openai_calls(client: openai.OpenAI, *, stream: bool) -> list[tuple[str, list[Any]]]:
    out = []
    for _ in range(4):
        kw: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "go"}]}
        if not stream:
            msg = client.chat.completions.create(**kw).choices[0].message
            calls = [(c.id, c.function.name, json.loads(c.function.arguments))
                     for c in msg.tool_calls or []]  # fmt: skip
            out.append((msg.content or "", calls))
            continue
        text, parts = "", dict[int, list[str]]()
        for chunk in client.chat.completions.create(**kw, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            text += delta.content or ""
            for tc in delta.tool_calls or []:
                part = parts.setdefault(tc.index, ["", "", ""])
                part[0] += tc.id or ""
                part[1] += (tc.function and tc.function.name) or ""
                part[2] += (tc.function and tc.function.arguments) or ""
        out.append((text, [(i, n, json.loads(a)) for i, n, a in parts.values()]))
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_calls(mocks: dict[str, MockUpstream], stream: bool) -> None:
    mock = mocks["openai"]
    mock.script = deque(SCRIPT)
    client = openai.OpenAI(base_url=mock.base_url, api_key="k", max_retries=0)
    turns = _openai_calls(client, stream=stream)
    (t1, c1), (t2, c2), (t3, c3), (t4, c4) = turns
    assert t1 == "" and [(n, a) for _, n, a in c1] == [("add", {"a": 2, "b": 3}), ("now", {})]
    assert all(i.startswith("call_") for i, _, _ in c1) and c1[0][0] != c1[1][0]
    assert t2 == "thinking" and c2 == [("call_fixed", "write", {"path": "x"})]
    assert (t3, c3) == ("done: 5", [])
    assert c4 == [] and t4, "past the script: the default answer"
    assert [r.get("turn") for r in mock.requests] == [*SCRIPT, None]


def _block(b: ContentBlock) -> tuple[str, object]:
    """A reply's content block as (type, text) or (type, (tool name, tool input))."""
    if isinstance(b, TextBlock):
        return b.type, b.text
    assert isinstance(b, ToolUseBlock), b
    return b.type, (b.name, b.input)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use(mocks: dict[str, MockUpstream], stream: bool) -> None:
    mock = mocks["anthropic"]
    mock.script = deque(SCRIPT)
    client = anthropic.Anthropic(base_url=mock.base_url, api_key="k", max_retries=0)
    got = []
    for _ in range(3):
        kw: dict[str, Any] = {"model": "m", "max_tokens": 10,
                              "messages": [{"role": "user", "content": "go"}]}  # fmt: skip
        if stream:
            with client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        else:
            msg = client.messages.create(**kw)
        blocks = [_block(b) for b in msg.content]
        got.append((msg.stop_reason, blocks))
    assert got == [
        ("tool_use", [("tool_use", ("add", {"a": 2, "b": 3})), ("tool_use", ("now", {}))]),
        ("tool_use", [("text", "thinking"), ("tool_use", ("write", {"path": "x"}))]),
        ("end_turn", [("text", "done: 5")]),
    ]


def test_turn_parse() -> None:
    assert Turn.parse("hi") == Turn(text="hi")
    assert Turn.parse({"tool_calls": [{"name": "f", "arguments": {"x": 1}}]}) == Turn(
        tool_calls=(ToolCall("f", {"x": 1}),)
    )
    with pytest.raises(ValueError, match="scripted turn"):
        Turn.parse({"txt": "typo"})
