"""MCP servers declared in the node config (`[tools.mcp.NAME]`), each run by the node in its
own Layer 1 sandbox with its own egress policy and limits: started on first use, one instance
per tenant (never shared across tenants), stopped when idle, started again after a crash.

The node speaks MCP to a server with the `mcp` SDK, never framing JSON-RPC itself:
- a stdio server (`command`): the SDK's stdio transport (`stdio_server`'s framing, the same in
  both directions) on the sandbox's pipes, the handshake era (`initialize`) negotiated by the
  SDK client. A `tools/call` is passed through rather than sent through the SDK session: the
  request is one `JSONRPCRequest` (the SDK's type) under a node-side id written to the
  server's stdin, and its response is taken off the server's stdout by that id before the
  session would see it, then checked against the protocol by the SDK (`validate_server_result`)
  as the session does. Everything else (the handshake, `tools/list`, the server's own
  requests and notifications) goes through the session;
- a streamable-HTTP server the node runs (`command` and `url`): it listens on the loopback of
  its sandbox's own network namespace, and the SDK's streamable HTTP client reaches it there
  with sockets the node opens inside that namespace (so the server needs no network at all);
- a streamable-HTTP server a user runs (`url` only, on the node's loopback): the node only
  connects, one client per tenant; it cannot sandbox what it does not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import itertools
import logging
import os
import re
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpcore2
import httpx2
import mcp_types as types
from httpcore2._backends.anyio import AnyIOStream  # httpcore's own wrapper, not re-exported
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED
from mcp_types import methods as protocol
from pydantic import RootModel, ValidationError

from agentnode.egress.enforce import Denial
from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.errors import AgentnodeError, UsageError
from agentnode.isolation import task as isolation
from agentnode.isolation.spec import Mount
from agentnode.tools.lines import (
    MAX_MESSAGE,
    STALL_S,
    FdLines,
    FdWriter,
    LineTooLong,
    client_streams,
    write_message,
)
from agentnode.tools.registry import Caller, RetryPolicy, Tool, ToolLimits
from agentnode.tools.result import Outcome, ToolClass
from agentnode.tools.sandboxed import SPAWNER, owned_workspace, sandbox_limits

__all__ = ["SEPARATOR", "SERVER_LIMITS", "MCPServerSpec", "MCPServers"]

log = logging.getLogger("agentnode.tools.mcp")

#: A server's tool `t` of server `s` is offered as `s__t` (names clients accept everywhere).
SEPARATOR = "__"
#: What a server's name may be: part of its tools' names and of its workspaces' paths.
_SERVER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A server's default sandbox: the SDKs' interpreters need more memory than one code run.
SERVER_LIMITS = ToolLimits(memory=512 << 20, pids=128, timeout=60.0)


#: Seconds a server that could not list its tools is taken to have none before it is tried
#: again: each listing of a tenant's tools (every agent's start) would wait its whole timeout.
UNLISTED_S = 30.0
#: Seconds a listing of every server waits for one that is slow to start or to answer: past
#: that it lists the others (the slow one's listing goes on, for the next to have).
LISTING_WAIT_S = 15.0
#: Passed-through calls' ids: strings no integer parses as, never one of the SDK session's.
_ID_PREFIX = "agentnode-"


class _RawResult(RootModel[dict[str, Any]]):
    """A server's `tools/call` result as the SDK checked it against the protocol, left a dict:
    the node passes it on (plus `_meta.agentnode`), so building `CallToolResult` to dump it
    again, and checking `structuredContent` against the output schema (the task's own client
    does), were work per call for nothing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MCPServerSpec:
    """One declared server: the command run in its sandbox and what that sandbox may do."""

    name: str
    #: The program run in its sandbox (empty: a server a user runs at `url`).
    command: tuple[str, ...] = ()
    #: Where it serves streamable HTTP (http on loopback): in its sandbox when `command` is
    #: set, else on the node's own loopback. None: it speaks stdio.
    url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    network: str = "none"
    egress: EgressPolicy | None = None
    limits: ToolLimits = SERVER_LIMITS
    mounts: tuple[Mount, ...] = ()
    cwd: str = "/workspace"
    #: The user it runs as inside its sandbox ("UID[:GID]"); no capabilities either way.
    user: str = "65534"
    idle_s: float = 300.0
    tenants: frozenset[str] | None = None
    #: Its tools may be retried on a transient failure without an idempotency key.
    idempotent: bool = False

    def __post_init__(self) -> None:
        if not self.command and self.url is None:
            raise UsageError(
                f"tools.mcp.{self.name}: give a command to run, a url to connect to, or both"
            )
        if self.url is not None:
            _check_loopback_url(f"tools.mcp.{self.name}.url", self.url)
        if SEPARATOR in self.name:
            raise UsageError(f"tools.mcp.{self.name}: a server name may not hold {SEPARATOR!r}")
        if not _SERVER_NAME.fullmatch(self.name) or self.name in (".", ".."):
            raise UsageError(f"tools.mcp.{self.name!r}: a server name is 1-64 letters, digits, "
                             "'_', '.' and '-'")  # fmt: skip


