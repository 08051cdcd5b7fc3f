"""`agentnode audit verify [PATH]` and `agentnode timeline ID [--follow] [--json]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser"]


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


def _timeline(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from agentnode.audit.text import summary
    from agentnode.node.client import NodeClient
    from agentnode.node.commands import resolve_id

    def show(entry: dict[str, Any]) -> None:
        print(json.dumps(entry) if args.json else summary(entry), flush=True)

    client = NodeClient(args.socket, timeout=None if args.follow else 30.0)
    url = f"/v1/tasks/{quote(resolve_id(client, args.id), safe='')}/timeline"
    if not args.follow:
        for entry in client.call("GET", url):
            show(entry)
        return 0
    rest = b""
    for chunk in client.stream(url + "?follow=1"):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            show(json.loads(line))
    return 0
