"""Schemathesis hooks for the fuzz runs (loaded through `SCHEMATHESIS_HOOKS`).

aiohttp's HTTP parser answers a request line or header field over its 8,190-byte limit with
a text/plain 400 before any application code sees the request (like nginx's 414 page): that is
the transport's limit, not the API's contract, so generated queries and headers that would
cross it are dropped rather than failing the JSON-error checks at random."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import schemathesis

#: Well below aiohttp's 8,190 bytes, leaving room for the path and percent-encoding.
LIMIT = 4096


@schemathesis.hook
def filter_query(context: Any, query: dict[str, Any] | None) -> bool:
    return query is None or len(urlencode(query, doseq=True)) <= LIMIT


@schemathesis.hook
def filter_headers(context: Any, headers: dict[str, Any] | None) -> bool:
    return headers is None or all(len(str(v)) <= LIMIT for v in headers.values())
