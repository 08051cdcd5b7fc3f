"""`agentnode tool ls` and `agentnode tool call NAME --json '{...}'`: on the node's admin
socket, or inside a task (with its token, on the task socket) when run as one."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentnode.errors import UsageError
from agentnode.terminal import visible

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `tool` (with `ls` and `call`) to the CLI."""
    p = sub.add_parser(
        "tool",
        help="list and call the node's tools",
        description="List and call the node's tools (built-ins and MCP servers).",
    )
    verbs = p.add_subparsers(title="verbs", metavar="VERB", parser_class=type(p))
    ls = verbs.add_parser("ls", help="list the tools a tenant may use")
    call = verbs.add_parser("call", help="call a tool and print its result")
    call.add_argument("name", help="the tool's name (see agentnode tool ls)")
    call.add_argument(
        "--json",
        dest="arguments",
        default="{}",
        metavar="OBJECT",
        help="the tool's input as a JSON object (default {})",
    )
    call.add_argument("--key", metavar="KEY", help="idempotency key (retries; runs at most once)")
    call.add_argument("--raw", action="store_true", help="print the whole result as JSON")
    for v in (ls, call):
        v.add_argument("--tenant", help="on the node's socket: list or call for this tenant")
        v.add_argument("--task", metavar="ID", help="on the node's socket: call as this task")
        v.add_argument(
            "--socket",
            type=Path,
            metavar="PATH",
            help="node socket ($AGENTNODE_SOCKET, default /run/agentnode/api.sock)",
        )
    ls.add_argument("--json", action="store_true", help="print the full listing as JSON")
    ls.set_defaults(func=_ls)
    call.set_defaults(func=_call)


def _in_task(args: argparse.Namespace) -> bool:
    return args.socket is None and bool(os.environ.get("AGENTNODE_TOKEN"))


def _ls(args: argparse.Namespace) -> int:
    if _in_task(args):
        from agentnode.sdk.tools import Tools

        tools = Tools().list()
    else:
        from urllib.parse import urlencode

        from agentnode.node.client import NodeClient

        query = {k: v for k, v in (("tenant", args.tenant), ("task", args.task)) if v}
        path = "/v1/tools" + (f"?{urlencode(query)}" if query else "")
        tools = NodeClient(args.socket).call("GET", path)["tools"]
    if args.json:
        print(json.dumps(tools, indent=2))
        return 0
    width = max((len(t["name"]) for t in tools), default=4)
    for t in tools:
        first = (t.get("description") or "").strip().splitlines()
        print(visible(f"{t['name']:<{width}}  {first[0] if first else ''}"))
    return 0


def _call(args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.arguments)
    except ValueError as e:
        raise UsageError(f"--json: not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise UsageError('--json: give a JSON object, like \'{"code": "print(1)"}\'')
    if _in_task(args):
        from agentnode.sdk.tools import Tools

        result = Tools().call(args.name, arguments, idempotency_key=args.key)
    else:
        from agentnode.node.client import NodeClient

        body: dict[str, Any] = {"arguments": arguments}
        for key, value in (
            ("idempotency_key", args.key),
            ("tenant", args.tenant),
            ("task", args.task),
        ):
            if value is not None:
                body[key] = value
        # No wait of its own: the node ends every call by its tool's timeout, which may be
        # longer than any fixed one here (Ctrl-C stops waiting).
        client = NodeClient(args.socket, timeout=None)
        result = client.call("POST", f"/v1/tools/{args.name}/call", body)
    if args.raw:
        print(json.dumps(result, indent=2))
    else:
        for block in result.get("content", []):
            text = block.get("text") if block.get("type") == "text" else json.dumps(block)
            print(text, end="" if str(text).endswith("\n") else "\n")
        meta = result.get("_meta", {}).get("agentnode", {})
        if result.get("isError"):
            print(f"agentnode: tool {args.name}: {meta.get('class', 'error')}", file=sys.stderr)
    return 1 if result.get("isError") else 0
