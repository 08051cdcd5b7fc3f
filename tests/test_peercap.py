"""`PeerCap` on real sockets: one peer held to its bound on a unix socket (by its cgroups)
and over TCP (by its address), its connections given back when they close."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from aiohttp import web

from agentnode.http_common import CappedSockSite
from agentnode.peercap import PeerCap
from agentnode.unixsock import listen_unix


async def _served(make: list[socket.socket], limit: int) -> tuple[int, int]:
    """Connects `make`'s sockets to the site and sends a request on each: how many were
    answered, then again after closing them all."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    listener = make.pop(0)
    cap = PeerCap("test door", limit=limit)
    await CappedSockSite(runner, listener, cap).start()
    try:
        counts: list[int] = []
        for _ in range(2):
            socks = list(make) if not counts else [_again(s) for s in make]
            for s in socks:
                s.connect(listener.getsockname())
            await asyncio.sleep(0.2)
            answered = 0
            for s in socks:
                s.setblocking(False)
                try:
                    s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    await asyncio.sleep(0)
                    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 64), 2)
                    answered += data.startswith(b"HTTP/1.1 200")
                except (OSError, TimeoutError):
                    pass
                s.close()
            counts.append(answered)
            make = socks
            await asyncio.sleep(0.2)  # the server sees them close
        return counts[0], counts[1]
    finally:
        await runner.cleanup()


def _again(s: socket.socket) -> socket.socket:
    return socket.socket(s.family, socket.SOCK_STREAM)


def test_one_peer_is_held_to_its_bound_on_a_unix_socket(tmp_path: Path) -> None:
    listener = listen_unix(tmp_path / "door.sock")
    clients = [socket.socket(socket.AF_UNIX) for _ in range(40)]
    assert asyncio.run(_served([listener, *clients], 25)) == (25, 25)


def test_one_peer_is_held_to_its_bound_over_tcp() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    clients = [socket.socket(socket.AF_INET) for _ in range(40)]
    assert asyncio.run(_served([listener, *clients], 25)) == (25, 25)


def test_peers_are_counted_apart() -> None:
    cap = PeerCap("door", limit=2)
    a, b = socket.socketpair()
    try:
        first = cap.admit(a)
        assert first is not None and cap.admit(a) == first
        assert cap.admit(a) is None, "a third from the same peer"
        cap.release(first)
        assert cap.admit(a) == first, "given back, taken again"
    finally:
        a.close()
        b.close()
