"""The task's spend as the proxy tells it with each model answer (`agentnode.inference.spend`),
read off the SDK client's HTTP transport: a whole answer's header, or the comment in a stream,
which the SDK's own parser skips. So the budget check before a model call costs no request."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx2

from agentnode.inference.spend import SPEND_HEADER, StreamSpend, parse

__all__ = ["SpendTap"]


class SpendTap(httpx2.HTTPTransport):
    """An SDK client's transport (keyword options as `httpx2.HTTPTransport`'s) that notes the
    spend the proxy told with the last answer: `spent` is None until that answer has told it
    (a stream tells it at its end), and when it told none (a proxy that does not, or a call
    billed to no task)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.spent: Decimal | None = None

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        # Forgotten first: an answer that tells nothing must not leave an older figure.
        self.spent = None
        response = super().handle_request(request)
        told = response.headers.get(SPEND_HEADER)
        if told is not None:
            self.spent = parse(told)
            return response
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        assert isinstance(response.stream, httpx2.SyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tapped(response.stream, self),
            extensions=response.extensions,
        )


class _Tapped(httpx2.SyncByteStream):
    """A stream's bytes, passed on unchanged, its spend comment noted on the tap."""

    def __init__(self, stream: httpx2.SyncByteStream, tap: SpendTap) -> None:
        self._stream = stream
        self._tap = tap
        self._reader = StreamSpend()

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._reader.feed(chunk)
            if self._reader.spent is not None:
                self._tap.spent = self._reader.spent
            yield chunk

    def close(self) -> None:
        self._stream.close()
