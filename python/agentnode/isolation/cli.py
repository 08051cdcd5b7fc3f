"""`agentnode exec [options] -- CMD ARGS...`: run one command isolated and exit with its status.

Exit status: the task's code; 128+N when killed by signal N; 124 on --timeout, 250 when killed
for running out of memory, 251 when it failed at the pids limit (each with a one-line reason).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from agentnode.egress import cli as egress_cli
from agentnode.errors import UsageError
from agentnode.isolation.task import ExitReason, Limits, Mount, Result, Stdio, spawn
from agentnode.isolation.units import (
    format_size,
    parse_bind,
    parse_duration,
    parse_env,
    parse_size,
)

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["EXIT_OOM", "EXIT_PIDS", "EXIT_TIMEOUT", "add_parser", "run"]

EXIT_TIMEOUT = 124
EXIT_OOM = 250
EXIT_PIDS = 251


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `exec` to the CLI."""
    p = sub.add_parser(
        "exec",
        description="Run CMD isolated and exit with its status (124 timeout, 250 OOM, 251 pids limit).",
    )
    p.add_argument("--cpus", metavar="N", help="CPU time limit in CPUs, e.g. 0.5")
    p.add_argument("--cpu-weight", metavar="W", help="relative CPU weight 1..10000 (default 100)")
    p.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 512M")
    p.add_argument("--memory-high", metavar="SIZE", help="memory throttling threshold (cgroup v2)")
    p.add_argument("--swap", metavar="SIZE", help="swap limit on top of --memory")
    p.add_argument("--pids", metavar="N", help="maximum number of processes")
    p.add_argument("--tmp-size", metavar="SIZE", default="64M", help="size of /tmp (default 64M)")
    p.add_argument("--timeout", metavar="DURATION", help="kill the task after this, e.g. 30s")
    p.add_argument("--user", default="65534", metavar="UID[:GID]", help="default 65534 (nobody)")
    p.add_argument(
        "--userns", action="store_true", help="also isolate users (task root unprivileged)"
    )
    p.add_argument(
        "--cap-add", action="append", default=[], metavar="CAP", help="keep this capability"
    )
    p.add_argument(
        "--rootfs", default="/", metavar="DIR", help="root file system (default: host, read-only)"
    )
    p.add_argument(
        "--ro", action="append", default=[], metavar="HOST[:DEST]", help="bind read-only"
    )
    p.add_argument(
        "--rw", action="append", default=[], metavar="HOST[:DEST]", help="bind read-write"
    )
    p.add_argument("--workspace", metavar="DIR", help="host directory mounted at /workspace")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable")
    p.add_argument(
        "--cwd", default="/workspace", metavar="DIR", help="working directory in the task"
    )
    p.add_argument("--hostname", default="agentnode")
    p.add_argument("--log-dir", metavar="DIR", help="write stdout and stderr to files in DIR")
    p.add_argument("--stats", action="store_true", help="print accounting to stderr at exit")
    p.add_argument("--json", action="store_true", help="with --stats: as one JSON line")
    egress_cli.add_arguments(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    p.set_defaults(func=run)


def _int(text: str | None, option: str, lo: int, hi: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise UsageError(f"{option}: {value} is out of range ({lo} to {hi})")
    return value


def _binds(specs: list[str], *, writable: bool) -> list[Mount]:
    option = "--rw" if writable else "--ro"
    return [Mount(*parse_bind(spec, option=option), writable) for spec in specs]


def _limits(args: argparse.Namespace) -> Limits:
    cpus = None
    if args.cpus is not None:
        try:
            cpus = float(args.cpus)
        except ValueError:
            raise UsageError(f"--cpus: {args.cpus!r} is not a number (example: 0.5)") from None
        if not 0.01 <= cpus <= 1024:
            raise UsageError(f"--cpus: {args.cpus} is out of range (0.01 to 1024)")

    def size(v: str | None, opt: str) -> int | None:
        return None if v is None else parse_size(v, option=opt)

    return Limits(
        cpus=cpus,
        cpu_weight=_int(args.cpu_weight, "--cpu-weight", 1, 10000),
        memory=size(args.memory, "--memory"),
        memory_high=size(args.memory_high, "--memory-high"),
        swap=size(args.swap, "--swap"),
        pids=_int(args.pids, "--pids", 1, 4_194_304),
        tmp_size=parse_size(args.tmp_size, option="--tmp-size"),
        timeout=None if args.timeout is None else parse_duration(args.timeout, option="--timeout"),
    )


def _reason_line(result: Result, limits: Limits) -> str | None:
    if result.reason is ExitReason.TIMEOUT:
        return f"task killed: timeout after {limits.timeout:g}s"
    if result.reason is ExitReason.OOM:
        limit = format_size(limits.memory) if limits.memory else "the host's"
        return f"task killed: out of memory (memory limit {limit})"
    if result.reason is ExitReason.PIDS:
        return f"task stopped at the pids limit ({limits.pids} processes)"
    return None


def run(args: argparse.Namespace) -> int:
    """Runs `agentnode exec`."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("exec: a command is required after -- (e.g. agentnode exec -- /bin/true)")
    limits = _limits(args)
    env = parse_env(args.env)
    mode, policy = egress_cli.network_from_args(args)
    if not os.path.isdir(args.rootfs):
        raise UsageError(
            f"--rootfs: {args.rootfs!r} is not a directory (give a root file system tree)"
        )
    if args.workspace is not None and not os.path.isdir(args.workspace):
        raise UsageError(f"--workspace: {args.workspace!r} is not a directory (create it first)")
    stdout: Stdio = "inherit"
    stderr: Stdio = "inherit"
    if args.log_dir is not None:
        log_dir = Path(args.log_dir)
        if not log_dir.is_dir():
            raise UsageError(f"--log-dir: {args.log_dir!r} is not a directory (create it first)")
        stdout, stderr = log_dir / "stdout.log", log_dir / "stderr.log"
    task = spawn(
        command,
        limits=limits,
        mounts=_binds(args.ro, writable=False) + _binds(args.rw, writable=True),
        env=env,
        cwd=args.cwd,
        user=args.user,
        userns=args.userns,
        rootfs=args.rootfs,
        workspace=args.workspace,
        hostname=args.hostname,
        stdout=stdout,
        stderr=stderr,
        caps=args.cap_add,
        network=mode,
        egress=policy,
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        task.signal(signum)

    previous = {
        s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        result = task.wait()
        while result is None:
            result = task.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        task.close()
    line = _reason_line(result, limits)
    if line is not None:
        print(f"agentnode: {line}", file=sys.stderr)
    if args.stats:
        data = {"code": result.code, "signal": result.signal, "reason": result.reason.value}
        stats = asdict(result.stats)
        data |= {f"net_{k}": v for k, v in stats.pop("network").items()} | stats
        if args.json:
            print(json.dumps(data), file=sys.stderr)
        else:
            print(" ".join(f"{k}={v}" for k, v in data.items()), file=sys.stderr)
    return {
        ExitReason.TIMEOUT: EXIT_TIMEOUT,
        ExitReason.OOM: EXIT_OOM,
        ExitReason.PIDS: EXIT_PIDS,
    }.get(result.reason, result.exit_status)
