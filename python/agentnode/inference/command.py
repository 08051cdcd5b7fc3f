"""`agentnode proxy [--config FILE] [--listen HOST:PORT]`: the inference proxy on its own;
`agentnode proxy prices [--update FILE]`: its price table."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agentnode.errors import AgentnodeError, ConfigError, UsageError
from agentnode.inference.config import ProxyConfig, from_environment, load_config, parse_config
from agentnode.inference.prices import convert_litellm, load_table

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser", "serve"]


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = sub.add_parser(
        "proxy",
        description="Serve the inference proxy (default 127.0.0.1:4000) until SIGTERM or Ctrl-C. "
        "With no deployments configured, OPENAI_API_KEY/ANTHROPIC_API_KEY in the environment "
        "serve those providers' models at the price table's prices. "
        "`prices` shows the price table; `prices --update FILE` replaces it with a newer copy "
        "of LiteLLM's model_prices_and_context_window.json.",
    )
    p.add_argument("action", nargs="?", choices=["prices"], help="show the price table")
    p.add_argument("--update", metavar="FILE", help="with prices: convert FILE into the table")
    p.add_argument("--config", metavar="FILE", help="TOML file ([inference] section or top level)")
    p.add_argument("--listen", metavar="HOST:PORT", help="override the configured address")
    p.add_argument("--state-dir", metavar="DIR", help="where the ledger and cache live")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else parse_config({}, prefix="")
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=Path(args.state_dir))
    if args.action == "prices":
        return _prices(config, args.update)
    if args.update:
        raise ConfigError("--update goes with `prices` (agentnode proxy prices --update FILE)")
    config = from_environment(config, dict(os.environ))
    if args.listen:
        try:
            where = parse_config({"listen": args.listen}, prefix="")
        except ConfigError:
            raise UsageError(
                f"--listen: {args.listen!r} is not HOST:PORT (e.g. 127.0.0.1:4000)"
            ) from None
        config = dataclasses.replace(config, host=where.host, port=where.port)
    import uvloop  # here: every other command's start (and --help) would pay for it

    uvloop.run(serve(config))
    return 0


def _prices(config: ProxyConfig, update: str | None) -> int:
    if update is not None:
        try:
            raw = json.loads(Path(update).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read price file {update}: {e}") from None
        table = convert_litellm(raw, source=f"LiteLLM's price map, from {update}")
        config.state_dir.mkdir(parents=True, exist_ok=True)
        out = config.state_dir / "prices.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(out)
        print(f"{len(table['models'])} models written to {out}")
        return 0
    t = load_table(config.state_dir)
    print(f"prices of {t.date}, from {t.source}; USD per 1M tokens")
    cols = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")
    print(f"{'model':40} {'kind':9} " + " ".join(f"{c:>14}" for c in cols))
    for name, p in t.models.items():
        cells = " ".join(f"{p.get(c, '-'):>14}" for c in cols)
        print(f"{name:40} {p['kind']:9} {cells}")
    return 0


async def serve(config: ProxyConfig) -> None:
    """Serves until SIGTERM/SIGINT, then finishes in-flight requests (10 s at most)."""
    # Imported here: the CLI imports this module to list `proxy` in --help.
    import asyncio

    from aiohttp import web

    from agentnode.http_common import SERVER_LOG
    from agentnode.inference.server import create_app

    runner = web.AppRunner(
        create_app(config),
        handler_cancellation=True,
        shutdown_timeout=10.0,
        access_log=None,
        logger=SERVER_LOG,
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
        if not config.deployments:
            print(
                "agentnode proxy: no deployments configured and neither OPENAI_API_KEY nor "
                "ANTHROPIC_API_KEY set: no model is served",
                file=sys.stderr,
            )

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
