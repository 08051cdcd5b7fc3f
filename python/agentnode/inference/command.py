"""`agentnode proxy [--config FILE] [--listen HOST:PORT]`: the inference proxy on its own."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from agentnode.errors import AgentnodeError, ConfigError, UsageError
from agentnode.inference.config import ProxyConfig, load_config, parse_config

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser", "serve"]


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = sub.add_parser(
        "proxy",
        description="Serve the inference proxy (default 127.0.0.1:4000) until SIGTERM or Ctrl-C.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file ([inference] section or top level)")
    p.add_argument("--listen", metavar="HOST:PORT", help="override the configured address")
    p.add_argument("--state-dir", metavar="DIR", help="where the ledger and cache live")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else parse_config({}, prefix="")
    if args.listen:
        try:
            where = parse_config({"listen": args.listen}, prefix="")
        except ConfigError:
            raise UsageError(
                f"--listen: {args.listen!r} is not HOST:PORT (e.g. 127.0.0.1:4000)"
            ) from None
        config = dataclasses.replace(config, host=where.host, port=where.port)
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=Path(args.state_dir))
    import uvloop  # here: every other command's start (and --help) would pay for it

    uvloop.run(serve(config))
    return 0


async def serve(config: ProxyConfig) -> None:
    """Serves until SIGTERM/SIGINT, then finishes in-flight requests (10 s at most)."""
    # Imported here: the CLI imports this module to list `proxy` in --help.
    import asyncio

    from aiohttp import web

    from agentnode.inference.server import create_app

    runner = web.AppRunner(
        create_app(config), handler_cancellation=True, shutdown_timeout=10.0, access_log=None
    )
    await runner.setup()
    _tune_gc()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise AgentnodeError(
                f"cannot listen on {config.host}:{config.port}: {e.strerror} "
                "(pick another address with --listen)"
            ) from None
        print(f"agentnode proxy: listening on http://{config.host}:{config.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _tune_gc() -> None:
    """Makes the cyclic GC cheap for a process that is this proxy and nothing else.

    Each request allocates many short-lived containers (aiohttp's request and response objects)
    that reference counting frees. With the default gen-0 threshold of 700, the dozens of
    requests in flight keep tripping collections that find next to nothing: ~10% of the CPU at
    64 concurrent (measured with gc.callbacks). Cycles are rare here (one collection in 6 s at
    10 000), so collect far less often, and freeze what startup built (modules, the app, its
    state) so that full collections skip it.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
