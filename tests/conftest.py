"""Shared fixtures. Tests run as root on a real kernel: they create real kernel objects."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from support import node_daemon
from support.proxy_env import make_env  # noqa: F401  (a fixture of the proxy tests)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skips tests marked `root` when not running as root (CI runs as root)."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (CI runs as root)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def discard_daemons() -> Iterator[None]:
    """Discards the node daemons a test made when it ends (`Daemon.discard`), however it ended:
    a daemon killed and never started again leaves its tasks, cgroups and pins otherwise.
    Daemons of wider-scoped fixtures were made before this runs, and are theirs to end."""
    first = len(node_daemon.made)
    yield
    made = node_daemon.made[first:]
    del node_daemon.made[first:]
    for d in reversed(made):  # a later daemon on the same data dir may be the running one
        d.discard()


@contextlib.contextmanager
def public_dir(name: str) -> Iterator[Path]:
    """A fresh 0755 directory under /var/tmp, removed after: outside pytest's private (0700)
    tmp dirs, which keep out host users and the unprivileged host ids of user-namespaced
    tasks, and outside /tmp, which every task gets fresh."""
    root = Path(tempfile.mkdtemp(prefix=f"agentnode-{name}-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """The node's data dir moved to a fresh `tmp_path/data` for the test, put back after."""
    from agentnode.isolation import task as isolation
    from agentnode.isolation import use_data_dir

    old = isolation.DATA_DIR
    use_data_dir(tmp_path / "data")
    (tmp_path / "data").mkdir()
    yield tmp_path / "data"
    use_data_dir(old)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """An empty workspace directory owned by the default task uid."""
    d = tmp_path / "ws"
    d.mkdir()
    os.chown(d, 65534, 65534)
    return d


def run_cli(
    args: Sequence[str], *, user: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m agentnode ARGS` (as another uid when `user` is given)."""
    argv = [sys.executable, "-m", "agentnode", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def processes_with(marker: str, *, exact: bool = False) -> list[int]:
    """Pids whose command line contains `marker` (or, with `exact`, is `marker` + NUL: a
    clone that has not exec'd yet still shows its parent's command line, which may contain it)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmdline = (p / "cmdline").read_bytes()
                if (cmdline == marker.encode() + b"\0") if exact else marker.encode() in cmdline:
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serves an aiohttp app on 127.0.0.1 (any free port) from a background event loop."""
    import asyncio
    import threading

    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@contextlib.contextmanager
def memory_stores(path: Path) -> Iterator[tuple[Any, Any]]:
    """An episodic store (100 ms expiry buckets) and an object store (1 MiB quota) under path."""
    from agentnode.storage.episodic import EpisodicStore
    from agentnode.storage.objects import ObjectStore

    episodic = EpisodicStore(path / "episodic", bucket_ms=100)
    objects = ObjectStore(path / "objects", default_quota=1 << 20)
    try:
        yield episodic, objects
    finally:
        episodic.close()
        objects.close()


@contextlib.contextmanager
def memory_api(path: Path, auth: Any) -> Iterator[str]:
    """The whole memory API (episodic, objects, vectors; 256 KiB bodies) over stores under path,
    on loopback: yields its URL."""
    from agentnode.storage.api import make_app
    from agentnode.storage.vector_api import vectors_app
    from agentnode.storage.vectors import VectorStore

    with memory_stores(path) as (episodic, objects), VectorStore(path / "vectors") as vectors:
        app = make_app(
            episodic=episodic,
            objects=objects,
            auth=auth,
            max_body=256 << 10,
            vectors=vectors_app(vectors),
        )
        with serve_app(app) as url:
            yield url


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The memory API on loopback with tenants a and b: yields (url, tenant -> bearer token)."""
    from agentnode.storage.tenancy import StaticTokens

    tokens = {"a": f"tok-a-{os.getpid()}", "b": f"tok-b-{os.getpid()}"}
    with memory_api(tmp_path, StaticTokens({t: tenant for tenant, t in tokens.items()})) as url:
        yield url, tokens


@contextlib.contextmanager
def serve_memory_socket(operations: Any, auth: Any, **options: Any) -> Iterator[Any]:
    """A `MemorySocket` serving `operations` (authenticated by `auth`) at a fresh short path
    (a socket's path has at most 107 bytes) from a background event loop: yields it."""
    import asyncio
    import shutil
    import tempfile
    import threading

    from agentnode.storage.memsocket import MemorySocket

    where = Path(tempfile.mkdtemp(prefix="ms-"))
    loop = asyncio.new_event_loop()
    door = MemorySocket(operations, auth.authenticate, path=where / "memory.sock", **options)
    loop.run_until_complete(door.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield door
    finally:
        asyncio.run_coroutine_threadsafe(door.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def memory_doors(tmp_path: Path) -> Iterator[tuple[str, Any, dict[str, str]]]:
    """The memory API on loopback and the memory socket over the same stores, tenants a and
    b: yields (url, the MemorySocket, tenant -> bearer token)."""
    from agentnode.storage.operations import episodic_operations
    from agentnode.storage.tenancy import StaticTokens

    tokens = {"a": f"tok-a-{os.getpid()}", "b": f"tok-b-{os.getpid()}"}
    auth = StaticTokens({t: tenant for tenant, t in tokens.items()})
    with memory_stores(tmp_path) as (episodic, objects):
        from agentnode.storage.api import make_app

        app = make_app(episodic=episodic, objects=objects, auth=auth, max_body=256 << 10)
        with (
            serve_app(app) as url,
            serve_memory_socket(episodic_operations(episodic), auth) as door,
        ):
            yield url, door, tokens
