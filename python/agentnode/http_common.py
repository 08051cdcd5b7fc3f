"""What the node's HTTP servers share: how a handler reads a request (yes/no query flags, JSON
bodies: each problem a ValueError whose message says what is wrong, for the handler to answer
as a 400 or 413 in its own format), how it streams to a client that may leave at any time, and
how the servers log a request that is not HTTP at all."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agentnode.peercap import PeerCap, capped

__all__ = [
    "FLAG_VALUES",
    "SERVER_LOG",
    "BodyTooLarge",
    "CappedSockSite",
    "flag",
    "json_body",
    "until_client_leaves",
]

#: What a yes/no parameter (`all`, `follow`) may be; absent or empty is no.
FLAG_VALUES = ("1", "true", "0", "false")


class BodyTooLarge(ValueError):
    """The body is over the application's `client_max_size`: a 413."""


def flag(query: Mapping[str, str], name: str) -> bool:
    """The yes/no parameter `name` of `query`; ValueError for any other value (a typo such as
    `follow=yes` must not silently mean no)."""
    value = query.get(name, "")
    if value not in ("", *FLAG_VALUES):
        raise ValueError(f"must be 1, true, 0 or false, got {value[:40]!r}")
    return value in ("1", "true")


async def json_body(request: web.Request) -> Any:
    """The request's JSON body; a body nested too deeply to parse is refused, not a 500.
    (NaN and Infinity parse: the field's own check names the field.)"""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise BodyTooLarge(f"request body is too large ({(e.text or '').rstrip('.')})") from None
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"is not valid JSON ({e})") from None
    except ValueError:  # int() refuses a number of over 4,300 digits
        raise ValueError("is not valid JSON (a number of over 4,300 digits)") from None
    _check_unicode(body)
    return body


def _check_unicode(body: Any) -> None:
    """ValueError for a string holding a lone surrogate (JSON lets `"\\udc80"` through): no
    record, argv or file can hold it, so it is refused here rather than failing further in."""
    todo = [body]
    while todo:  # a loop, not recursion: the body may be as deep as json.loads allows
        item = todo.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    raise ValueError(
                        f"holds a string that is not valid Unicode (a lone surrogate): {item[:40]!r}"
                    ) from None
        elif isinstance(item, dict):
            todo.extend(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)


def until_client_leaves(
    stream: Callable[[web.Request, web.StreamResponse], Awaitable[None]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A streaming handler, given its prepared response, whose client may leave at any time:
    that ends it quietly (a `logs -f`, `timeline?follow=1` or `events` client that disconnects
    is normal, not an error to log)."""

    @functools.wraps(stream)
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        try:
            await stream(request, resp)
            await resp.write_eof()
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            pass
        return resp

    return handler


class _MalformedRequests(logging.Filter):
    """A request that is not valid HTTP (a NUL in a header, a bad request line) is the
    client's mistake, answered 400 by aiohttp: one warning line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = (exc.message.strip().splitlines() or [""])[0].rstrip(":")
            record.msg = "refused a malformed HTTP request from %s: %s"
            record.args = (*(record.args or ()), reason)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


#: The logger to give the node's aiohttp servers (`AppRunner(logger=...)`).
SERVER_LOG = logging.getLogger("agentnode.http")
SERVER_LOG.addFilter(_MalformedRequests())


class CappedSockSite(web.SockSite):
    """A site on a listening socket whose connections go through `cap` (a door into tasks:
    at most `peercap.MAX_PER_TASK` from one task)."""

    def __init__(self, runner: web.BaseRunner, sock: Any, cap: PeerCap) -> None:
        super().__init__(runner, sock)
        self._cap = cap

    async def start(self) -> None:
        """Starts serving (web.SockSite.start with each protocol behind the cap)."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            capped(server, self._cap), sock=self._sock, backlog=self._backlog
        )
