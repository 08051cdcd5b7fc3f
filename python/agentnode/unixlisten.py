"""A listening unix socket for the doors the node opens into every task (MCP, memory)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

__all__ = ["listen_unix"]


def listen_unix(path: Path, *, backlog: int = 128) -> socket.socket:
    """A non-blocking stream socket listening at `path`, replacing a stale socket file there.

    The file is mode 0666: tasks run as unprivileged users, and the door's token check, not
    the file mode, decides who gets in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        path.chmod(0o666)
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener
