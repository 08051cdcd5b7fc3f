"""The CLI side of the node: `submit`, `ps`, `gc`, `logs`, `wait`, `kill`, `top` (over its
socket)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

from agentnode.agents.kinds import KINDS
from agentnode.egress import cli as egress_cli
from agentnode.errors import AgentnodeError, UsageError
from agentnode.isolation.spec import Sandbox, SpecError, check_duration
from agentnode.isolation.units import format_size
from agentnode.node.client import NodeClient
from agentnode.tasks.model import CLASSES
from agentnode.terminal import visible

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from typing import Any

    from rich.table import Table

    from agentnode.cli import ArgumentParser

__all__ = [
    "add_parser", "exit_status", "post_task", "resolve_id", "submit", "task_table", "tasks",
    "wait_for",
]  # fmt: skip

#: `wait` exit statuses for outcomes without an exit code of their own.
_STATUS = {"timed_out": 124, "cancelled": 130, "lost": 1}


def _client(args: argparse.Namespace) -> NodeClient:
    return NodeClient(args.socket)


def _with_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="node socket ($AGENTNODE_SOCKET, default /run/agentnode/api.sock)",
    )


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `submit`, `egress`, `ps`, `gc`, `logs`, `wait`, `kill` and `top` to the CLI."""
    p = sub.add_parser(
        "submit",
        description="Queue CMD as an "
        "isolated task and print its id (--wait: exit with its status).",
    )
    p.add_argument("--tenant", default="default", help="who the task runs for (default: default)")
    p.add_argument("--priority", default="normal", choices=CLASSES, help="class (default normal)")
    p.add_argument("--heartbeat", metavar="DURATION", help="stop it when it misses heartbeats")
    p.add_argument("--retries", type=int, metavar="N", help="retries after failure (default: node)")
    p.add_argument(
        "--no-retry-lost",
        action="store_true",
        help="do not run it again when the node loses it (a host reboot): for work that must not "
        "run twice",
    )
    p.add_argument(
        "--agent", choices=KINDS, help="prepare the task for this agent kind (docs/agents.md)"
    )
    p.add_argument("--model", help="the model an --agent uses (openclaw: required)")
    p.add_argument("--steps", type=int, metavar="N", help="--agent autogpt: its step limit (10)")
    Sandbox.add_arguments(p, node=True)
    p.add_argument("--wait", action="store_true", help="wait and exit with the task's status")
    p.add_argument(
        "-a",
        "--attach",
        action="store_true",
        help="print the task's output as it runs, then exit with its status (implies --wait)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    _with_socket(p)
    p.set_defaults(func=submit)

    p = sub.add_parser(
        "egress",
        description="Replace a task's egress rules and rates (those not given become empty). "
        "A running task's next connection follows them; a retry starts with them.",
    )
    p.add_argument("id")
    egress_cli.add_arguments(p, mode=False)
    _with_socket(p)
    p.set_defaults(func=_egress)

    p = sub.add_parser("ps", description="List live tasks (--all: ended too).")
    p.add_argument("--all", action="store_true", help="include ended tasks")
    p.add_argument("--tenant", help="only this tenant's tasks")
    p.add_argument("--state", help="only tasks in this state (e.g. failed)")
    p.add_argument(
        "--limit", type=_positive, default=None, help="show at most N tasks (oldest first)"
    )
    _with_socket(p)
    p.set_defaults(func=_ps)

    p = sub.add_parser(
        "gc",
        description="Remove ended tasks past their retention ([retention] in the node config) "
        "now: their records, logs and workspaces.",
    )
    _with_socket(p)
    p.set_defaults(func=_gc)

    p = sub.add_parser("logs", description="Print a task's output.")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the task ends")
    p.add_argument("id")
    _with_socket(p)
    p.set_defaults(func=_logs)

    p = sub.add_parser(
        "wait",
        description="Wait for a task to end; exit with its status.",
    )
    p.add_argument("id")
    _with_socket(p)
    p.set_defaults(func=_wait)

    p = sub.add_parser(
        "kill",
        description="Cancel a queued task or stop "
        "a running one (SIGTERM, grace, then its whole cgroup is killed).",
    )
    p.add_argument("id")
    _with_socket(p)
    p.set_defaults(func=_kill)

    p = sub.add_parser("top", description="A live table of tasks.")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--interval", type=float, default=1.0, help="refresh seconds (default 1)")
    _with_socket(p)
    p.set_defaults(func=_top)


def submit(args: argparse.Namespace) -> int:
    """`submit`: queues `args.command` with the options of its parser (which `agent` shares)."""
    client, task = post_task(args)
    if args.attach:
        # stdout carries the task's output alone; the id still reaches whoever needs it.
        print(f"agentnode: task {task['id']}", file=sys.stderr, flush=True)
        _print_logs(args.socket, task["id"], follow=True)
        return wait_for(client, task["id"])
    print(task["id"], flush=True)
    return wait_for(client, task["id"]) if args.wait else 0


def post_task(args: argparse.Namespace) -> tuple[NodeClient, dict[str, Any]]:
    """Submits `args.command` with the options of `submit`'s parser; the client that did and
    the task's record."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("submit needs a command after '--' (example: agentnode submit -- echo hi)")
    sandbox = Sandbox.from_args(args)
    body: dict[str, Any] = {
        "tenant": args.tenant,
        "priority": args.priority,
        "command": command,
        **{k: v for k, v in sandbox.to_json().items() if v is not None},
    }
    if args.heartbeat is not None:
        try:
            body["heartbeat"] = check_duration("heartbeat", args.heartbeat)
        except SpecError as e:
            raise e.for_option("--heartbeat") from None
    if args.retries is not None:
        body["retries"] = args.retries
    if args.cpu_request is not None:
        try:
            body["cpu_request"] = float(args.cpu_request)
        except ValueError:
            raise UsageError(f"--cpu-request {args.cpu_request!r}: is not a number") from None
    if getattr(args, "no_retry_lost", False):  # `agent` builds its body here too
        body["retry_lost"] = False
    if args.agent is not None:
        body["agent"] = {"kind": args.agent, **({"model": args.model} if args.model else {})}
        steps = getattr(args, "steps", None)  # `agent` shares this without the option
        if steps is not None:
            body["agent"]["steps"] = steps
        if getattr(args, "net", None) is None:
            body.pop("network", None)  # an agent's default is its own (egress)
    elif args.model is not None or getattr(args, "steps", None) is not None:
        raise UsageError("--model and --steps need --agent KIND (they are that agent's options)")
    client = _client(args)
    task: dict[str, Any] = client.call("POST", "/v1/tasks", body)
    return client, task


def _egress_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The API fields of the egress options, checked here so a bad rule is a usage error
    before anything reaches the node."""
    egress_cli.network_from_args(args)
    fields = (("allow", args.allow), ("allow_hosts", args.allow_host),
              ("egress_rate", args.egress_rate), ("conn_rate", args.conn_rate))  # fmt: skip
    return {key: value for key, value in fields if value}


def resolve_id(client: NodeClient, text: str) -> str:
    """The full id of the one task whose id starts with `text` (as `ps` shows 12 characters
    of it); `UsageError` when none or several do."""
    key = text.strip().lower()
    if not key or any(c not in "0123456789abcdef" for c in key):
        raise UsageError(
            f"{text!r} is not a task id (give an id or its start, as 'agentnode ps' shows it)"
        )
    if len(key) == _ID_LENGTH:
        return key
    matches = [t["id"] for t in tasks(client, all=1) if t["id"].startswith(key)]
    if not matches:
        raise AgentnodeError(f"no task {text!r} (list tasks with 'agentnode ps --all')")
    if len(matches) > 1:
        raise UsageError(
            f"task id {text!r} is ambiguous: {len(matches)} tasks start with it "
            "(give more characters)"
        )
    return str(matches[0])


#: A task id is a uuid4 in hex.
_ID_LENGTH = 32


def _task_url(client: NodeClient, text: str, tail: str = "") -> str:
    return f"/v1/tasks/{quote(resolve_id(client, text), safe='')}{tail}"


def _egress(args: argparse.Namespace) -> int:
    client = _client(args)
    fields = _egress_fields(args)
    task = client.call("PUT", _task_url(client, args.id, "/egress"), fields)
    rules = [*task["allow"], *task["allow_hosts"]]
    print(f"{task['id']}: {', '.join(rules) or 'no destinations'} allowed", flush=True)
    return 0


def exit_status(task: dict[str, Any]) -> int:
    """The status `wait` exits with: the task's own, or 124 timeout, 130 cancelled, 1 lost."""
    if task["state"] in ("succeeded", "failed") and task["exit_code"] is not None:
        return int(task["exit_code"])
    return _STATUS.get(task["state"], 1)


def wait_for(client: NodeClient, task_id: str) -> int:
    """Waits for the task to end; its `exit_status`, after a line on stderr saying why when it
    did not succeed."""
    url = f"/v1/tasks/{quote(task_id, safe='')}"
    while True:
        task = client.call("GET", url)
        if task["state"] in ("succeeded", "failed", "timed_out", "cancelled", "lost"):
            if task["reason"] and task["state"] != "succeeded":
                print(
                    f"agentnode: task {task_id} {task['state']}: {task['reason']}", file=sys.stderr
                )
            return exit_status(task)
        time.sleep(0.05)


def _wait(args: argparse.Namespace) -> int:
    client = _client(args)
    return wait_for(client, resolve_id(client, args.id))


def _kill(args: argparse.Namespace) -> int:
    client = _client(args)
    client.call("POST", _task_url(client, args.id, "/cancel"))
    return 0


def _logs(args: argparse.Namespace) -> int:
    _print_logs(args.socket, resolve_id(_client(args), args.id), follow=args.follow)
    return 0


def _print_logs(socket: Path | None, task_id: str, *, follow: bool) -> None:
    url = f"/v1/tasks/{quote(task_id, safe='')}/logs" + ("?follow=1" if follow else "")
    client = NodeClient(socket, timeout=None if follow else 30.0)
    for chunk in client.stream(url):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


def _rows(tasks: list[dict[str, Any]]) -> list[list[str]]:
    now = time.time()
    rows = []
    for t in tasks:
        stats = t.get("stats") or {}
        cpu = stats.get("cpu_user_s", 0) + stats.get("cpu_system_s", 0)
        rows.append(
            [
                t["id"][:12],
                visible(t["tenant"]),
                t["priority"],
                t["state"],
                str(t["attempt"]),
                f"{cpu:.1f}s" if stats else "-",
                f"{stats['memory_current'] >> 20}M" if stats else "-",
                f"{now - t['submitted_at']:.0f}s",
                _net(t.get("network", "none"), stats.get("network") or {}),
                visible(" ".join(t["command"]))[:40],
            ]
        )
    return rows


def _net(mode: str, counters: dict[str, int]) -> str:
    """The network mode, then bytes out and in and denied connections while it runs."""
    if not counters:
        return mode
    out = f"{mode} {format_size(counters.get('bytes_out', 0))}↑{format_size(counters.get('bytes_in', 0))}↓"
    denied = counters.get("connections_denied", 0)
    return f"{out} {denied} denied" if denied else out


_HEADER = ["ID", "TENANT", "PRIORITY", "STATE", "TRY", "CPU", "MEM", "AGE", "NET", "COMMAND"]


def tasks(
    client: NodeClient, *, limit: int | None = None, **filters: Any
) -> Iterator[dict[str, Any]]:
    """The tasks `GET /v1/tasks` lists with `filters`, fetched a page at a time (`limit`: at
    most that many)."""
    cursor = None
    left = limit
    while left is None or left > 0:
        page = min(_PAGE, left) if left is not None else _PAGE
        fields = {**filters, "limit": page, **({"cursor": cursor} if cursor else {})}
        body = client.call("GET", f"/v1/tasks?{urlencode(fields)}")
        yield from body["tasks"][:left]
        if left is not None:
            left -= len(body["tasks"])
        cursor = body["next_cursor"]
        if cursor is None:
            return


#: Tasks fetched per request when the CLI walks a list.
_PAGE = 1000


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return int(text)


def _gc(args: argparse.Namespace) -> int:
    done = _client(args).call("POST", "/v1/gc")
    print(f"removed {done['removed']} ended tasks (records, logs and workspaces)")
    return 0


def _ps(args: argparse.Namespace) -> int:
    fields: dict[str, str | int] = {"all": 1} if args.all else {}
    if args.tenant:
        fields["tenant"] = args.tenant
    if args.state:
        fields["state"] = args.state
    found = tasks(_client(args), limit=args.limit, **fields)
    rows = [_HEADER, *_rows(list(found))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def task_table(node: dict[str, Any], tasks: list[dict[str, Any]], *, width: int) -> Table:
    """`top`'s table for a terminal `width` columns wide: headers, ids and states whole from
    80 columns up (below 100, without the priority and attempt columns; the command and the
    network counters wrap in what is left; no borders, two spaces between columns, as `ps`)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(
        title=f"agentnode: {node['running']} running, {node['queued']} queued, "
        f"{node['free_cpu_millis'] / 1000:g} CPUs free",
        box=None,
        pad_edge=False,
        padding=(0, 2, 0, 0),
    )
    shown = [i for i, h in enumerate(_HEADER) if width >= 100 or h not in ("PRIORITY", "TRY")]
    for i in shown:
        h = _HEADER[i]
        wraps = h in ("NET", "COMMAND")
        t.add_column(
            h,
            no_wrap=not wraps,
            min_width={"ID": 12, "NET": 10, "COMMAND": 12}.get(h, len(h)),
            max_width=12 if h == "TENANT" else None,  # a long tenant is cut (…)
            overflow="fold" if wraps else "ellipsis",
        )
    for row in _rows(tasks):
        t.add_row(*(Text(row[i]) for i in shown))  # Text: a command's "[/x]" is no markup
    return t


def _top(args: argparse.Namespace) -> int:
    if not 0.05 <= args.interval <= 3600:
        raise UsageError(f"--interval: {args.interval:g} is out of range (0.05 to 3600 seconds)")
    from rich.console import Console
    from rich.live import Live

    client = _client(args)
    console = Console()

    def table() -> Table:
        node, tasks = client.call("GET", "/v1/node"), client.call("GET", "/v1/tasks")
        return task_table(node, tasks, width=console.width)

    if args.once:
        console.print(table())
        return 0
    with Live(table(), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(args.interval)
                live.update(table(), refresh=True)
        except KeyboardInterrupt:
            return 0
