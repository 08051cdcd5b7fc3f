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
        if self._kind == "anthropic":
            # Anthropic's SDK reads an event's kind from its `event:` line, and so does this:
            # the same words inside a text or tool-input delta end nothing.
            name = _name(event)
            self.done = name == b"message_stop"
            if name == b"message_start":
                self._anthropic.update((_data(event).get("message") or {}).get("usage") or {})
            elif name == b"message_delta":
                self._anthropic.update(_data(event).get("usage") or {})
            return event
        if self._responses:
            # A Responses stream ends in one of three events, each with the response's usage
            # (an incomplete or failed response is billed too). The text events before it
            # repeat the whole text, so only the event's name can tell.
            if _response_type(event) in _RESPONSE_ENDS:
                self.done = True
                self._openai = (_data(event).get("response") or {}).get("usage")
            return event
        self.done = event.rstrip().endswith(b"data: [DONE]")
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


_RESPONSE_ENDS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


def _name(event: bytes) -> bytes | None:
    """The event's `event:` field, found at the start of a line (a data line's JSON holds no
    raw newline, so never inside one); None when the event has none."""
    if event.startswith(b"event:"):
        start = 6
    else:
        start = event.find(b"\nevent:")
        if start < 0:
            return None
        start += 7
    return event[start : event.index(b"\n", start)].strip()


def _response_type(event: bytes) -> bytes | None:
    """A Responses stream event's kind: its `event:` line, or the `type` of its data for a
    server that sends data lines only."""
    name = _name(event)
    if name is not None:
        return name
    kind = _data(event).get("type")
    return kind.encode() if isinstance(kind, str) else None


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
