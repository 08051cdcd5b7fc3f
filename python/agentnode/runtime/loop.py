"""The think/act loop: ask the model, run the tools it calls, checkpoint, repeat until it
answers without calling a tool or a limit stops it.

Every model answer is saved before any tool it calls runs, and every tool result is saved too:
that one while the next model call runs (the save after it waits for it), so a step waits for
one checkpoint write, not two."""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TextIO
from urllib.parse import urlencode

from agentnode.errors import ConfigError, TaskError
from agentnode.runtime import formats
from agentnode.runtime.formats import Call
from agentnode.runtime.inbox import open_inbox
from agentnode.runtime.memory import TOOLS as MEMORY_TOOLS
from agentnode.runtime.memory import AgentMemory
from agentnode.runtime.nodetools import open_tools
from agentnode.runtime.state import State
from agentnode.sdk.task import ThisTask
from agentnode.sdk.transport import connect, request

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
        api: str = "openai",
        stream: bool = False,
        max_tokens: int = 4096,
        tools_via: str = "mcp",
        memory: str | None = "default",
        log: TextIO | None = None,
    ) -> None:
        """`api`: the model API spoken through the proxy (`formats.FORMATS`); `stream`: read
        answers as streams; `max_tokens`: an answer's cap (Anthropic requires one);
        `tools_via`: the door to the node's tools (`nodetools.DOORS`); `memory`: the memory
        space of the `remember`/`recall` tools (`runtime.memory`), or None for none."""
        self.limits = limits or Limits()
        self.task = ThisTask()
        self.format = formats.make(api, model=model, system=system, stream=stream,
                                   max_tokens=max_tokens)  # fmt: skip
        self.tools = open_tools(tools_via)
        try:
            node = {t["name"]: t for t in self.tools.list()}
            # A node tool of the same name (a tenant's MCP server's) keeps it.
            mine = {} if memory is None else {n: t for n, t in MEMORY_TOOLS.items()
                                              if n not in node}  # fmt: skip
            listed = {**node, **mine}
            unknown = sorted(set(tools or ()) - set(listed))
            if unknown:
                raise TaskError(
                    f"no node tool {', '.join(unknown)} (this task may use: {', '.join(listed)})"
                )
            chosen = listed if tools is None else {n: listed[n] for n in tools}
            self._remembers = set(mine) & set(chosen)
            self.memory = (
                AgentMemory(space=memory) if memory is not None and self._remembers else None
            )
        except BaseException:
            self.tools.close()
            raise
        self.offered = set(chosen)
        self.schemas = [self.format.tool(name, t.get("description", ""),
                                         t.get("inputSchema") or {"type": "object"})
                        for name, t in chosen.items()]  # fmt: skip
        self._log = log or sys.stderr
        self.say(f"tools via {tools_via}: {', '.join(chosen)}")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._saving: Future[None] | None = None
        self._inbox = open_inbox()
        #: The proxy connection `spent` asks on, made on its first use.
        self._usage: tuple[http.client.HTTPConnection, str] | None = None

    def say(self, text: str) -> None:
        print(f"runtime: {text}", file=self._log, flush=True)

    def run(self, text: str) -> str:
        """The model's final answer to `text` (continuing this task's checkpoint if it has
        one); `Stopped` when a limit ends the run first. Closes the agent."""
        try:
            return self._run(text)
        finally:
            try:
                self._settle()
            finally:
                self._saver.shutdown()
                if self._usage is not None:
                    self._usage[0].close()
                self.tools.close()
                if self.memory is not None:
                    self.memory.close()

    def _run(self, text: str) -> str:
        blob = self.task.checkpoint()
        if blob is None:
            state = State(api=self.format.name, messages=[{"role": "user", "content": text}])
        else:
            state = State.load(blob)
            if state.api != self.format.name:
                raise TaskError(f"this task's checkpoint is a conversation in the {state.api} "
                                f"format; run the runtime with --api {state.api}")  # fmt: skip
            self.say(f"resumed after step {state.steps} ({len(state.messages)} messages)")
        while True:
            for call in state.pending(self.format):
                content, error = self._act(state.steps, call)
                self.format.add_result(state.messages, call.id, content, error=error)
                # Recorded while the model reads it: the next save waits for this one.
                self._save(state, wait=False)
            self._take_inputs(state)
            answer = state.answer(self.format)
            if answer is not None:
                return answer
            self._check(state)
            state.messages.append(self._think(state))
            state.steps += 1
            # Recorded before any tool it calls runs: a retry never asks the model again.
            self._save(state, wait=True)

    def _take_inputs(self, state: State) -> None:
        """Adds what was sent to this task since the last look (its inbox) as user messages:
        the model reads them in its next call (saved with its answer)."""
        if self._inbox is None:
            return
        texts, state.inbox = self._inbox.read(state.inbox)
        for text in texts:
            self.format.add_user(state.messages, text)
            self.say(f"input after step {state.steps}: {' '.join(text.split())[:200]}")

    def _save(self, state: State, *, wait: bool) -> None:
        """Saves `state` as the checkpoint, after the save before it (whose failure ends the
        run here); `wait=False` returns while the node writes it."""
        self._settle()
        blob = state.dump()
        if wait:  # on this thread: a hand-off to the saver and back costs the step twice
            self.task.save_checkpoint(blob)
        else:
            self._saving = self._saver.submit(self.task.save_checkpoint, blob)

    def _settle(self) -> None:
        saving, self._saving = self._saving, None
        if saving is not None:
            saving.result()

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
        """What this task's model calls cost so far: as the proxy told it with the last answer
        (that call included: no request), else (before this run's first call, or from a proxy
        that does not tell) its row of the proxy's ledger, asked for alone (`task=`) on a
        connection kept for the run."""
        told = self.format.spent
        if told is not None:
            return told
        base = os.environ.get("OPENAI_BASE_URL", "").rstrip("/")
        if self._usage is None:
            try:
                self._usage = connect(base, timeout=30)
            except ConfigError as e:
                raise TaskError(f"cannot read this task's spend: {e}") from None
        conn, path = self._usage
        target = f"{path}/usage?{urlencode({'group_by': 'task', 'task': self.task.id})}"
        auth = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"}
        where, what = f"the proxy at {base}", "cannot read this task's spend"
        try:
            try:
                body = request(conn, "GET", target, None, auth, where=where, what=what)
            except TaskError as e:
                if not isinstance(e.__cause__, OSError):
                    raise
                # The proxy closed the idle connection (a long step): once more on a new one.
                body = request(conn, "GET", target, None, auth, where=where, what=what)
            rows = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise TaskError(f"{what} from {where} ({e})") from e
        return sum((Decimal(r["cost"]) for r in rows if r["task"] == self.task.id), Decimal(0))

    def _think(self, state: State) -> dict[str, Any]:
        message = self.format.ask(state.messages, self.schemas)
        calls = self.format.calls(message)
        if calls:
            self.say(f"step {state.steps + 1}: calls {', '.join(c.name for c in calls)}")
        else:
            self.say(f"step {state.steps + 1}: answered")
        return message

    def _act(self, step: int, call: Call) -> tuple[str, bool]:
        """The text of `call`'s result for the model, and whether it is an error."""
        if call.arguments is None:
            return f"the arguments of {call.name} are not a JSON object ({call.error})", True
        if call.name not in self.offered:
            return f"no tool {call.name} here", True
        # Task, step and call id: a repeat after a kill returns the first run's result.
        key = f"{self.task.id}:{step}:{call.id}"
        if self.memory is not None and call.name in self._remembers:
            content, error = self.memory.call(call.name, call.arguments, key=key)
            self.say(f"step {step}: {call.name} -> {'error' if error else 'ok'}")
            return content, error
        result = self.tools.call(call.name, call.arguments, key=key)
        cls = result.get("_meta", {}).get("agentnode", {}).get("class", "ok")
        self.say(f"step {step}: {call.name} -> {cls}")
        return _text(result), bool(result.get("isError"))


def _text(result: dict[str, Any]) -> str:
    """What the model reads of a tool's normalised result."""
    texts = [c.get("text", "") for c in result.get("content") or () if c.get("type") == "text"]
    return "\n".join(texts) if texts else json.dumps(result.get("structuredContent"))