def _check_loopback_url(option: str, url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise UsageError(
            f"{option}: give http://127.0.0.1:PORT/PATH (streamable HTTP on loopback), got {url!r}"
        )


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _socket_in(netns: int, family: int) -> socket.socket:
    """A TCP socket made inside the network namespace open at fd `netns` (a socket keeps the
    namespace it was made in): setns is per thread, so a short-lived thread enters it and is
    thrown away."""
    made: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            if _libc.setns(netns, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot enter the server's network namespace")
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as e:
            made.append(e)

    thread = threading.Thread(target=run, name="agentnode-mcp-netns")
    thread.start()
    thread.join()
    (out,) = made
    if isinstance(out, BaseException):
        raise out
    return out


class _NetnsBackend(httpcore2.AsyncNetworkBackend):
    """httpcore's network backend whose TCP connections are made in a sandbox's network
    namespace: the node reaches a server on the sandbox's own loopback."""

    def __init__(self, netns: int) -> None:
        self._netns = netns

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.AsyncNetworkStream:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(SPAWNER, _socket_in, self._netns, family)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BaseException:
                sock.close()
                raise
        except (OSError, TimeoutError) as e:
            raise httpcore2.ConnectError(str(e)) from e
        return AnyIOStream(await anyio.abc.SocketStream.from_socket(sock))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("an MCP server in a sandbox is reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class _CappedTransport(httpx2.AsyncBaseTransport):
    """`inner` whose responses end in an error past `MAX_MESSAGE` bytes of one message, told
    first to `over`: the SDK holds a JSON answer, or an event of an SSE stream, whole (a
    stream itself may run on for good)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, over: Callable[[LineTooLong], None]):
        self._inner = inner
        self._over = over

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        events = response.headers.get("content-type", "").startswith("text/event-stream")
        response.stream = _CappedStream(response.stream, self._over, events=events)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


#: Where an SSE event ends: a line's end (CRLF, LF or CR) right after another's.
_EVENT_END = re.compile(rb"\n\n|\n\r|\r\r")


class _CappedStream(httpx2.AsyncByteStream):
    """A response body cut past `MAX_MESSAGE` bytes: all of it, or with `events` (an SSE
    stream) those since the last event's end."""

    def __init__(
        self,
        inner: httpx2.AsyncByteStream,
        over: Callable[[LineTooLong], None],
        *,
        events: bool = False,
    ) -> None:
        self._inner = inner
        self._over = over
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0  # of the message under way
        last = b""  # the chunk before's last byte: an event's end may straddle two chunks
        async for chunk in self._inner:
            if not self._events:
                seen += len(chunk)
                self._check(seen)
            elif chunk:
                window, at = last + chunk, len(last)
                for end in _EVENT_END.finditer(window):
                    self._check(seen + end.end() - at)
                    seen, at = 0, end.end()
                seen += len(window) - at
                self._check(seen)
                last = chunk[-1:]
            yield chunk

    def _check(self, size: int) -> None:
        if size > MAX_MESSAGE:
            what = "an event" if self._events else "a response"
            error = LineTooLong(f"{what} longer than {MAX_MESSAGE} bytes")
            self._over(error)
            raise httpx2.ReadError(str(error))

    async def aclose(self) -> None:
        await self._inner.aclose()


class _NetnsTransport(httpx2.AsyncHTTPTransport):
    """httpx's own transport with its connection pool's backend swapped for `_NetnsBackend`
    (httpx takes no backend of its own; the pool does)."""

    def __init__(self, netns: int) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore2.AsyncConnectionPool(network_backend=_NetnsBackend(netns))


def _where(e: ValidationError) -> str:
    loc = e.errors()[0]["loc"] if e.errors() else ()
    return ".".join(str(p) for p in loc) or "the top"


def _leaf(e: BaseException) -> BaseException:
    """The first error inside task-group wrappers (the SDK's transports run in task groups)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


class _Instance:
    """One running server for one tenant: its sandbox (none for a server a user runs) and the
    MCP client connected to it."""

    def __init__(self, spec: MCPServerSpec, tenant: str) -> None:
        self.spec = spec
        self.tenant = tenant
        self.proc: isolation.Task | None = None
        self.client: Client | None = None
        self.denials: list[Denial] = []
        self.last_used = time.monotonic()
        self.busy = 0
        #: `(cpu_s, memory_peak)` read as the last call ended with no other in flight: the
        #: next call's starting point (an idle stdio server uses no CPU between calls), one
        #: cgroup read per call instead of two.
        self.usage_mark: tuple[float, int] | None = None
        self._stop = asyncio.Event()
        #: The server's network namespace (an HTTP server the node runs), held open.
        self._netns = -1
        #: `stop` was called: the client's errors from here on are the stop's own doing.
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        #: Done when the server is gone: its sandbox reaped (a crash, a kill at its limits, or
        #: `stop`), or, for a server a user runs, the connection to it broken or stopped.
        self.exited: asyncio.Future[Any] | None = None
        #: A stdio server's stdin, where passed-through calls are written (None: HTTP).
        self._stdin: FdWriter | None = None
        #: Passed-through calls waiting for their response, by their node-side id.
        self._pending: dict[types.RequestId, asyncio.Future[types.JSONRPCMessage]] = {}
        self._ids = itertools.count(1)

    @property
    def alive(self) -> bool:
        return self.client is not None and self.exited is not None and not self.exited.done()

    def _spawn(self, network: EgressService | None) -> isolation.Task:
        spec = self.spec
        # A directory per server, one per tenant in it: `NAME-TENANT` made `fs` of tenant
        # `a-b` and `fs-a` of tenant `b` one directory.
        ws = owned_workspace(isolation.DATA_DIR / "mcp" / spec.name / self.tenant, spec.user)
        stdio = spec.url is None
        return isolation.spawn(
            list(spec.command),
            limits=sandbox_limits(spec.limits, timeout=False),
            env=dict(spec.env),
            network=spec.network,
            egress=spec.egress if spec.network in ("egress", "host") else None,
            node_network=network,
            on_denial=self.denials.append if spec.network in ("egress", "host") else None,
            mounts=spec.mounts,
            cwd=spec.cwd,
            user=spec.user,
            workspace=ws,
            stdin="pipe" if stdio else "null",
            stdout="pipe" if stdio else "null",
            stderr="null",
        )

    async def start(self, network: EgressService | None) -> None:
        loop = asyncio.get_running_loop()
        if self.spec.command:
            self.proc = await loop.run_in_executor(SPAWNER, self._spawn, network)
            self.exited = loop.create_task(self.proc.wait_async())
            self.exited.add_done_callback(self._gone)
            if self.spec.url is not None:
                # Held, not reopened by pid: the namespace stays this server's even after it
                # dies and its pid is reused. Opened before the reaper task first runs (a
                # zombie has no namespaces: the open fails rather than naming another's).
                try:
                    self._netns = os.open(
                        f"/proc/{self.proc.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC
                    )
                except OSError as e:
                    await self.stop()
                    raise ConnectionError(f"the server exited at once ({e.strerror})") from None
        else:
            self.exited = loop.create_future()
        ready: asyncio.Future[None] = loop.create_future()
        self._runner = loop.create_task(self._run(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.spec.limits.timeout)
        except BaseException as e:
            await self.stop()
            if ready.done() and not ready.cancelled():
                ready.exception()  # retrieved: its end is this error's, not a stray one
            if isinstance(e, TimeoutError):
                raise ConnectionError(
                    f"it did not answer MCP's initialize within {self.spec.limits.timeout:g} s"
                ) from None
            raise

    @contextlib.asynccontextmanager
    async def _transport(self) -> AsyncIterator[TransportStreams]:
        if self.spec.url is not None:
            async with self._http() as streams:
                yield streams
            return
        assert self.proc is not None and self.proc.stdout is not None
        assert self.proc.stdin is not None
        # The server's stdout is what we read; its stdin is what we write.
        reader = FdLines(self.proc.stdout.fileno(), limit=MAX_MESSAGE)
        self._stdin = FdWriter(
            self.proc.stdin.fileno(),
            stall_s=STALL_S,
            on_stall=lambda: self._broke(f"it read none of its stdin for {STALL_S:g} s"),
        )
        try:
            async with client_streams(
                reader, self._stdin, route=self._answered, on_too_long=self._broke
            ) as streams:
                yield streams
        finally:
            reader.close()

    def _broke(self, why: object) -> None:
        """The server broke what the node needs of a peer (a message past the node's bound, on
        its stdout or over HTTP: its memory limit does not bound what the node would hold for
        it; or it reads none of its stdin): it is stopped, or a user's server's connection
        ended, and its calls end as that ends them."""
        log.warning("MCP server %s (%s) stopped: %s", self.spec.name, self.tenant, why)
        if self.proc is not None and self.proc.result is None:
            with contextlib.suppress(AgentnodeError, ProcessLookupError):
                self.proc.signal(signal.SIGKILL)
        elif self.proc is None and self.exited is not None and not self.exited.done():
            self.exited.set_result(None)

    def _answered(self, message: types.JSONRPCMessage) -> bool:
        """Takes the response to a passed-through call off the session's way (a late one, to
        a call given up, is dropped: the session never sent it)."""
        if isinstance(message, types.JSONRPCResponse | types.JSONRPCError):
            waiting = self._pending.pop(message.id, None) if message.id is not None else None
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
            return waiting is not None or (
                isinstance(message.id, str) and message.id.startswith(_ID_PREFIX)
            )
        return False

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The server's `tools/call` result for tool `name`, as a dict the SDK checked against
        the protocol; raises `MCPError` for an error response (and what the session raises
        for a broken connection). A stdio server's call is passed through (module docstring);
        cancelled, it is cancelled at the server too."""
        assert self.client is not None and self.exited is not None
        if self._stdin is None:
            return await self._session_call(name, arguments)
        if self.exited.done():
            raise ConnectionError("the server exited")
        rid = f"{_ID_PREFIX}{next(self._ids)}"
        answer: asyncio.Future[types.JSONRPCMessage] = asyncio.get_running_loop().create_future()
        self._pending[rid] = answer
        params = {"name": name, "arguments": arguments}
        try:
            await write_message(
                self._stdin,
                types.JSONRPCRequest(jsonrpc="2.0", id=rid, method="tools/call", params=params),
            )
            message = await answer
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None:
                cancel = types.CancelledNotificationParams(
                    request_id=rid, reason="caller cancelled"
                )
                with contextlib.suppress(OSError):
                    await write_message(self._stdin, types.JSONRPCNotification(
                        jsonrpc="2.0", method="notifications/cancelled",
                        params=cancel.model_dump(by_alias=True, exclude_none=True),
                    ))  # fmt: skip
            raise
        except OSError as e:  # its stdin closed: it is exiting
            self._pending.pop(rid, None)
            raise ConnectionError(f"the server's stdin is closed ({e.strerror})") from None
        if isinstance(message, types.JSONRPCError):
            raise MCPError.from_error_data(message.error)
        assert isinstance(message, types.JSONRPCResponse)
        # As the session does: a version without a surface for the method is not checked.
        with contextlib.suppress(KeyError):
            protocol.validate_server_result(
                "tools/call", self.client.protocol_version, message.result
            )
        return message.result

    def _gone(self, exited: asyncio.Future[Any]) -> None:
        """The server exited: the calls passed through to it get no answer but this."""
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            if not answer.done():
                answer.set_exception(ConnectionError("the server exited"))

    async def _session_call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """`call_tool` through the SDK session (an HTTP server), ended by the server's exit."""
        assert self.client is not None and self.exited is not None
        request = types.CallToolRequest(
            params=types.CallToolRequestParams(name=name, arguments=arguments)
        )
        call = asyncio.ensure_future(self.client.session.send_request(request, _RawResult))
        try:
            await asyncio.wait({call, self.exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # cancelled (the SDK then cancels it at the server), or the server is gone
            if not call.done():
                call.cancel()
                with contextlib.suppress(BaseException):
                    await call
        if call.cancelled():
            raise ConnectionError("the server exited")
        return call.result().root

    @contextlib.asynccontextmanager
    async def _http(self) -> AsyncIterator[TransportStreams]:
        """The SDK's streamable HTTP client to the server's url, once it accepts connections
        (a server the node started takes a moment to listen)."""
        assert self.spec.url is not None and self.exited is not None
        transport = (
            httpx2.AsyncHTTPTransport(trust_env=False)
            if self.proc is None
            else _NetnsTransport(self._netns)
        )
        if self.proc is not None:
            await self._listening()
        timeout = httpx2.Timeout(self.spec.limits.timeout, connect=5.0)
        capped = _CappedTransport(transport, self._broke)
        async with (
            httpx2.AsyncClient(transport=capped, timeout=timeout) as http,
            streamable_http_client(self.spec.url, http_client=http) as streams,
        ):
            yield streams

    async def _listening(self) -> None:
        """Returns once the server accepts a TCP connection at its url (no request is sent:
        what a GET means differs between servers)."""
        assert self.spec.url is not None and self.exited is not None
        parts = urllib.parse.urlsplit(self.spec.url)
        backend = _NetnsBackend(self._netns)
        while True:
            try:
                stream = await backend.connect_tcp(parts.hostname or "", parts.port or 80, 1.0)
            except httpcore2.ConnectError:
                if self.exited.done():
                    raise ConnectionError("the server exited before it listened") from None
                await asyncio.sleep(0.05)
            else:
                await stream.aclose()
                return

    async def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            # stdio: the handshake era, whose requests carry no per-request envelope (so a
            # passed-through call is the same request the session would send).
            async with Client(
                self._transport(),
                read_timeout_seconds=self.spec.limits.timeout,
                cache=None,
                mode="legacy" if self.spec.url is None else "auto",
            ) as client:
                self.client = client
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as e:
            e = _leaf(e)
            if not ready.done():
                ready.set_exception(e)
            elif not isinstance(e, asyncio.CancelledError) and not self._stopping:
                log.warning("MCP server %s (%s) ended: %s", self.spec.name, self.tenant, e)
        finally:
            self.client = None
            if self.proc is None and self.exited is not None and not self.exited.done():
                self.exited.set_result(None)  # a user's server: the connection is what ended

    async def stop(self) -> None:
        """Kills the sandbox (its pipes close, so the client's reader ends), then the client."""
        self._stopping = True
        if self.proc is None and self.exited is not None and not self.exited.done():
            self.exited.set_result(None)
        if self.proc is not None and self.exited is not None:
            if self.proc.result is None:
                with contextlib.suppress(AgentnodeError, ProcessLookupError):
                    self.proc.signal(signal.SIGKILL)  # init of a pid namespace: all go
            await asyncio.shield(self.exited)
            self.proc.close()
        self._stop.set()
        if self._runner is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._runner, 5)
        if self._netns >= 0:
            os.close(self._netns)
            self._netns = -1


class MCPServers:
    """The declared servers and their running instances, keyed by (server, tenant)."""

    def __init__(
        self, specs: Sequence[MCPServerSpec], *, node_network: EgressService | None = None
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self._network = node_network
        self._instances: dict[tuple[str, str], _Instance] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: Each (server, tenant)'s tools as its instance listed them: an instance's listing
        #: may depend on its tenant's workspace, and no tenant's may name another's tools.
        self._tools: dict[tuple[str, str], list[dict[str, Any]]] = {}
        #: Listings that failed, with when they may be tried again.
        self._unlisted: dict[tuple[str, str], float] = {}
        #: Listings under way, which other listers of the same instance wait for.
        self._listing: dict[tuple[str, str], asyncio.Future[list[dict[str, Any]]]] = {}
        self._made: dict[tuple[str, str, str], Tool | None] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    def instance_pid(self, server: str, tenant: str) -> int | None:
        """The host pid of a tenant's instance of `server` (None: not running)."""
        inst = self._instances.get((server, tenant))
        return inst.proc.pid if inst is not None and inst.alive and inst.proc else None

    async def _instance(self, spec: MCPServerSpec, tenant: str) -> _Instance:
        key = (spec.name, tenant)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if self._closed:
                raise ConnectionError("the node is stopping")
            inst = self._instances.get(key)
            if inst is not None and inst.alive:
                return inst
            if inst is not None:
                await inst.stop()  # crashed: start it again
            inst = _Instance(spec, tenant)
            await inst.start(self._network)
            self._instances[key] = inst
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().create_task(self._reap())
            return inst

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for key, inst in list(self._instances.items()):
                if inst.busy == 0 and now - inst.last_used > inst.spec.idle_s:
                    del self._instances[key]
                    await inst.stop()

    async def _listed(self, spec: MCPServerSpec, tenant: str) -> list[dict[str, Any]]:
        """The tools `tenant`'s instance of the server lists (it is started the first time
        they are needed; the list is then remembered). One listing at a time per instance,
        which the others wait for; none for `UNLISTED_S` after one failed (no tools
        meanwhile)."""
        key = (spec.name, tenant)
        listed = self._tools.get(key)
        if listed is not None:
            return listed
        if time.monotonic() < self._unlisted.get(key, 0.0):
            return []
        listing = self._listing.get(key)
        if listing is None:
            listing = self._listing[key] = asyncio.ensure_future(self._list(spec, tenant))
            listing.add_done_callback(lambda _: self._listing.pop(key, None))
        return await asyncio.shield(listing)  # a lister that goes does not end it for others

    async def _listed_soon(self, spec: MCPServerSpec, tenant: str) -> list[dict[str, Any]]:
        """`_listed`, or no tools when that takes over `LISTING_WAIT_S` (it goes on)."""
        try:
            return await asyncio.wait_for(self._listed(spec, tenant), LISTING_WAIT_S)
        except TimeoutError:
            return []

    async def _list(self, spec: MCPServerSpec, tenant: str) -> list[dict[str, Any]]:
        try:
            inst = await self._instance(spec, tenant)
            assert inst.client is not None
            result = await inst.client.list_tools()
        except Exception as e:
            log.warning("MCP server %s cannot list its tools for tenant %s (tried again in %g "
                        "s): %s", spec.name, tenant, UNLISTED_S, e)  # fmt: skip
            self._unlisted[spec.name, tenant] = time.monotonic() + UNLISTED_S
            return []
        self._unlisted.pop((spec.name, tenant), None)
        listed = self._tools[spec.name, tenant] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in result.tools
        ]
        return listed

    def _allowed(self, spec: MCPServerSpec, tenant: str) -> bool:
        return spec.tenants is None or tenant in spec.tenants

    async def tools(self, tenant: str) -> list[Tool]:
        """The tools of every server `tenant` may use (the servers listed at once)."""
        specs = [spec for spec in self.specs.values() if self._allowed(spec, tenant)]
        lists = await asyncio.gather(*(self._listed_soon(spec, tenant) for spec in specs))
        made = (self._tool(spec, tenant, t) for spec, listed in zip(specs, lists, strict=True)
                for t in listed)  # fmt: skip
        return [tool for tool in made if tool is not None]

    def _server(self, name: str, tenant: str) -> tuple[MCPServerSpec, str] | None:
        server, sep, remote = name.partition(SEPARATOR)
        spec = self.specs.get(server)
        if not sep or spec is None or not self._allowed(spec, tenant):
            return None
        return spec, remote

    def _find(
        self, spec: MCPServerSpec, tenant: str, remote: str, listed: list[dict[str, Any]]
    ) -> Tool | None:
        found = next((t for t in listed if t["name"] == remote), None)
        return None if found is None else self._tool(spec, tenant, found)

    async def get(self, name: str, tenant: str) -> Tool | None:
        """Tool `server__tool`, when `tenant` may use that server (only it is started)."""
        named = self._server(name, tenant)
        if named is None:
            return None
        spec, remote = named
        return self._find(spec, tenant, remote, await self._listed(spec, tenant))

    def known(self, name: str, tenant: str) -> Tool | None:
        """Tool `server__tool` when its server's tools were listed already (none is started)."""
        named = self._server(name, tenant)
        if named is None:
            return None
        spec, remote = named
        return self._find(spec, tenant, remote, self._tools.get((spec.name, tenant), []))

    def _tool(self, spec: MCPServerSpec, tenant: str, listed: dict[str, Any]) -> Tool | None:
        """The node's tool for one `tenant`'s instance of the server listed; None (and one log
        line) for one the node cannot take, such as an invalid input schema: the server's
        other tools are served."""
        key = (spec.name, tenant, listed["name"])
        if key in self._made:
            return self._made[key]
        try:
            tool = self._make_tool(spec, listed)
        except UsageError as e:
            log.warning("MCP server %s: tool %r left out: %s", spec.name, listed["name"], e)
            tool = None
        self._made[key] = tool
        return tool

    def _make_tool(self, spec: MCPServerSpec, listed: dict[str, Any]) -> Tool:
        remote = listed["name"]

        async def run(args: dict[str, Any], caller: Caller) -> Outcome:
            return await self.call(spec, remote, args, caller)

        return Tool(
            name=f"{spec.name}{SEPARATOR}{remote}",
            description=listed.get("description", ""),
            input_schema=listed.get("inputSchema", {"type": "object"}),
            output_schema=listed.get("outputSchema"),
            run=run,
            limits=spec.limits,
            egress=spec.egress,
            idempotent=spec.idempotent,
            retry=RetryPolicy(attempts=3),
            tenants=spec.tenants,
        )

    async def call(
        self, spec: MCPServerSpec, remote: str, args: dict[str, Any], caller: Caller
    ) -> Outcome:
        try:
            inst = await self._instance(spec, caller.tenant)
        except Exception as e:
            return Outcome.error("transient", f"MCP server {spec.name} did not start: {e}")
        before = None
        if inst.proc is not None:
            before = inst.usage_mark if inst.busy == 0 and inst.usage_mark else inst.proc.usage()
        inst.usage_mark = None
        inst.busy += 1
        seen = len(inst.denials)
        try:
            # A server that dies mid-call never answers: its exit ends the call. A caller
            # that goes away (a task hung up mid-call) cancels it, at the server too, rather
            # than leave it running unowned.
            async with asyncio.timeout(spec.limits.timeout):
                result = await inst.call_tool(remote, args)
        except TimeoutError:
            await inst.stop()
            return Outcome.error(
                "timeout", f"{spec.name}: no answer in {spec.limits.timeout:g} s", retryable=True
            )
        except MCPError as e:
            if e.error.code != CONNECTION_CLOSED:
                return Outcome.error("permanent", f"{spec.name}: {e}")
            return await self._crashed(inst)
        except ValidationError as e:
            return Outcome.error("permanent", f"{spec.name}: the server's result is not a tool "
                                 f"result ({e.error_count()} problems, first at "
                                 f"{_where(e)})")  # fmt: skip
        except (ConnectionError, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return await self._crashed(inst)
        finally:
            inst.busy -= 1
            inst.last_used = time.monotonic()
        if result.get("resultType", "complete") != "complete" or "content" not in result:
            # An input_required or an extension's result: nothing a tool call can answer.
            kind = result.get("resultType", "without content")
            return Outcome.error("permanent", f"{spec.name}: the server answered with a {kind} "
                                 "result (the node passes on tool results only)")  # fmt: skip
        denials = inst.denials[seen:]
        cls: ToolClass = "ok"
        if result.get("isError") is True:
            cls = "policy" if denials else "permanent"
        out = Outcome(
            cls=cls,
            content=result["content"],
            structured=result.get("structuredContent"),
            denials=denials,
        )
        after = inst.proc.usage() if before is not None and inst.proc is not None else None
        if inst.busy == 0:
            inst.usage_mark = after
        if before is not None and after is not None:
            out.cpu_s = after[0] - before[0]
            out.memory_peak = after[1]
        out.bytes_out = sum(len(c.get("text", "")) for c in out.content)
        return out

    async def _crashed(self, inst: _Instance) -> Outcome:
        """The connection to a server broke (it exited, or stopped serving): it is stopped,
        the next call starts it again, and this call is `transient` unless the sandbox was
        killed at its memory or pids limit (`resource`)."""
        key = (inst.spec.name, inst.tenant)
        if self._instances.get(key) is inst:
            del self._instances[key]
        await inst.stop()
        ended = inst.exited.result() if inst.exited is not None else None
        limit = {"oom": "memory", "pids-limit": "pids"}.get(ended.reason.value) if ended else None
        if limit is not None:
            return Outcome.error(
                "resource", f"MCP server {inst.spec.name} was killed at its {limit} limit"
            )
        return Outcome.error(
            "transient",
            f"MCP server {inst.spec.name} stopped answering (it is started again on the next call)",
        )

    async def close(self) -> None:
        """Stops every instance; none is started from now on (a call in flight or retried
        meanwhile fails as the node stopping)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        # Listings no lister waits for any more (past LISTING_WAIT_S) may be starting an
        # instance: cancelled, each stops what it started.
        listings = list(self._listing.values())
        for listing in listings:
            listing.cancel()
        await asyncio.gather(*listings, return_exceptions=True)
        for inst in list(self._instances.values()):
            await inst.stop()
        self._instances.clear()
