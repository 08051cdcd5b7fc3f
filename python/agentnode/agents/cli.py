"""`agentnode agents`: install and list the agent runtimes tasks can use."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from agentnode.agents import autogpt, openclaw
from agentnode.agents.kinds import agents_cache
from agentnode.node.paths import DEFAULT_DATA_DIR

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser"]


def _cache(args: argparse.Namespace) -> Path:
    return Path(args.cache) if args.cache else agents_cache(Path(args.data_dir))


def _install(args: argparse.Namespace) -> int:
    if args.runtime == "autogpt":
        done = autogpt.install(_cache(args))
        what = f"autogpt {done['autogpt']} (python {done['python']})"
    else:
        done = openclaw.install(_cache(args), version=args.version)
        what = f"openclaw {done['openclaw']} (node {done['node']})"
    print(f"{what} installed in {done['home']}: {done['bytes'] >> 20} MiB in {done['seconds']:g} s")
    return 0


def _status(args: argparse.Namespace) -> int:
    found = {"openclaw": openclaw.status(_cache(args)), "autogpt": autogpt.status(_cache(args))}
    if args.json:
        print(json.dumps(found))
        return 0
    for name, info in found.items():
        print(f"{name}: " + (f"{info[name]} in {info['home']}" if info else "not installed"))
    return 0


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `agents install` and `agents status`."""
    p = sub.add_parser(
        "agents",
        help="install agent runtimes (OpenClaw, AutoGPT)",
        description="Install the agent runtimes that `submit --agent KIND` tasks run on, once "
        "per node, into the node's cache ($AGENTNODE_AGENTS_CACHE, else DATA_DIR/agents).",
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    i = verbs.add_parser(
        "install", help="install a runtime from npm or PyPI (the only network step)"
    )
    i.add_argument("runtime", choices=["openclaw", "autogpt"])
    i.add_argument(
        "--version", default=openclaw.VERSION, help=f"openclaw: default {openclaw.VERSION}"
    )
    s = verbs.add_parser("status", help="show which runtimes are installed")
    s.add_argument("--json", action="store_true", help="print JSON")
    for q, func in ((i, _install), (s, _status)):
        q.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="the node's data dir")
        q.add_argument("--cache", metavar="DIR", help="install here instead")
        q.set_defaults(func=func)
