"""Error responses in each provider's own wire format, so client SDKs raise their usual errors."""

from __future__ import annotations

import json
import math

from aiohttp import web

__all__ = ["error_event", "error_response"]

# Anthropic names its error types by status; OpenAI's SDKs read only `message` and `type`.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}


def _body(fmt: str, status: int, message: str, code: str) -> dict[str, object]:
    if fmt == "anthropic":
        return {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        }
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(
    fmt: str,
    status: int,
    message: str,
    *,
    code: str,
    retry_after: float | None = None,
    retried: bool = False,
) -> web.Response:
    """A JSON error response; `retry_after` (seconds) becomes a Retry-After header. `retried`:
    the proxy tried every upstream it could as often as it may, so the SDKs, which read
    `x-should-retry`, do not multiply its tries by theirs."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if retried:
        headers["x-should-retry"] = "false"
    return web.json_response(_body(fmt, status, message, code), status=status, headers=headers)


def error_event(fmt: str, message: str) -> bytes:
    """An SSE error event for a stream that already started (its status line is long gone)."""
    data = json.dumps(_body(fmt, 502, message, "upstream_error"))
    if fmt == "anthropic":
        return f"event: error\ndata: {data}\n\n".encode()
    return f"data: {data}\n\n".encode()
