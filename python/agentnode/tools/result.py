"""Normalised tool results: MCP's `CallToolResult` shape plus `_meta.agentnode`, which says
what kind of outcome it was and whether trying again can help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agentnode.egress.enforce import Denial

__all__ = ["CLASSES", "RETRYABLE", "Outcome", "ToolClass"]

ToolClass = Literal[
    "ok", "invalid_input", "permanent", "transient", "timeout", "policy", "resource"
]
#: Every class a call can end in: `resource` is an OOM or pids-limit kill, `policy` an egress
#: denial; `transient` and (when the tool says so) `timeout` are worth a retry.
CLASSES: tuple[ToolClass, ...] = (
    "ok",
    "invalid_input",
    "permanent",
    "transient",
    "timeout",
    "policy",
    "resource",
)
RETRYABLE = frozenset({"transient"})


@dataclass(slots=True, kw_only=True)
class Outcome:
    """What one run of a tool produced, before the service adds timing and retries."""

    cls: ToolClass = "ok"
    content: list[dict[str, Any]] = field(default_factory=list)
    structured: dict[str, Any] | None = None
    retry_after: float | None = None
    cpu_s: float = 0.0
    memory_peak: int = 0
    bytes_out: int = 0
    truncated: bool = False
    #: Extra facts for `_meta.agentnode` (e.g. an exit status).
    detail: dict[str, Any] = field(default_factory=dict)
    #: Connections the tool's sandbox was denied during the call: the service records each
    #: in the audit log and names the first (with its record's seq) in `_meta.agentnode`.
    denials: list[Denial] = field(default_factory=list)

    @classmethod
    def error(cls, kind: ToolClass, message: str, **detail: Any) -> Outcome:
        """A failed run whose one text block says what went wrong."""
        return cls(cls=kind, content=[{"type": "text", "text": message}], detail=detail)

    @classmethod
    def text(cls, text: str, **kw: Any) -> Outcome:
        return cls(content=[{"type": "text", "text": text}], **kw)

    def to_json(self, *, duration_ms: float, retryable: bool, attempts: int = 1) -> dict[str, Any]:
        """The result as tasks see it (MCP `CallToolResult` with `_meta.agentnode`)."""
        meta: dict[str, Any] = {
            "class": self.cls,
            "retryable": retryable,
            "retry_after": self.retry_after,
            "duration_ms": round(duration_ms, 3),
            "cpu_s": round(self.cpu_s, 6),
            "memory_peak": self.memory_peak,
            "bytes_out": self.bytes_out,
            "truncated": self.truncated,
            "attempts": attempts,
            **self.detail,
        }
        out: dict[str, Any] = {
            "content": self.content,
            "isError": self.cls != "ok",
            "_meta": {"agentnode": meta},
        }
        if self.structured is not None:
            out["structuredContent"] = self.structured
        return out
