"""At most `MAX_PER_TASK` connections from one task to each of the node's doors into tasks
(the task API socket, the memory and MCP sockets, the proxy on the node bridge).

The doors are shared by every tenant's tasks, and each open connection holds one of the
daemon's file descriptors: without a bound, one task holding thousands of connections (each
door's token check comes after the connection, and a connection that sends nothing holds its
descriptor) would leave the daemon none, and every other tenant's tasks without a node. The
peer is told apart at accept, before anything is read: on a unix socket by the cgroups of the
process at the other end (`SO_PEERCRED`; each task has its own), over TCP by its address (each
egress task has its own on the bridge). A connection past the bound is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

__all__ = ["MAX_PER_TASK", "PeerCap", "capped"]

#: Connections one task may hold open to one door (an agent holds a few).
MAX_PER_TASK = 256

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_of(sock: socket.socket | None) -> str:
    """Who is at the other end of `sock`: a unix socket's peer as its cgroups, a TCP peer as
    its address."""
    if sock is None:
        return "?"
    if sock.family == socket.AF_UNIX:
        pid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:  # it ended already: a peer of its own
            return f"pid {pid}"
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


class PeerCap:
    """Counts each peer's open connections to one door (`door` names it in the log)."""

    def __init__(self, door: str, *, limit: int = MAX_PER_TASK) -> None:
        self.door = door
        self.limit = limit
        self._open: dict[str, int] = {}
        self._refused: set[str] = set()

    def admit(self, sock: socket.socket | None) -> str | None:
        """The peer's key when one more connection of it is admitted (give it back to
        `release`), None when it holds `limit` already."""
        peer = peer_of(sock)
        held = self._open.get(peer, 0)
        if held >= self.limit:
            if peer not in self._refused:  # once per peer and burst: not a line per attempt
                self._refused.add(peer)
                who = (peer.strip().splitlines() or ["?"])[-1]  # a cgroup file: its last line
                log.warning("%s: refused connections past %d from one task (%s)", self.door,
                            self.limit, who)  # fmt: skip
            return None
        self._open[peer] = held + 1
        return peer

    def release(self, peer: str) -> None:
        """Gives back a connection `admit` took."""
        held = self._open[peer] - 1
        if held:
            self._open[peer] = held
        else:
            del self._open[peer]
            self._refused.discard(peer)


class _Capped(asyncio.Protocol):
    """`inner` (an asyncio protocol) behind `cap`: a connection past it is aborted before
    `inner` sees it."""

    __slots__ = ("_cap", "_inner", "_peer")

    def __init__(self, inner: asyncio.Protocol, cap: PeerCap) -> None:
        self._inner = inner
        self._cap = cap
        self._peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._peer = self._cap.admit(transport.get_extra_info("socket"))
        if self._peer is None:
            cast(asyncio.Transport, transport).abort()
            return
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer is not None:
            self._cap.release(self._peer)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def capped(factory: Callable[[], Any], cap: PeerCap) -> Callable[[], asyncio.Protocol]:
    """A protocol factory making `factory`'s protocols behind `cap`."""
    return lambda: _Capped(factory(), cap)
