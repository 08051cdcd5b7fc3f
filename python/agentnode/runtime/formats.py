"""The two wire formats the runtime speaks to a model through the node's proxy: OpenAI chat
completions (`openai`) and Anthropic messages (`anthropic`), each with the provider's official
SDK, streamed or not. The conversation stays in the format's own shape (what the checkpoint
holds), so nothing is translated on its way to the model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from agentnode.errors import TaskError
from agentnode.sdk.transport import tls_verify

if TYPE_CHECKING:
    from agentnode.runtime.spend import SpendTap

__all__ = ["FORMATS", "Call", "Format", "make"]

#: The formats by name, as `--api` takes them.
FORMATS = ("openai", "anthropic")


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call of a model answer; `arguments` is None when they are not a JSON object
    (`error` says why)."""

    id: str
    name: str
    arguments: dict[str, Any] | None
    error: str = ""


class Format(Protocol):
    """What the loop needs of a wire format."""

    name: str

    @property
    def spent(self) -> Decimal | None:
        """This task's spend as the proxy told it with the last answer, that call included;
        None when it did not (`runtime.spend`)."""

    def tool(self, name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        """A node tool as this format offers it to the model."""

    def ask(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        """The model's answer to `messages` as the assistant message to append."""

    def calls(self, message: dict[str, Any]) -> list[Call]:
        """The tool calls of an assistant message."""

    def add_result(
        self, messages: list[dict[str, Any]], call_id: str, content: str, *, error: bool
    ) -> None:
        """Appends a tool's result to the conversation."""

    def add_user(self, messages: list[dict[str, Any]], text: str) -> None:
        """Appends a user's message (sent to the running agent) to the conversation."""

    def results(self, messages: Sequence[dict[str, Any]]) -> set[str]:
        """The ids of the calls whose results `messages` (those after an answer) hold."""

    def text(self, message: dict[str, Any]) -> str:
        """An assistant message's text."""


def make(api: str, *, model: str, system: str | None, stream: bool, max_tokens: int) -> Format:
    """The format named `api`, its SDK client reading the task's environment (the proxy's URL
    and the task's token). The SDK never retries: the proxy retries upstreams itself, and a
    failed call ends the attempt, whose retry resumes from the checkpoint."""
    if api == "openai":
        return _OpenAI(model=model, system=system, stream=stream)
    if api == "anthropic":
        return _Anthropic(model=model, system=system, stream=stream, max_tokens=max_tokens)
    raise TaskError(f"no model API {api!r} (the runtime speaks {', '.join(FORMATS)})")


def _http_client(sdk: Any, base_url_env: str) -> tuple[Any, SpendTap]:
    """The SDK's HTTP client for its base URL, and the transport that reads the spend the
    proxy tells: for plain HTTP (the node's proxy) it loads no CA bundle (`tls_verify`)."""
    from agentnode.runtime.spend import SpendTap  # httpx2: the SDKs' own, imported with them

    tap = SpendTap(verify=tls_verify(os.environ.get(base_url_env, "")))
    return sdk.DefaultHttpxClient(transport=tap), tap


def _as_is(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """An SDK call's `extra_body`, whose fields replace the body's own: the conversation sent as
    it is. As the SDKs' `messages` parameter it would be walked against its typed unions on every
    call (their "transform"): about 0.25 ms of CPU a message, 30 ms a call at 120 messages
    against 2 ms (bench/HISTORY.md), to leave it as it is (no field of a message has an alias)."""
    return {"messages": messages}


def _failed(e: Exception) -> TaskError:
    return TaskError(f"the model call failed: {type(e).__name__}: {' '.join(str(e).split())}")


class _OpenAI:
    name = "openai"

    def __init__(self, *, model: str, system: str | None, stream: bool) -> None:
        import openai

        http, self._tap = _http_client(openai, "OPENAI_BASE_URL")
        self._llm = openai.OpenAI(max_retries=0, http_client=http)
        self._model, self._system, self._stream = model, system, stream

    @property
    def spent(self) -> Decimal | None:
        return self._tap.spent

    def tool(self, name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": name, "description": description, "parameters": schema}}  # fmt: skip

    def ask(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        from openai import OpenAIError

        system = [{"role": "system", "content": self._system}] if self._system else []
        extra: Any = {"tools": tools} if tools else {}
        extra["extra_body"] = _as_is([*system, *messages])
        try:
            if self._stream:
                with self._llm.chat.completions.stream(
                    model=self._model, messages=(), **extra
                ) as events:
                    m = events.get_final_completion().choices[0].message
            else:
                m = (
                    self._llm.chat.completions.create(model=self._model, messages=(), **extra)
                    .choices[0]
                    .message
                )
        except OpenAIError as e:
            raise _failed(e) from e
        message: dict[str, Any] = {"role": "assistant", "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump(include={"id", "type", "function"})
                                     for c in m.tool_calls]  # fmt: skip
        return message

    def calls(self, message: dict[str, Any]) -> list[Call]:
        calls = []
        for c in message.get("tool_calls") or ():
            fn = c["function"]
            try:
                args = json.loads(fn.get("arguments") or "{}")
                error = "" if isinstance(args, dict) else "not an object"
            except ValueError as e:
                args, error = None, str(e)
            calls.append(Call(c["id"], fn["name"], None if error else args, error))
        return calls

    def add_result(
        self, messages: list[dict[str, Any]], call_id: str, content: str, *, error: bool
    ) -> None:
        # OpenAI has no error flag on a tool message: the model reads it in the text.
        text = f"error: {content}" if error else content
        messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def add_user(self, messages: list[dict[str, Any]], text: str) -> None:
        messages.append({"role": "user", "content": text})

    def results(self, messages: Sequence[dict[str, Any]]) -> set[str]:
        return {m["tool_call_id"] for m in messages if m["role"] == "tool"}

    def text(self, message: dict[str, Any]) -> str:
        return str(message.get("content") or "")


class _Anthropic:
    name = "anthropic"

    def __init__(self, *, model: str, system: str | None, stream: bool, max_tokens: int) -> None:
        import anthropic

        http, self._tap = _http_client(anthropic, "ANTHROPIC_BASE_URL")
        self._llm = anthropic.Anthropic(max_retries=0, http_client=http)
        self._model, self._system, self._stream = model, system, stream
        self._max_tokens = max_tokens

    @property
    def spent(self) -> Decimal | None:
        return self._tap.spent

    def tool(self, name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "description": description, "input_schema": schema}

    def ask(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        from anthropic import AnthropicError

        extra: Any = {"tools": tools} if tools else {}
        if self._system:
            extra["system"] = self._system
        extra["extra_body"] = _as_is(messages)
        try:
            if self._stream:
                with self._llm.messages.stream(
                    model=self._model, max_tokens=self._max_tokens, messages=(), **extra
                ) as events:
                    answer = events.get_final_message()
            else:
                answer = self._llm.messages.create(
                    model=self._model, max_tokens=self._max_tokens, messages=(), **extra
                )
        except AnthropicError as e:
            raise _failed(e) from e
        blocks: list[dict[str, Any]] = []
        for b in answer.content:
            if b.type == "text":
                blocks.append({"type": "text", "text": b.text})
            elif b.type == "tool_use":
                blocks.append({"type": "tool_use", "id": b.id, "name": b.name, "input": b.input})
        return {"role": "assistant", "content": blocks}

    def calls(self, message: dict[str, Any]) -> list[Call]:
        calls = []
        for b in message["content"]:
            if b["type"] == "tool_use":
                args = b["input"]
                ok = isinstance(args, dict)
                calls.append(Call(b["id"], b["name"], args if ok else None,
                                  "" if ok else "not an object"))  # fmt: skip
        return calls

    def add_result(
        self, messages: list[dict[str, Any]], call_id: str, content: str, *, error: bool
    ) -> None:
        block = {"type": "tool_result", "tool_use_id": call_id, "content": content,
                 "is_error": error}  # fmt: skip
        # An answer's results all go in the one user message that follows it.
        last = messages[-1]
        if last["role"] == "user" and isinstance(last["content"], list) and last["content"] and (
            last["content"][0].get("type") == "tool_result"
        ):  # fmt: skip
            last["content"].append(block)
        else:
            messages.append({"role": "user", "content": [block]})

    def add_user(self, messages: list[dict[str, Any]], text: str) -> None:
        block = {"type": "text", "text": text}
        # Turns alternate: after tool results (a user turn) the text joins them, after them.
        last = messages[-1]
        if last["role"] == "user":
            if not isinstance(last["content"], list):
                last["content"] = [{"type": "text", "text": last["content"]}]
            last["content"].append(block)
        else:
            messages.append({"role": "user", "content": [block]})

    def results(self, messages: Sequence[dict[str, Any]]) -> set[str]:
        return {b["tool_use_id"] for m in messages if m["role"] == "user"
                and isinstance(m["content"], list) for b in m["content"]
                if b.get("type") == "tool_result"}  # fmt: skip

    def text(self, message: dict[str, Any]) -> str:
        return "".join(b["text"] for b in message["content"] if b["type"] == "text")
