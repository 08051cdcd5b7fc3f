"""The tools a node serves: name, input schema, limits, egress and retry policy, and who may
use them. Input is checked against the schema before any tool runs."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
import referencing
import referencing.exceptions

from agentnode.egress.policy import EgressPolicy
from agentnode.errors import UsageError
from agentnode.isolation.spec import Limits
from agentnode.tools.result import Outcome

__all__ = [
    "Caller",
    "Registry",
    "RetryPolicy",
    "Tool",
    "ToolLimits",
    "redact",
]

#: What a schema's `$ref` may name beyond the schema itself: nothing (no retrieval).
NO_FETCH: referencing.Registry[Any] = referencing.Registry()


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolLimits:
    """Per-call limits of a tool that runs code: cpus, memory and pids of its sandbox, wall
    timeout, and the bytes of output kept (the rest is cut and `truncated` set)."""

    cpus: float | None = 1.0
    memory: int | None = 256 << 20
    pids: int | None = 64
    timeout: float = 30.0
    output: int = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a transient failure is retried: at most `attempts` runs in all, waiting
    `base_s * 2**n` (capped at `max_s`, or the result's retry_after) between them."""

    attempts: int = 3
    base_s: float = 0.05
    max_s: float = 2.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_s)
        return min(self.base_s * 2.0 ** (attempt - 1), self.max_s)


def _forever() -> bool:
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """Who calls a tool: the task (and its tenant), its workspace on the host, and its own
    network mode and egress policy, which bound what any tool may reach for it."""

    task: str
    tenant: str
    workspace: Path | None = None
    network: str = "none"
    egress: EgressPolicy | None = None
    #: The user the task runs as (tools that write for it run as the same user).
    user: str = "65534"
    userns: bool = False
    #: Whether its task still runs, for a task's own calls, which end with it: a call that
    #: waited its turn, or a sandbox made as the task ended, asks before it goes on.
    alive: Callable[[], bool] = field(default=_forever, compare=False, repr=False)
    #: The task's own limits, which no sandbox acting for it may exceed (see `within`).
    task_limits: Limits | None = None

    def within(self, limits: ToolLimits) -> ToolLimits:
        """A tool's per-call `limits`, its cpus, memory and pids at most the task's own: a
        task cannot get more of them by asking a tool to run its code."""
        own = self.task_limits
        if own is None:
            return limits

        def least(tool: Any, task: Any) -> Any:
            return task if tool is None else tool if task is None else min(tool, task)

        return dataclasses.replace(
            limits,
            cpus=least(limits.cpus, own.cpus),
            memory=least(limits.memory, own.memory),
            pids=least(limits.pids, own.pids),
        )

    def reach(self) -> tuple[str, EgressPolicy | None]:
        """The network mode and policy a tool's sandbox gets when it acts with this caller's
        own network: the caller's, minus its published ports (those take connections in, to
        the task itself, not to its tools); `("none", None)` when it has no network."""
        if self.network not in ("egress", "host") or self.egress is None:
            return "none", None
        if not self.egress.publish:
            return self.network, self.egress
        return self.network, dataclasses.replace(self.egress, publish=())


