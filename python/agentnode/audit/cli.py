"""`agentnode audit verify [PATH]` and `agentnode timeline ID [--follow] [--json]`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser
    from agentnode.node.client import NodeClient

__all__ = ["add_parser", "follow_timeline", "printer"]


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `audit` and `timeline` to the CLI."""
    p = sub.add_parser(
        "audit",
        description="Work with the node's hash-chained audit log.",
    )
    asub = p.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)
    v = asub.add_parser(
        "verify",
        help="check the hash chain; name the first broken record",
        description="Check the audit log's hash chain: every record's hash, its link to the one "
        "before and the sequence without gaps. Exits 1 naming the first broken record.",
    )
    v.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=Path("/var/lib/agentnode/audit"),
        help="the log directory or one file of it (default /var/lib/agentnode/audit)",
    )
    v.set_defaults(func=_verify)

    t = sub.add_parser(
        "timeline",
        description="Print one task's timeline from the audit log's index.",
    )
    t.add_argument("id")
    t.add_argument("-f", "--follow", action="store_true", help="follow until the task ends")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="node socket ($AGENTNODE_SOCKET, default /run/agentnode/api.sock)",
    )
    t.set_defaults(func=_timeline)


def _verify(args: argparse.Namespace) -> int:
    from agentnode.audit.chain import verify

    ok = verify(args.path)
    print(
        f"audit log intact: records {ok.first_seq}-{ok.last_seq} in {ok.files} file(s), "
        f"head {ok.head}"
    )
    return 0


def printer(*, as_json: bool) -> Callable[[dict[str, Any]], None]:
    """Prints a timeline entry on stdout: one JSON object, or `audit.text.summary`'s line."""
    from agentnode.audit.text import summary

    def show(entry: dict[str, Any]) -> None:
        print(json.dumps(entry) if as_json else summary(entry), flush=True)

    return show


def follow_timeline(
    client: NodeClient, task_id: str, show: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Calls `show` on each of task `task_id`'s timeline entries as the node writes them, until
    the task has ended; returns them. `client` needs no timeout (a task may run for hours)."""
    from urllib.parse import quote

    url = f"/v1/tasks/{quote(task_id, safe='')}/timeline?follow=1"
    seen: list[dict[str, Any]] = []
    rest = b""
    for chunk in client.stream(url):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            seen.append(json.loads(line))
            show(seen[-1])
    return seen


def _timeline(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from agentnode.node.client import NodeClient
    from agentnode.node.commands import resolve_id

    show = printer(as_json=args.json)
    client = NodeClient(args.socket, timeout=None if args.follow else 30.0)
    task_id = resolve_id(client, args.id)
    if args.follow:
        follow_timeline(client, task_id, show)
        return 0
    for entry in client.call("GET", f"/v1/tasks/{quote(task_id, safe='')}/timeline"):
        show(entry)
    return 0
