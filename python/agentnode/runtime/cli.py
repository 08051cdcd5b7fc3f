"""`agentnode agent "TASK TEXT"`: submits the reference runtime as an agent task (kind
`python`), prints its timeline as it runs (model calls, tool calls, denials: `agentnode
timeline --follow`), then its cost and answer, and exits with its status."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from agentnode.audit.cli import follow_timeline, printer
from agentnode.audit.text import spend
from agentnode.isolation.spec import Sandbox
from agentnode.node import commands
from agentnode.node.client import NodeClient
from agentnode.tasks.model import CLASSES
from agentnode.terminal import visible

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser", "this_python"]


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `agent` to the CLI."""
    p = sub.add_parser(
        "agent",
        description="Run the reference agent runtime (docs/agents.md) on TEXT as a node task, "
        "print its timeline as it runs, then its cost and answer (the last line), and exit "
        "with its status (3: a limit stopped it).",
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
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--memory-space", metavar="SPACE",
                        help="the tenant's memory space of remember/recall (default)")  # fmt: skip
    memory.add_argument("--no-memory-tools", action="store_true",
                        help="offer no remember/recall tools")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="timeline entries, then the outcome, as JSON lines")  # fmt: skip
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
               ("--budget", args.budget), ("--memory-space", args.memory_space)]  # fmt: skip
    flags = ["--stream"] * args.stream + ["--no-memory-tools"] * args.no_memory_tools
    args.command = [sys.executable, "-m", "agentnode.runtime", "--", args.text]
    args.command[3:3] = [word for option, value in runtime if value is not None
                         for word in (option, value)] + flags  # fmt: skip
    binds, env = this_python()
    args.ro = [*args.ro, *binds]
    args.env = [*args.env, *(f"{k}={v}" for k, v in env.items())]
    args.agent, args.heartbeat = "python", None
    client, task = commands.post_task(args)
    print(f"agentnode: task {task['id']}", file=sys.stderr, flush=True)
    entries = follow_timeline(NodeClient(args.socket, timeout=None), task["id"],
                              printer(as_json=args.json))  # fmt: skip
    status = commands.wait_for(client, task["id"])
    calls, cost = spend(entries)
    last = _last_line(client, task["id"])
    if args.json:
        outcome: dict[str, Any] = {"kind": "outcome", "task": task["id"], "exit_status": status,
                                   "model_calls": calls, "cost": str(cost), "last_line": last}  # fmt: skip
        print(json.dumps(outcome), flush=True)
    else:
        print(f"agentnode: {calls} model calls, ${cost}", flush=True)
        print(visible(last), flush=True)  # the model's words: no terminal control in them
    return status


def _last_line(client: NodeClient, task_id: str) -> str:
    """The task's last line of output: the runtime's answer, or why it stopped or failed."""
    tail = b""
    for chunk in client.stream(f"/v1/tasks/{quote(task_id, safe='')}/logs"):
        tail = (tail + chunk)[-(1 << 16) :]
    lines = tail.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""
