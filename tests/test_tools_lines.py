"""`FdLines`, the line reader of every MCP pipe and socket the node holds: its fd stays
registered with the loop while a reader keeps coming back, and only then (on uvloop, the
node's loop, and on asyncio's own)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from agentnode.tools.lines import FdLines, FdWriter, LineTooLong

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
RUNNERS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


@RUNNERS
def test_lines_come_whole_however_they_are_cut(run: Runner) -> None:
    a, b = socket.socketpair()

    async def scenario() -> list[str]:
        lines = FdLines(a.fileno())
        got: list[str] = []

        async def send() -> None:
            for piece in (b'{"a"', b":1}\n{", b'"b":2}\n\n', b"x" * 70000, b"\nlast\n"):
                b.sendall(piece)
                await asyncio.sleep(0.01)
            b.shutdown(socket.SHUT_WR)

        sender = asyncio.create_task(send())
        async for line in lines:
            got.append(line)
        await sender
        lines.close()
        return got

    try:
        got = run(scenario())
    finally:
        a.close()
        b.close()
    assert got[:3] == ['{"a":1}\n', '{"b":2}\n', "\n"]
    assert got[3] == "x" * 70000 + "\n" and got[4] == "last\n" and len(got) == 5


@RUNNERS
def test_a_reader_that_stops_reading_leaves_the_loop_idle(run: Runner) -> None:
    # Level-triggered readiness with nobody reading would wake the loop at every turn: the
    # registration is dropped instead, and made again when the reader comes back.
    a, b = socket.socketpair()

    async def scenario() -> tuple[float, list[str], bool]:
        loop = asyncio.get_running_loop()
        lines = FdLines(a.fileno())
        reading = asyncio.create_task(anext(lines))
        await asyncio.sleep(0.01)  # waiting: registered
        b.sendall(b"one\n")
        first = await reading
        b.sendall(b"two\nthree\n")  # readable while nobody waits
        turns = 0

        def turn() -> None:
            nonlocal turns
            turns += 1

        cpu = time.process_time()
        for _ in range(20):
            loop.call_soon(turn)
            await asyncio.sleep(0.01)
        cpu = time.process_time() - cpu
        dropped = not loop.remove_reader(a.fileno())
        rest = [first, await anext(lines), await anext(lines)]
        lines.close()
        return cpu, rest, dropped

    try:
        cpu, got, dropped = run(scenario())
    finally:
        a.close()
        b.close()
    assert got == ["one\n", "two\n", "three\n"]
    assert dropped
    assert cpu < 0.1, f"the loop spun for {cpu:.3f} s of CPU in 0.2 s"


@RUNNERS
def test_every_way_out_drops_the_registration(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    # Cancelled mid-wait, at EOF, on an over-long line, and by close(): a registration left
    # behind would wake the reader at the fd's next readiness (and the fd's number may be
    # another file's by then).
    wakes: list[int] = []
    wake = FdLines._wake

    def counted(self: FdLines) -> None:
        wakes.append(self._fd)
        wake(self)

    monkeypatch.setattr(FdLines, "_wake", counted)

    async def idle_after(peer: socket.socket) -> int:
        """Wakes of the reader after `peer` made its fd readable again, with nobody reading."""
        del wakes[:]
        peer.sendall(b"more\n")
        for _ in range(5):
            await asyncio.sleep(0.005)
        return len(wakes)

    async def scenario() -> list[int]:
        left: list[int] = []
        a, b = socket.socketpair()
        lines = FdLines(a.fileno())
        waiting = asyncio.create_task(anext(lines))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        left.append(await idle_after(b))
        assert await anext(lines) == "more\n"  # registered again
        lines.close()
        left.append(await idle_after(b))
        a.close()
        b.close()

        a, b = socket.socketpair()
        lines = FdLines(a.fileno(), limit=10)
        b.sendall(b"short\n")
        assert await anext(lines) == "short\n"
        b.sendall(b"y" * 64)
        with pytest.raises(LineTooLong):
            await anext(lines)
        left.append(await idle_after(b))
        a.close()
        b.close()

        a, b = socket.socketpair()
        lines = FdLines(a.fileno())
        b.sendall(b"end\n")
        b.shutdown(socket.SHUT_WR)
        assert await anext(lines) == "end\n"
        with pytest.raises(StopAsyncIteration):
            await anext(lines)
        lines.close()  # after EOF too: nothing more
        a.close()
        b.close()
        return left

    assert run(scenario()) == [0, 0, 0]


@RUNNERS
def test_a_writer_whose_peer_reads_nothing_gives_up_once_and_for_good(run: Runner) -> None:
    # A pipe whose reader never reads (a server's stdin): the writer waits `stall_s` for room,
    # then says so once and refuses every later write at once, its waiting writers' too.
    r, w = os.pipe()
    stalls: list[float] = []

    async def scenario() -> list[str]:
        out = FdWriter(w, stall_s=0.3, on_stall=lambda: stalls.append(time.monotonic()))
        t0 = time.monotonic()
        writes = [asyncio.ensure_future(out.write("y" * (1 << 20))) for _ in range(3)]
        results = await asyncio.gather(*writes, return_exceptions=True)
        stalls.append(t0)
        later = await asyncio.gather(out.write("z\n"), return_exceptions=True)
        return [type(e).__name__ for e in (*results, *later)]

    try:
        got = run(scenario())
    finally:
        os.close(r)
        os.close(w)
    assert got == ["PeerStalled"] * 4
    stalled_at, started = stalls
    assert 0.25 < stalled_at - started < 2
