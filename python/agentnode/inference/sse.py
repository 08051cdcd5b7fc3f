"""Server-sent events through the proxy: whole events as the upstream sends them, the usage
they report (OpenAI's chat, completions and Responses streams, Anthropic's messages), and the
response that carries them to the client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from agentnode.inference.pricing import Usage, anthropic_usage, openai_usage

__all__ = ["EventStream", "UsageReader", "sse_events"]


class EventStream(web.StreamResponse):
    """An SSE response whose headers leave with its first event, in one packet: it is only
    prepared once that event is in hand, so sending the headers alone would just cost the
    client an extra wakeup before its first token. (aiohttp ≥ 3.12 reads this flag.)"""

    _send_headers_immediately = False


class UsageReader:
    """Reads usage out of SSE events and decides what the client sees."""

    __slots__ = ("_anthropic", "_kind", "_openai", "_responses", "_strip", "done")

    def __init__(self, kind: str, endpoint: str, wants_usage: bool) -> None:
        self._kind = kind
        self._responses = endpoint == "responses"
        self._strip = endpoint in ("chat", "completions") and not wants_usage
        self._anthropic: dict[str, Any] = {}
        self._openai: Any = None
        #: The stream's last event has been fed: what the upstream does after it is moot.
        self.done = False

    def feed(self, event: bytes) -> bytes | None:
        """Takes one whole event; returns what the client is sent of it (None: nothing)."""
        self.done = _is_last(event)
        if self._kind == "anthropic":
            if b"message_start" in event or b"message_delta" in event:
                obj = _data(event)
                if obj.get("type") == "message_start":
                    self._anthropic.update(obj.get("message", {}).get("usage") or {})
                elif obj.get("type") == "message_delta":
                    self._anthropic.update(obj.get("usage") or {})
            return event
        if self._responses:
            if b"response.completed" in event:
                self._openai = _data(event).get("response", {}).get("usage")
            return event
        # With include_usage every chunk carries `"usage":null`: no need to parse those. The
        # bytes `"usage":null` cannot occur inside a JSON string (its quotes would be escaped),
        # and a single `"usage"` means no other usage object hides elsewhere in the chunk.
        n = event.count(b'"usage"')
        if n == 0 or (n == 1 and (b'"usage":null' in event or b'"usage": null' in event)):
            return event
        obj = _data(event)
        if obj.get("usage"):
            self._openai = obj["usage"]
            if self._strip:
                if not obj.get("choices"):
                    return None  # The usage-only chunk the client did not ask for.
                del obj["usage"]
                return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        return event

    def usage(self) -> Usage:
        """The usage the events fed so far reported."""
        if self._kind == "anthropic":
            return anthropic_usage(self._anthropic)
        return openai_usage(self._openai)


def _is_last(event: bytes) -> bool:
    """Whether `event` ends its stream: OpenAI's [DONE], Anthropic's message_stop, or the
    Responses API's response.completed."""
    return (
        event.rstrip().endswith(b"data: [DONE]")
        or b"event: message_stop" in event
        or b"event: response.completed" in event
    )


def _data(event: bytes) -> dict[str, Any]:
    """The JSON of an SSE event's data lines ({} when there is none); ValueError on garbage."""
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines or lines == [b"[DONE]"]:
        return {}
    obj = json.loads(b"\n".join(lines))
    if not isinstance(obj, dict):
        raise ValueError("an SSE event's data is not a JSON object")
    return obj


async def sse_events(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Whole SSE events (each ending in a blank line) as they arrive, never re-chunked."""
    buf = b""
    async for chunk in upstream.content.iter_any():
        buf += chunk
        if b"\r" in buf:  # CRLF framing, on buf so a CR/LF pair split across chunks joins
            buf = buf.replace(b"\r\n", b"\n")
        while (i := buf.find(b"\n\n")) >= 0:
            yield buf[: i + 2]
            buf = buf[i + 2 :]
    if buf.strip():
        raise ValueError("the upstream stream ended inside an event")