Run = Callable[[dict[str, Any], Caller], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    """One tool. `run` gets input already checked against `input_schema`. Properties marked
    `"secret": true` in the schema are redacted from the audit record."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    run: Run = field(repr=False)
    output_schema: Mapping[str, Any] | None = None
    limits: ToolLimits = ToolLimits()
    egress: EgressPolicy | None = None
    retry: RetryPolicy = RetryPolicy()
    #: Safe to run twice with the same input: transient failures retry without a key.
    idempotent: bool = False
    #: Tenants that may use it (None: every tenant).
    tenants: frozenset[str] | None = None

    #: Built once: checking a schema and compiling its validator cost more than a call.
    validator: Any = field(init=False, repr=False, compare=False)
    #: The same schema compiled by jsonschema-rs, which answers "valid?" in ~0.2 us where the
    #: pure-Python validator takes ~12 us hot and ~50 us in a tool call's cold caches; None
    #: when it cannot compile the schema (the Python validator then decides alone).
    _fast: Any = field(init=False, repr=False, compare=False)
    #: `describe()`'s answer, built once (a deep copy per listing was ~0.1 ms a tool, and
    #: every agent lists them at its start).
    _described: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            jsonschema.Draft202012Validator.check_schema(self.input_schema)
        except jsonschema.SchemaError as e:
            raise UsageError(
                f"tool {self.name}: its input schema is invalid: {e.message}"
            ) from None
        # Neither validator fetches a `$ref` by URL: a schema is an MCP server's word, and the
        # node reaches what a sandboxed server may not (the Python one fetched by default).
        validator = jsonschema.Draft202012Validator(self.input_schema, registry=NO_FETCH)
        object.__setattr__(self, "validator", validator)
        try:
            fast = jsonschema_rs.Draft202012Validator(dict(self.input_schema), offline=True)
        except Exception:  # its checks differ from the Python validator's, which passed it
            fast = None
        object.__setattr__(self, "_fast", fast)
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "inputSchema": copy.deepcopy(dict(self.input_schema)),
        }
        if self.output_schema is not None:
            out["outputSchema"] = copy.deepcopy(dict(self.output_schema))
        object.__setattr__(self, "_described", out)

    def input_error(self, args: Any) -> str | None:
        """None when `args` fits the input schema; else one line naming the path and problem
        (the Python validator's words: it is asked whenever the fast one says no)."""
        if self._fast is not None and self._fast.is_valid(args):
            return None
        try:
            error = jsonschema.exceptions.best_match(self.validator.iter_errors(args))
        except referencing.exceptions.Unresolvable as e:
            return f"(root): the tool's input schema refers to {e}, which the node does not fetch"
        if error is None:
            return None
        path = "/".join(str(p) for p in error.absolute_path)
        return f"{'/' + path if path else '(root)'}: {error.message}"

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def describe(self) -> dict[str, Any]:
        """The tool as MCP's `tools/list` shows it: one dict made at the tool's creation, with
        copies of its schemas, shared by every listing (read it, serialise it; never change
        it)."""
        return self._described


#: What an audit record keeps of arguments: strings cut to this many characters, lists and
#: objects to this many items, and this deep (`args_sha256` fingerprints them whole).
RECORDED_CHARS = 1024
RECORDED_ITEMS = 64
RECORDED_DEPTH = 16


def shortened(value: Any, depth: int = 0) -> Any:
    """`value` as an audit record keeps it (see `RECORDED_CHARS`): each cut says how much was
    there, so a task's 3 MiB `write_file` costs the log a few kB, not 3 MiB a call."""
    if isinstance(value, str):
        if len(value) <= RECORDED_CHARS:
            return value
        return value[:RECORDED_CHARS] + f"…[{len(value)} characters]"
    if not isinstance(value, (dict, list)):
        return value
    if depth >= RECORDED_DEPTH:
        return f"[{len(value)} items nested deeper than {RECORDED_DEPTH}]"
    if isinstance(value, list):
        out = [shortened(v, depth + 1) for v in value[:RECORDED_ITEMS]]
        if len(value) > RECORDED_ITEMS:
            out.append(f"…[{len(value)} items]")
        return out
    kept = {k: shortened(v, depth + 1) for k, v in list(value.items())[:RECORDED_ITEMS]}
    if len(value) > RECORDED_ITEMS:
        kept["…"] = f"[{len(value)} keys]"
    return kept


def redact(schema: Mapping[str, Any], args: Any) -> Any:
    """`args` with every value whose schema says `"secret": true` replaced by "[redacted]"
    (nested objects and arrays too)."""
    if schema.get("secret") is True:
        return "[redacted]"
    if isinstance(args, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in args.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            out[key] = redact(sub, value)
        return out
    if isinstance(args, list) and isinstance(schema.get("items"), dict):
        return [redact(schema["items"], v) for v in args]
    return args


class Registry:
    """Tools by name; a tenant sees only those it may use."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise UsageError(f"tool {tool.name!r} is declared twice (give each tool its own name)")
        self._tools[tool.name] = tool

    def get(self, name: str, tenant: str) -> Tool | None:
        """The tool, or None when there is none by that name this tenant may use (the two look
        the same, so a tenant cannot learn what others have)."""
        tool = self._tools.get(name)
        return tool if tool is not None and tool.allows(tenant) else None

    def visible(self, tenant: str) -> list[Tool]:
        return [t for t in self._tools.values() if t.allows(tenant)]
