"""Shared fixtures. Tests run as root on a real kernel: they create real kernel objects."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import pytest

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def run_cli(
    args: Sequence[str], *, user: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m agentnode ARGS` (as another uid when `user` is given)."""
    argv = [sys.executable, "-m", "agentnode", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def memory_server(tmp_path):  # type: ignore[no-untyped-def]
    """The memory API on loopback in a background event loop, with tenants a and b.

    Yields (url, tokens) where tokens maps tenant to its bearer token.
    """
    import asyncio
    import threading

    from aiohttp import web

    from agentnode.storage.api import make_app
    from agentnode.storage.episodic import EpisodicStore
    from agentnode.storage.objects import ObjectStore
    from agentnode.storage.tenancy import StaticTokens

    tokens = {"a": f"tok-a-{os.getpid()}", "b": f"tok-b-{os.getpid()}"}
    episodic = EpisodicStore(tmp_path / "episodic", bucket_ms=100)
    objects = ObjectStore(tmp_path / "objects", quotas={"a": 1 << 20, "b": 1 << 20})
    app = make_app(
        episodic=episodic,
        objects=objects,
        auth=StaticTokens({t: tenant for tenant, t in tokens.items()}),
        max_body=256 << 10,
    )
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", tokens
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        episodic.close()
        objects.close()
