"""Timeline entries as one human line each (`agentnode timeline` without --json)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from agentnode.terminal import visible

__all__ = ["spend", "summary"]


def spend(entries: Iterable[dict[str, Any]]) -> tuple[int, Decimal]:
    """How many model calls timeline `entries` hold, and what they cost (US dollars)."""
    costs = [Decimal(e["cost"]) for e in entries if e["kind"] == "llm_call"]
    return len(costs), sum(costs, Decimal(0))


def summary(entry: dict[str, Any]) -> str:
    """One human line for a timeline entry: time, kind and what matters about it."""
    stamp = time.strftime("%H:%M:%S", time.localtime(entry["time"]))
    stamp += f".{int(entry['time'] * 1000) % 1000:03d}"
    kind = entry["kind"]
    detail = _DETAIL.get(kind, _generic)(entry)
    # A task's argv, a tool's name: one entry stays one line, whatever they hold.
    return visible(f"{stamp}  {kind:<13} {detail}")


def _generic(e: dict[str, Any]) -> str:
    skip = {"seq", "time", "kind", "task", "tenant"}
    return " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)


def _state(e: dict[str, Any]) -> str:
    reason = f" ({e['reason']})" if e.get("reason") else ""
    return f"{e['state']} attempt {e['attempt']}{reason}"


def _exec(e: dict[str, Any]) -> str:
    argv = " ".join(e["argv"]) + (" …" if e.get("argv_truncated") else "")
    return f"pid {e['pid']} (parent {e['ppid']}, uid {e['uid']}) {e['filename']}: {argv}"


def _denied(e: dict[str, Any]) -> str:
    by = f", tool {e['tool']}" if e.get("tool") else ""
    return f"{e['protocol']} {e['address']} port {e['port']} ({e['reason']}, pid {e['pid']}{by})"


def _llm(e: dict[str, Any]) -> str:
    tokens = ", ".join(
        f"{b} {e[b]}"
        for b in ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")
        if e.get(b)
    )
    hit = ", cache hit" if e.get("cache_hit") else ""
    return (
        f"{e['endpoint']} {e['model']} -> {e['status']}: {tokens or 'no tokens'}; "
        f"${e['cost']}; {e['latency_ms']:g} ms{hit}"
    )


def _tool(e: dict[str, Any]) -> str:
    return f"{e.get('tool')} -> {e.get('class')} in {e.get('duration_ms')} ms"


_DETAIL: dict[str, Callable[[dict[str, Any]], str]] = {
    "state": _state,
    "exec": _exec,
    "egress_denied": _denied,
    "llm_call": _llm,
    "tool_call": _tool,
}
