"""Task timelines as OpenTelemetry spans, per the GenAI semantic conventions, sent over OTLP/HTTP.

When a task ends, its timeline (from the audit index) becomes one trace: an `invoke_agent` span
for the task (queued to its end), a `chat {model}` child per LLM call (its latency ending at
its ledger time) and an `execute_tool {name}` child per tool call; execs, egress denials,
checkpoints and limit events are span events on the task's span. The SDK's batch processor
sends them from its own thread; nothing here runs on the event loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

__all__ = ["TimelineExporter", "spans_of"]

log = logging.getLogger("agentnode.audit")

_NS = 1_000_000_000
#: Timeline kinds shown as events on the task's span.
_EVENTS = ("exec", "egress_denied", "checkpoint", "oom", "pids_limit")
_FAILED = ("failed", "timed_out", "cancelled", "lost")


def _ns(seconds: float) -> int:
    return int(seconds * _NS)


class TimelineExporter:
    """Exports each ended task's timeline to `endpoint` (an OTLP/HTTP traces URL).

    `timeline(task_id)` returns the task's timeline entries (flushed), oldest first.
    """

    def __init__(self, endpoint: str, *, timeline: Callable[[str], list[dict[str, Any]]]) -> None:
        self._provider = TracerProvider(resource=Resource.create({"service.name": "agentnode"}))
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=200)
        )
        self._timeline = timeline
        self._ended: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="agentnode-otel", daemon=True)
        self._thread.start()

    def task_ended(self, task_id: str) -> None:
        """Queues the task's trace (its records are read on the exporter's thread)."""
        self._ended.put(task_id)

    def _run(self) -> None:
        tracer = self._provider.get_tracer("agentnode.audit")
        while (task_id := self._ended.get()) is not None:
            try:
                spans_of(tracer, self._timeline(task_id))
            except Exception:  # one task's export failing must not stop the others
                log.exception("cannot export task %s's timeline", task_id)

    def close(self) -> None:
        """Exports what is queued, then flushes and stops the SDK."""
        self._ended.put(None)
        self._thread.join()
        self._provider.shutdown()


def spans_of(tracer: Any, timeline: list[dict[str, Any]]) -> None:
    """Records `timeline` (one task's entries) as spans with `tracer`."""
    if not timeline:
        return
    first = timeline[0]
    states = [e for e in timeline if e["kind"] == "state"]
    end = states[-1] if states else timeline[-1]
    root = tracer.start_span(
        "invoke_agent",
        kind=SpanKind.INTERNAL,
        start_time=_ns(first["time"]),
        attributes={
            gen_ai.GEN_AI_OPERATION_NAME: "invoke_agent",
            gen_ai.GEN_AI_AGENT_ID: first["task"],
            "agentnode.task.id": first["task"],
            "agentnode.tenant": first.get("tenant", ""),
        },
    )
    ctx = set_span_in_context(root)
    for e in timeline:
        kind = e["kind"]
        if kind == "llm_call":
            _chat(tracer, ctx, e)
        elif kind == "tool_call":
            _tool(tracer, ctx, e)
        elif kind == "state":
            root.add_event(f"state {e['state']}", {"attempt": e["attempt"]}, _ns(e["time"]))
        elif kind in _EVENTS:
            root.add_event(kind, _event_attributes(e), _ns(e["time"]))
    if end.get("state") in _FAILED:
        root.set_status(Status(StatusCode.ERROR, end.get("reason") or end["state"]))
        root.set_attribute("error.type", end["state"])
    root.end(end_time=_ns(end["time"]))


def _chat(tracer: Any, ctx: Any, e: dict[str, Any]) -> None:
    finished = _ns(e["time"])
    writes = e["cache_write"] + e.get("cache_write_1h", 0)  # both TTLs (older rows: 5 min only)
    attributes: dict[str, Any] = {
        gen_ai.GEN_AI_OPERATION_NAME: "chat",
        gen_ai.GEN_AI_REQUEST_MODEL: e["model"],
        gen_ai.GEN_AI_USAGE_INPUT_TOKENS: e["input"] + e["cached_input"] + writes,
        gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: e["output"] + e["reasoning"],
        gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: e["cached_input"],
        gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: writes,
        gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: e["reasoning"],
        "agentnode.cost_usd": e["cost"],
        "agentnode.endpoint": e["endpoint"],
        "agentnode.cache_hit": e["cache_hit"],
        "http.response.status_code": e["status"],
    }
    if e.get("deployment"):
        attributes["agentnode.deployment"] = e["deployment"]
    span = tracer.start_span(
        f"chat {e['model']}",
        context=ctx,
        kind=SpanKind.CLIENT,
        start_time=finished - int(e["latency_ms"] * 1_000_000),
        attributes=attributes,
    )
    if e["status"] >= 400:
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", str(e["status"]))
    span.end(end_time=finished)


def _tool(tracer: Any, ctx: Any, e: dict[str, Any]) -> None:
    finished = _ns(e["time"])
    name = str(e.get("tool", "unknown"))
    span = tracer.start_span(
        f"execute_tool {name}",
        context=ctx,
        kind=SpanKind.INTERNAL,
        start_time=finished - int(float(e.get("duration_ms") or 0) * 1_000_000),
        attributes={
            gen_ai.GEN_AI_OPERATION_NAME: "execute_tool",
            gen_ai.GEN_AI_TOOL_NAME: name,
            "agentnode.tool.class": str(e.get("class", "")),
        },
    )
    if e.get("class") not in (None, "ok"):
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", str(e["class"]))
    span.end(end_time=finished)


def _event_attributes(e: dict[str, Any]) -> dict[str, Any]:
    skip = {"seq", "time", "kind", "task", "tenant"}
    out: dict[str, Any] = {}
    for k, v in e.items():
        if k in skip or v is None:
            continue
        out[k] = v if isinstance(v, str | int | float | bool) else [str(x) for x in v]
    return out
