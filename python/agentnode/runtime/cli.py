"""`agentnode agent "TASK TEXT"`: submits the reference runtime as an agent task (kind
`python`) and prints its output as it runs, then exits with its status (as `submit --attach`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agentnode.isolation.spec import Sandbox
from agentnode.node import commands
from agentnode.tasks.model import CLASSES

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser", "this_python"]


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `agent` to the CLI."""
    p = sub.add_parser(
        "agent",
        description="Run the reference agent runtime (docs/agents.md) on TEXT as a node task, "
        "print its progress and answer, and exit with its status (3: a limit stopped it).",
    )
    p.add_argument("text", metavar="TEXT", help="what the agent is asked to do")
    p.add_argument(
        "--model", help="model at the node's proxy (default: the runtime's $AGENTNODE_MODEL)"
    )
    p.add_argument("--api", metavar="API", help="model API: openai (default) or anthropic")
    p.add_argument("--stream", action="store_true", help="read the model's answers as streams")
    p.add_argument("--tools", metavar="A,B", help="node tools to offer the model (default: all)")
    p.add_argument(
        "--tools-via", metavar="DOOR", help="mcp (default) or api: how tools are reached"
    )
    p.add_argument("--max-steps", metavar="N", help="model calls before it stops (default 20)")
    p.add_argument("--max-time", metavar="DURATION", help="wall time before it stops (30m)")
    p.add_argument("--budget", metavar="USD", help="stop once the task has spent this")
    p.add_argument("--tenant", default="default", help="who the task runs for (default: default)")
    p.add_argument("--priority", default="normal", choices=CLASSES, help="class (default normal)")
    p.add_argument("--retries", type=int, metavar="N", help="retries after failure (default: node)")
    Sandbox.add_arguments(p, node=True)
    commands._with_socket(p)
    p.set_defaults(func=_agent)


def this_python() -> tuple[list[str], dict[str, str]]:
    """The read-only binds and environment that let a task run this interpreter and this copy
    of agentnode: the host root is bound into tasks, but not what lies under their own /tmp
    and /run (a checkout or virtualenv there)."""
    import agentnode

    package = str(Path(agentnode.__file__).resolve().parents[1])
    return sorted({package, sys.prefix}), {"PYTHONPATH": package}


def _agent(args: argparse.Namespace) -> int:
    # Options the runtime checks itself are passed on as typed: one place says what is valid.
    runtime = [("--api", args.api), ("--tools", args.tools), ("--tools-via", args.tools_via),
               ("--max-steps", args.max_steps), ("--max-time", args.max_time),
               ("--budget", args.budget)]  # fmt: skip
    args.command = [sys.executable, "-m", "agentnode.runtime", "--", args.text]
    args.command[3:3] = [word for option, value in runtime if value is not None
                         for word in (option, value)] + ["--stream"] * args.stream  # fmt: skip
    binds, env = this_python()
    args.ro = [*args.ro, *binds]
    args.env = [*args.env, *(f"{k}={v}" for k, v in env.items())]
    args.agent, args.attach, args.wait, args.heartbeat = "python", True, True, None
    return commands.submit(args)
