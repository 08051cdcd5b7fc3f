"""The think/act loop: ask the model, run the tools it calls, checkpoint, repeat until it
answers without calling a tool or a limit stops it."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TextIO

from agentnode.errors import TaskError
from agentnode.runtime.state import State
from agentnode.sdk.task import ThisTask
from agentnode.sdk.tools import Tools

if TYPE_CHECKING:
    from openai import OpenAI

__all__ = ["Agent", "Limits", "Stopped"]


@dataclass(frozen=True, kw_only=True)
class Limits:
    """When the loop gives up without an answer."""

    max_steps: int = 20
    #: Wall seconds since the first attempt started (a retry does not get a fresh allowance).
    max_seconds: float = 1800.0
    #: US dollars this task may spend on models (the proxy's ledger, every attempt), or None.
    budget: Decimal | None = None


class Stopped(TaskError):
    """A limit ended the run before the model answered; the message names it."""


class Agent:
    """One run of the loop for this task; its progress is the task's checkpoint."""

    def __init__(
        self,
        *,
        model: str,
        tools: Sequence[str] | None = None,
        limits: Limits | None = None,
        system: str | None = None,
        llm: OpenAI | None = None,
        log: TextIO | None = None,
    ) -> None:
        self.model = model
        self.limits = limits or Limits()
        self.system = system
        self.task = ThisTask()
        self.tools = Tools()
        listed = {t["name"]: t for t in self.tools.list()}
        unknown = sorted(set(tools or ()) - set(listed))
        if unknown:
            raise TaskError(
                f"no node tool {', '.join(unknown)} (this task may use: {', '.join(listed)})"
            )
        chosen = listed if tools is None else {n: listed[n] for n in tools}
        self.schemas: list[dict[str, Any]] = [
            {"type": "function", "function": {"name": name, "description": t.get(
                "description", ""), "parameters": t.get("inputSchema") or {"type": "object"}}}
            for name, t in chosen.items()
        ]  # fmt: skip
        if llm is None:
            from openai import OpenAI

            # The proxy retries upstreams itself; a failure here ends the attempt and the
            # node's retry resumes from the checkpoint, so the model is never asked twice.
            llm = OpenAI(max_retries=0)
        self.llm = llm
        self._log = log or sys.stderr

    def say(self, text: str) -> None:
        print(f"runtime: {text}", file=self._log, flush=True)

    def run(self, text: str) -> str:
        """The model's final answer to `text` (continuing this task's checkpoint if it has
        one); `Stopped` when a limit ends the run first."""
        blob = self.task.checkpoint()
        if blob is None:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            state = State(messages=[*messages, {"role": "user", "content": text}])
        else:
            state = State.load(blob)
            self.say(f"resumed after step {state.steps} ({len(state.messages)} messages)")
        while True:
            for call in state.pending():
                state.messages.append(self._act(state.steps, call))
                self.task.save_checkpoint(state.dump())
            answer = state.answer()
            if answer is not None:
                return answer
            self._check(state)
            state.messages.append(self._think(state))
            state.steps += 1
            self.task.save_checkpoint(state.dump())

    def _check(self, state: State) -> None:
        lim = self.limits
        if state.steps >= lim.max_steps:
            raise Stopped(f"max steps ({lim.max_steps}) reached before a final answer")
        elapsed = time.time() - state.started
        if elapsed >= lim.max_seconds:
            raise Stopped(f"wall time of {lim.max_seconds:g} s used ({elapsed:.1f} s) before a "
                          "final answer")  # fmt: skip
        if lim.budget is not None:
            spent = self.spent()
            if spent >= lim.budget:
                raise Stopped(f"budget of ${lim.budget} spent (${spent} so far) before a "
                              "final answer")  # fmt: skip

    def spent(self) -> Decimal:
        """What this task's model calls cost so far: its row of the proxy's ledger."""
        base = os.environ.get("OPENAI_BASE_URL", "").rstrip("/")
        req = urllib.request.Request(
            f"{base}/usage?group_by=task",
            headers={"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                rows = json.load(resp)["data"]
        except (OSError, ValueError, KeyError) as e:
            raise TaskError(f"cannot read this task's spend from the proxy at {base} ({e})") from e
        return sum((Decimal(r["cost"]) for r in rows if r["task"] == self.task.id), Decimal(0))

    def _think(self, state: State) -> dict[str, Any]:
        messages: Any = state.messages  # plain dicts: the SDK's TypedDicts, unchecked
        extra: Any = {"tools": self.schemas} if self.schemas else {}
        resp = self.llm.chat.completions.create(model=self.model, messages=messages, **extra)
        m = resp.choices[0].message
        message: dict[str, Any] = {"role": "assistant", "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump(include={"id", "type", "function"})
                                     for c in m.tool_calls]  # fmt: skip
            names = ", ".join(c["function"]["name"] for c in message["tool_calls"])
            self.say(f"step {state.steps + 1}: calls {names}")
        else:
            self.say(f"step {state.steps + 1}: answered")
        return message

    def _act(self, step: int, call: dict[str, Any]) -> dict[str, Any]:
        fn = call["function"]
        name = fn["name"]
        try:
            args = json.loads(fn.get("arguments") or "{}")
            if not isinstance(args, dict):
                raise ValueError("not an object")
        except ValueError as e:
            content = f"error: the arguments of {name} are not a JSON object ({e})"
        else:
            if name not in {s["function"]["name"] for s in self.schemas}:
                content = f"error: no tool {name} here"
            else:
                # Task, step and call id: a repeat after a kill returns the first run's result.
                key = f"{self.task.id}:{step}:{call['id']}"
                result = self.tools.call(name, args, idempotency_key=key)
                content = _text(result)
                cls = result.get("_meta", {}).get("agentnode", {}).get("class", "ok")
                self.say(f"step {step}: {name} -> {cls}")
        return {"role": "tool", "tool_call_id": call["id"], "content": content}


def _text(result: dict[str, Any]) -> str:
    """What the model reads of a tool's normalised result."""
    texts = [c.get("text", "") for c in result.get("content") or () if c.get("type") == "text"]
    text = "\n".join(texts) if texts else json.dumps(result.get("structuredContent"))
    return f"error: {text}" if result.get("isError") else text
