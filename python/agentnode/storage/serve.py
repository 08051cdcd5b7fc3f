"""`agentnode memory serve`: the memory API on its own (the daemon also mounts it), on uvloop,
and with `--socket PATH` the memory socket's episodic operations beside it (`storage.memsocket`).

Tenants and their tokens come from a JSON file, never the command line (argv is world-readable):
`{"<tenant>": {"token": "<secret>", "quota": <object bytes, optional>}, ...}`.
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentnode.errors import ConfigError, UsageError
from agentnode.storage.keys import check_name

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser", "load_tenants", "serve"]


def load_tenants(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Reads the tenants file: returns (token -> tenant, tenant -> quota)."""
    try:
        spec: Any = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(
            f"cannot read tenants file {path}: {e.strerror} (pass --tenants FILE)"
        ) from e
    except ValueError as e:
        raise ConfigError(f"tenants file {path} is not valid JSON ({e})") from e
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"tenants file {path} must be a non-empty JSON object of tenants")
    tokens: dict[str, str] = {}
    quotas: dict[str, int] = {}
    for tenant, entry in spec.items():
        check_name("tenant", tenant)
        token = entry.get("token") if isinstance(entry, dict) else None
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(
                f'tenant {tenant!r} in {path} needs a "token" of at least 16 characters'
            )
        if token in tokens:
            raise ConfigError(f"tenants {tokens[token]!r} and {tenant!r} in {path} share a token")
        tokens[token] = tenant
        if "quota" in entry:
            if not isinstance(entry["quota"], int) or entry["quota"] < 0:
                raise ConfigError(f"tenant {tenant!r} in {path}: quota must be bytes (an integer)")
            quotas[tenant] = entry["quota"]
    return tokens, quotas


async def serve(
    *,
    data_dir: Path,
    host: str,
    port: int,
    tenants: Path,
    sweep_interval: float,
    socket: Path | None = None,
) -> None:
    """Runs the memory API (and the memory socket at `socket`) until SIGTERM or SIGINT, then
    closes the stores."""
    # Imported here: the CLI registers this command on every start, and these are heavy.
    import asyncio

    from aiohttp import web

    from agentnode.storage.api import make_app
    from agentnode.storage.episodic import EpisodicStore
    from agentnode.storage.memsocket import MemorySocket
    from agentnode.storage.objects import ObjectStore
    from agentnode.storage.operations import episodic_operations
    from agentnode.storage.tenancy import StaticTokens
    from agentnode.storage.vector_api import vectors_app
    from agentnode.storage.vectors import VectorStore

    tokens, quotas = load_tenants(tenants)
    data_dir.mkdir(parents=True, exist_ok=True)
    episodic = EpisodicStore(data_dir / "episodic")
    objects = ObjectStore(data_dir / "objects", quotas=quotas)
    vectors = VectorStore(data_dir / "vectors")
    auth = StaticTokens(tokens)
    app = make_app(episodic=episodic, objects=objects, auth=auth, vectors=vectors_app(vectors))
    runner = web.AppRunner(app, handle_signals=False)
    door = (
        # The tenants file is read once: a token valid at a connection's start stays valid.
        MemorySocket(
            episodic_operations(episodic), auth.authenticate, path=socket, tokens_fixed=True
        )
        if socket is not None
        else None
    )
    try:
        episodic.start_sweeper(sweep_interval)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = runner.addresses[0]
        print(f"agentnode memory: listening on http://{bound[0]}:{bound[1]}", flush=True)
        if door is not None:
            await door.start()
            print(f"agentnode memory: memory socket at {door.path}", flush=True)
        await stop.wait()
    finally:
        if door is not None:
            await door.stop()
        await runner.cleanup()
        episodic.close()
        objects.close()
        vectors.close()


def _run(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        raise UsageError(f"--listen {args.listen!r} is not HOST:PORT (e.g. 127.0.0.1:8470)")
    import uvloop

    uvloop.run(
        serve(
            data_dir=args.data_dir,
            host=host,
            port=int(port),
            tenants=args.tenants,
            sweep_interval=args.sweep_interval,
            socket=args.socket,
        )
    )
    return 0


def add_parser(cmds: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `serve` to `agentnode memory`'s commands."""
    s = cmds.add_parser(
        "serve",
        help="serve the memory HTTP API on its own",
        description="Serve /v1/memory/episodic, /v1/memory/vectors and /v1/objects until SIGTERM.",
    )
    s.add_argument("--data-dir", type=Path, required=True, help="where the stores live")
    s.add_argument("--tenants", type=Path, required=True, help="JSON file of tenants and tokens")
    s.add_argument("--listen", default="127.0.0.1:8470", help="HOST:PORT (default %(default)s)")
    s.add_argument(
        "--socket", type=Path, metavar="PATH", help="also serve the memory socket at PATH"
    )
    s.add_argument(
        "--sweep-interval", type=float, default=30.0, help="seconds between expiry sweeps"
    )
    s.set_defaults(func=_run)
