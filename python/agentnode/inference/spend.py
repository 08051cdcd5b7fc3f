"""What a task has spent, told with every answer it gets from the proxy, so a budgeted agent
needs no round trip to `GET /v1/usage` before each model call.

A call billed to a task carries the task's spend so far, this call included (US dollars, the
ledger's exact decimal, every attempt of the task): as the `x-agentnode-spend` header of a
whole answer, and in a stream (whose headers leave before its usage is known) as an SSE
comment line, `: x-agentnode-spend 0.00123`, sent just before the stream's last event. SSE
clients skip comment lines, so the SDKs see the provider's stream unchanged. Only the calling
task's own spend is told, never its tenant's or another task's; a call billed to no task (a
tenant's key) gets neither.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = ["SPEND_HEADER", "StreamSpend", "comment", "parse"]

#: The header of a whole answer.
SPEND_HEADER = "x-agentnode-spend"
_COMMENT = b": " + SPEND_HEADER.encode() + b" "
# The longest comment line a reader looks for across chunk boundaries (a Decimal's digits).
_LONGEST = len(_COMMENT) + 64


def comment(spent: Decimal) -> bytes:
    """The SSE comment block telling `spent` (a block of its own: it dispatches no event)."""
    return _COMMENT + str(spent).encode() + b"\n\n"


def parse(text: str | bytes) -> Decimal | None:
    """The amount a header or comment tells; None when it is not a finite amount >= 0."""
    try:
        value = Decimal(text.decode("ascii") if isinstance(text, bytes) else text)
    except (InvalidOperation, UnicodeDecodeError, ValueError):
        return None
    return value if value.is_finite() and value >= 0 else None


class StreamSpend:
    """Finds the spend comment in a stream's bytes as they pass, whatever their chunking."""

    __slots__ = ("_tail", "spent")

    def __init__(self) -> None:
        self._tail = b""
        #: The last amount the stream told, or None.
        self.spent: Decimal | None = None

    def feed(self, chunk: bytes) -> None:
        """Looks at the next bytes of the stream."""
        data = self._tail + chunk
        start = data.rfind(_COMMENT)
        if start >= 0:
            end = data.find(b"\n", start)
            if end < 0 and len(data) - start <= _LONGEST:
                # The line goes on in the next chunk: keep it whole for then.
                self._tail = data[start:]
                return
            told = parse(data[start + len(_COMMENT) : end].strip()) if end >= 0 else None
            if told is not None:
                self.spent = told
        self._tail = data[-_LONGEST:]
