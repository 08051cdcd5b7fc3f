"""`python -m agentnode.runtime "TASK TEXT" --model M [--api openai|anthropic] [--stream]
[--tools a,b] [--tools-via mcp|api] [--memory-space SPACE | --no-memory-tools] [--max-steps N]
[--max-time DURATION] [--budget USD]`, run inside a node task. The final answer is printed on
stdout; progress goes to stderr. Exit 0 answered, 3 stopped by a limit, 1 failed, 2 bad usage."""

from __future__ import annotations

import argparse
import os
import sys
from decimal import Decimal, InvalidOperation

from agentnode.errors import AgentnodeError, MemoryKeyError, UsageError
from agentnode.isolation.spec import SpecError, check_duration
from agentnode.runtime.formats import FORMATS
from agentnode.runtime.nodetools import DOORS
from agentnode.storage.keys import check_name

__all__ = ["main", "parse"]

#: The exit status when a limit stopped the run.
STOPPED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see 'python -m agentnode.runtime --help')")


def _budget(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal(-1)
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of US dollars above 0")
    return value


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, float]:
    """The run's options and its wall-time limit in seconds; `UsageError` says what is wrong."""
    p = _Parser(prog="python -m agentnode.runtime", description=__doc__)
    p.add_argument("text", metavar="TASK_TEXT", help="what the agent is asked to do")
    p.add_argument("--model", default=os.environ.get("AGENTNODE_MODEL"),
                   help="model name at the node's proxy (default $AGENTNODE_MODEL)")  # fmt: skip
    p.add_argument("--api", choices=FORMATS, default="openai",
                   help="the model API spoken through the node's proxy (openai)")  # fmt: skip
    p.add_argument("--stream", action="store_true", help="read the model's answers as streams")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="an answer's token cap, sent with --api anthropic (4096)")  # fmt: skip
    p.add_argument("--tools", help="comma-separated node tools to offer (default: all)")
    p.add_argument("--tools-via", choices=DOORS, default="mcp",
                   help="reach the node's tools through its MCP endpoint or HTTP API (mcp)")  # fmt: skip
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--memory-space", dest="memory", default="default", metavar="SPACE",
                        help="the tenant's memory space of remember/recall (default)")  # fmt: skip
    memory.add_argument("--no-memory-tools", dest="memory", action="store_const", const=None,
                        help="offer no remember/recall tools")  # fmt: skip
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-steps", type=int, default=20, metavar="N", help="model calls (20)")
    p.add_argument("--max-time", default="30m", metavar="DURATION", help="wall time (30m)")
    p.add_argument("--budget", type=_budget, metavar="USD", help="stop once this is spent")
    args = p.parse_args(argv)
    if not args.model:
        raise UsageError("no model: give --model M (or run with $AGENTNODE_MODEL set)")
    if args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    try:
        seconds = check_duration("max-time", args.max_time)
    except SpecError as e:
        raise e.for_option("--max-time") from None
    if args.memory is not None:
        try:
            check_name("memory space", args.memory)
        except MemoryKeyError as e:
            raise UsageError(f"--memory-space: {e}") from None
    return args, seconds


def main(argv: list[str] | None = None) -> int:
    """Runs the loop; returns the exit status."""
    try:
        args, seconds = parse(argv)
        from agentnode.runtime.loop import Agent, Limits, Stopped

        tools = None if args.tools is None else [t for t in args.tools.split(",") if t]
        agent = Agent(
            model=args.model,
            tools=tools,
            system=args.system,
            api=args.api,
            stream=args.stream,
            max_tokens=args.max_tokens,
            tools_via=args.tools_via,
            memory=args.memory,
            limits=Limits(max_steps=args.max_steps, max_seconds=seconds, budget=args.budget),
        )
        answer = agent.run(args.text)
    except UsageError as e:
        print(f"agentnode.runtime: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"agentnode.runtime: stopped: {e}", file=sys.stderr)
        return STOPPED
    except AgentnodeError as e:
        message = " ".join(str(e).split())
        print(f"agentnode.runtime: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
    print(answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
