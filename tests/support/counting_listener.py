"""A TCP listener on loopback that counts the connections made to it, and answers none: to
see that something is never contacted (a fetch would hang on it, never succeed)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def counting_listener() -> Iterator[tuple[str, list[socket.socket]]]:
    """`(url, connections)`: an http URL on the listener, and the connections accepted so
    far (the list is final once the block is left)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    connections: list[socket.socket] = []
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                connections.append(listener.accept()[0])

    counter = threading.Thread(target=count)
    counter.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/schema.json", connections
    finally:
        done.set()
        counter.join()
        listener.close()
        for c in connections:
            c.close()
