"""One place every door calls a tool through: input check, retries, idempotency keys, the
normalised result and one audit record per call."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from agentnode.errors import AuditError, StoreWriteError
from agentnode.tools.keys import KeyStore
from agentnode.tools.registry import Caller, Registry, Tool, redact, shortened
from agentnode.tools.result import RETRYABLE, Outcome

__all__ = [
    "MAX_KEY",
    "RUNNING_PER_CALLER",
    "ToolService",
    "ToolSource",
    "jsonl_recorder",
    "key_problem",
]

#: Tool calls one task (a caller without a task: its tenant) runs at once; more wait their
#: turn, so one task's flood of slow calls holds its own calls back, not other tasks'.
RUNNING_PER_CALLER = 8

log = logging.getLogger("agentnode.tools")

Record = Callable[[dict[str, Any]], object]

#: What an audit record holds for arguments it cannot hold.
_UNRECORDABLE = "[arguments not recordable as JSON]"


class ToolSource(Protocol):
    """Tools that come and go (an MCP server's): listed per tenant, found by name."""

    async def tools(self, tenant: str) -> list[Tool]: ...

    async def get(self, name: str, tenant: str) -> Tool | None: ...

    def known(self, name: str, tenant: str) -> Tool | None:
        """The tool when it is already known here (nothing is started to learn it)."""
        ...


def jsonl_recorder(path: Path) -> Record:
    """An `on_record` that appends each record as one JSON line to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a", buffering=1)

    def record(rec: dict[str, Any]) -> None:
        f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    return record


def _args_sha256(args: Any) -> str:
    """The digest of a call's arguments. `ValueError`: they hold a number JSON has no form
    for (NaN, an infinity), which no audit record could hold either."""
    return hashlib.sha256(
        json.dumps(args, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    ).hexdigest()


#: The longest idempotency key, in characters (a key is kept with its result).
MAX_KEY = 256


def key_problem(key: object) -> str | None:
    """What is wrong with an idempotency key as a caller sent it (None: nothing)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or "\0" in key:
        return f"must be a string of 1 to {MAX_KEY} characters without NUL"
    return None


def _other_arguments(key: str) -> Outcome:
    return Outcome.error(
        "invalid_input",
        f"idempotency key {key!r} was first used with other arguments "
        "(use a new key for a new call)",
    )


def _cut_off(key: str, how: str) -> Outcome:
    """What repeats of a keyed call get when its run was cut off `how` (it may have had its
    effect): it is never run again under that key."""
    return Outcome.error(
        "permanent",
        f"the call with idempotency key {key!r} was {how} and its outcome is unknown; it is "
        "not run again under this key (use a new key)",
        interrupted=True,
    )


def _not_run(why: object, retry_after: float) -> Outcome:
    """A call refused before anything ran, because it could not be kept track of (`why`)."""
    outcome = Outcome.error("transient", f"the call was not run: {why}")
    outcome.retry_after = retry_after
    return outcome


class ToolService:
    """Calls tools of `registry` for callers; `on_record(record)` gets one audit record per
    call. A call carrying an idempotency key runs at most once per (tenant, tool, key): a
    repeat, even while the first is still running, gets the first call's result. With `keys`
    (a `KeyStore`) that holds across node restarts too."""

    def __init__(
        self,
        registry: Registry,
        *,
        on_record: Record,
        sources: Sequence[ToolSource] = (),
        keys_kept: int = 10_000,
        keys: KeyStore | None = None,
        held_back: Callable[[], str | None] = lambda: None,
    ) -> None:
        """`held_back()`: why no call may run now (the audit log cannot be written), or
        None."""
        self.registry = registry
        self._held_back = held_back
        self.sources = list(sources)
        self._on_record = on_record
        self._store = keys
        self._keys: OrderedDict[tuple[str, str, str], tuple[str, asyncio.Future[dict[str, Any]]]]
        self._keys = OrderedDict()
        self._keys_kept = keys_kept
        #: The turns of each caller (tenant, task) with calls under way or waiting, and how
        #: many those are (its entry goes with its last).
        self._turns: dict[tuple[str, str], tuple[asyncio.Semaphore, int]] = {}

    async def tools(self, tenant: str) -> list[Tool]:
        """The tools `tenant` may use."""
        out = self.registry.visible(tenant)
        for source in self.sources:
            out += await source.tools(tenant)
        return out

    async def list(self, tenant: str) -> list[dict[str, Any]]:
        """The tools `tenant` may use, as MCP's `tools/list` shows them."""
        return [t.describe() for t in await self.tools(tenant)]

    def input_schema(self, name: str, tenant: str) -> Mapping[str, Any] | None:
        """The input schema of tool `name` as `tenant` sees it, when it is known without
        starting anything (None: no such tool, or not known yet)."""
        tool = self.registry.get(name, tenant)
        for source in self.sources:
            if tool is not None:
                break
            tool = source.known(name, tenant)
        return None if tool is None else tool.input_schema

    async def _lookup(self, name: str, tenant: str) -> Tool | None:
        tool = self.registry.get(name, tenant)
        for source in self.sources:
            if tool is not None:
                break
            tool = await source.get(name, tenant)
        return tool

    async def call(
        self, name: str, args: Any, caller: Caller, *, idempotency_key: object = None
    ) -> dict[str, Any]:
        """Runs tool `name` for `caller`; never raises for a bad name, input or key (those
        come back as `invalid_input`). A key is the caller's own: its task's (a caller without
        a task: its tenant's), per tool."""
        tool = await self._lookup(name, caller.tenant) if isinstance(name, str) else None
        try:
            digest = _args_sha256(args)
        except ValueError:
            outcome = Outcome.error("invalid_input", "arguments: a number JSON has no form for "
                                    "(NaN or an infinity)")  # fmt: skip
            return self._finish(tool, name, _UNRECORDABLE, caller, "", time.monotonic(),
                                outcome, attempts=0)  # fmt: skip
        if idempotency_key is not None and (problem := key_problem(idempotency_key)):
            outcome = Outcome.error("invalid_input", f"idempotency key: {problem}")
            return self._finish(
                tool, name, args, caller, digest, time.monotonic(), outcome, attempts=0
            )
        if (why := self._held_back()) is not None:
            # Its record would wait in memory, and a crash meanwhile would lose it: a call
            # that cannot be audited is not run (as a keyed one whose key cannot be stored).
            outcome = _not_run(why, retry_after=5.0)
            return self._finish(
                tool, name, args, caller, digest, time.monotonic(), outcome, attempts=0
            )
        if idempotency_key is None or tool is None:
            return await self._call(tool, name, args, caller, digest, keyed=False)
        assert isinstance(idempotency_key, str)
        owner = f"{caller.tenant}/{caller.task}" if caller.task else caller.tenant
        slot = (owner, name, idempotency_key)
        held = self._keys.get(slot)
        if held is not None:
            first_digest, future = held
            if first_digest != digest:
                outcome = _other_arguments(idempotency_key)
                return self._finish(
                    tool, name, args, caller, digest, time.monotonic(), outcome, attempts=0
                )
            return await asyncio.shield(future)
        stored = self._store.get(slot) if self._store is not None else None
        if stored is not None:
            return self._from_store(tool, name, args, caller, digest, idempotency_key, stored)
        if self._store is not None:
            try:
                self._store.start(slot, digest)
            except StoreWriteError as e:
                # Unrecorded, a repeat after a restart could run it twice: not run at all.
                outcome = _not_run(e, retry_after=1.0)
                return self._finish(
                    tool, name, args, caller, digest, time.monotonic(), outcome, attempts=0
                )
        future = asyncio.get_running_loop().create_future()
        self._keys[slot] = (digest, future)
        while len(self._keys) > self._keys_kept:
            self._keys.popitem(last=False)
        try:
            result = await self._call(tool, name, args, caller, digest, keyed=True)
        except BaseException:
            # Cancelled mid-run: it may have had its effect (a started run goes on past its
            # caller), so the key stays taken, cut off as by a crash: a repeat is told so,
            # here and after a restart, and it is never run twice.
            cut = _cut_off(idempotency_key, "cancelled while it ran")
            future.set_result(cut.to_json(duration_ms=0.0, retryable=False, attempts=0))
            raise
        future.set_result(result)
        if self._store is not None:
            try:
                self._store.finish(slot, digest, result)
            except StoreWriteError as e:
                # A repeat on this node gets it from memory; after a restart the key reads as
                # cut off (never run twice).
                log.error("result of %s under idempotency key %r not stored: %s", name,
                          idempotency_key, e)  # fmt: skip
        return result

    def _from_store(
        self,
        tool: Tool,
        name: str,
        args: Any,
        caller: Caller,
        digest: str,
        key: str,
        stored: tuple[str, dict[str, Any] | None],
    ) -> dict[str, Any]:
        """A key used before this node (re)started: its first result, or why there is none."""
        first_digest, result = stored
        if first_digest == digest and result is not None:
            return result
        if first_digest != digest:
            outcome = _other_arguments(key)
        else:
            outcome = _cut_off(key, "cut off by a node restart")
        return self._finish(tool, name, args, caller, digest, time.monotonic(), outcome, attempts=0)

    async def _call(
        self, tool: Tool | None, name: str, args: Any, caller: Caller, digest: str, *, keyed: bool
    ) -> dict[str, Any]:
        start = time.monotonic()
        if tool is None:
            outcome = Outcome.error(
                "invalid_input", f"no tool named {name!r} (list them with agentnode tool ls)"
            )
            return self._finish(None, name, args, caller, digest, start, outcome, attempts=0)
        problem = tool.input_error(args)
        if problem is not None:
            outcome = Outcome.error("invalid_input", f"input {problem}", path=problem.split(":")[0])
            return self._finish(tool, name, args, caller, digest, start, outcome, attempts=0)
        retry = keyed or tool.idempotent
        attempt = 0
        try:
            while True:
                attempt += 1
                outcome = await self._run_once(tool, args, caller)
                again = outcome.cls in RETRYABLE or outcome.detail.get("retryable") is True
                if not (again and retry and attempt < tool.retry.attempts):
                    break
                await asyncio.sleep(tool.retry.delay(attempt, outcome.retry_after))
        except asyncio.CancelledError:
            # Its caller went: what ran of it (a started run goes on) is recorded all the same.
            outcome = Outcome.error("permanent", "cancelled by its caller", cancelled=True)
            self._finish(tool, name, args, caller, digest, start, outcome, attempts=attempt)
            raise
        return self._finish(tool, name, args, caller, digest, start, outcome, attempts=attempt)

    async def _run_once(self, tool: Tool, args: dict[str, Any], caller: Caller) -> Outcome:
        who = (caller.tenant, caller.task)
        turns, waiting = self._turns.get(who) or (asyncio.Semaphore(RUNNING_PER_CALLER), 0)
        self._turns[who] = (turns, waiting + 1)
        try:
            async with turns:
                if not caller.alive():
                    # It waited its turn past its task's end, whose sandboxes went with it.
                    return Outcome.error("permanent", f"task {caller.task} has ended")
                return await tool.run(args, caller)
        except Exception as e:
            # A tool's own bug: the caller gets one line, the node log the traceback.
            log.exception("tool %s failed", tool.name)
            return Outcome.error("permanent", f"tool {tool.name} failed: {e}")
        finally:
            left = self._turns[who][1] - 1
            if left:
                self._turns[who] = (turns, left)
            else:
                del self._turns[who]

    def _finish(
        self,
        tool: Tool | None,
        name: str,
        args: Any,
        caller: Caller,
        digest: str,
        start: float,
        outcome: Outcome,
        *,
        attempts: int,
    ) -> dict[str, Any]:
        duration_ms = (time.monotonic() - start) * 1000
        retryable = outcome.cls in RETRYABLE or outcome.detail.get("retryable") is True
        denied = self._record_denials(name, caller, outcome)
        result = outcome.to_json(duration_ms=duration_ms, retryable=retryable, attempts=attempts)
        record = {
            "kind": "tool_call",
            "time": time.time(),
            "task": caller.task,
            "tenant": caller.tenant,
            "tool": name,
            "args_sha256": digest,
            "args": shortened(redact(tool.input_schema, args))
            if tool is not None
            else "[unknown tool]",
            "class": outcome.cls,
            "duration_ms": round(duration_ms, 3),
            "cpu_s": round(outcome.cpu_s, 6),
            "memory_peak": outcome.memory_peak,
            "bytes_out": outcome.bytes_out,
            "attempts": attempts,
            **({"denials": denied} if denied else {}),
            **({"cancelled": True} if outcome.detail.get("cancelled") else {}),
        }
        try:
            try:
                self._on_record(record)
            except (AuditError, ValueError):
                # Arguments a record cannot hold (the log's encoder refused them): the call is
                # recorded all the same, without them.
                self._on_record({**record, "args": _UNRECORDABLE})
        except Exception:
            log.exception("tool audit record could not be written")
        return result

    def _record_denials(self, name: str, caller: Caller, outcome: Outcome) -> Sequence[int]:
        """Writes an `egress_denied` record per connection the tool's sandbox was denied (the
        caller's task and tenant, and the tool) and names the first in `_meta.agentnode`
        `denial`, with its record's seq when the log gives one. Returns the seqs."""
        seqs: list[int] = []
        for i, d in enumerate(outcome.denials):
            denial: dict[str, Any] = {
                "address": str(d.address),
                "port": d.port,
                "protocol": d.protocol,
                "reason": d.reason,
            }
            record = {
                "kind": "egress_denied",
                "task": caller.task,
                "tenant": caller.tenant,
                "tool": name,
                **denial,
                "pid": d.pid,
                **({"name": d.name} if d.name else {}),
            }
            try:
                seq = self._on_record(record)
            except Exception:
                log.exception("egress denial record could not be written")
                seq = None
            if isinstance(seq, int):
                seqs.append(seq)
                denial["record"] = seq
            if i == 0:
                outcome.detail["denial"] = denial
        return seqs
