"""Unix stream sockets at paths of any length: the node's doors (its API, the task, MCP and
memory sockets) live under the data dir, whose path a user picks, while the kernel takes at
most 107 bytes of a socket's path. A longer one is reached through its directory's file
descriptor (`/proc/self/fd/N/NAME`), which names the same file."""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["connect_unix", "dropped", "listen_unix", "reachable"]

#: The longest path the kernel takes for a unix socket (`sun_path` less its NUL).
MAX_PATH = 107


@contextlib.contextmanager
def reachable(path: str | Path) -> Iterator[str]:
    """A path to `path` short enough to bind or connect to, valid inside the block."""
    path = os.fspath(path)
    if len(os.fsencode(path)) <= MAX_PATH:
        yield path
        return
    parent, name = os.path.split(path)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def listen_unix(path: Path, *, mode: int = 0o666, backlog: int = 128) -> socket.socket:
    """A non-blocking stream socket listening at `path`, replacing a stale socket file there
    (a live daemon's would be guarded by the node's state lock), with file mode `mode`.

    The default 0666 is for the doors into tasks: tasks run as unprivileged users, and the
    door's token check, not the file mode, decides who gets in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with reachable(path) as short:
            listener.bind(short)
        path.chmod(mode)
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def connect_unix(path: str | Path, *, timeout: float | None) -> socket.socket:
    """A stream socket connected to `path`, whatever the path's length, with `timeout`
    (None: blocking); closed again if the connect fails."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        with reachable(path) as short:
            sock.connect(short)
    except BaseException:
        sock.close()
        raise
    return sock


def dropped(sock: socket.socket) -> bool:
    """Whether the peer closed an idle connection (it reads as EOF, or has stray bytes): a
    request sent on it would be lost, or taken for one the node may have applied."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True
