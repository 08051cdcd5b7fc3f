"""`agentnode exec [options] -- CMD ARGS...`: run one command isolated and exit with its status.

Exit status: the task's code; 128+N when killed by signal N; 124 on --timeout, 250 when killed
for running out of memory, 251 when it failed at the pids limit (each with a one-line reason).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import asdict

from agentnode.cli_quick import REMAINDER
from agentnode.errors import UsageError
from agentnode.isolation.spec import Limits, Sandbox
from agentnode.isolation.task import ExitReason, Result, one_shot, spawn
from agentnode.isolation.units import format_size

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    import argparse
    from types import FrameType

    from agentnode.cli import ArgumentParser
    from agentnode.isolation.task import Stdio

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
    Sandbox.add_arguments(p)
    p.add_argument("--workspace", metavar="DIR", help="host directory mounted at /workspace")
    p.add_argument("--log-dir", metavar="DIR", help="write stdout and stderr to files in DIR")
    p.add_argument("--stats", action="store_true", help="print accounting to stderr at exit")
    p.add_argument("--json", action="store_true", help="with --stats: as one JSON line")
    p.add_argument("command", nargs=REMAINDER, metavar="-- CMD ARGS")
    p.set_defaults(func=run)


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
    sandbox = Sandbox.from_args(args)
    limits = sandbox.limits
    if args.workspace is not None and not os.path.isdir(args.workspace):
        raise UsageError(f"--workspace: {args.workspace!r} is not a directory (create it first)")
    stdout: Stdio = "inherit"
    stderr: Stdio = "inherit"
    if args.log_dir is not None:
        if not os.path.isdir(args.log_dir):
            raise UsageError(f"--log-dir: {args.log_dir!r} is not a directory (create it first)")
        stdout = os.path.join(args.log_dir, "stdout.log")
        stderr = os.path.join(args.log_dir, "stderr.log")
    if getattr(args, "own_process", False):
        one_shot()
    task = spawn(command, sandbox, workspace=args.workspace, stdout=stdout, stderr=stderr)

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
            import json  # only here: it costs every other `exec` ~1.3 ms to import

            print(json.dumps(data), file=sys.stderr)
        else:
            print(" ".join(f"{k}={v}" for k, v in data.items()), file=sys.stderr)
    return {
        ExitReason.TIMEOUT: EXIT_TIMEOUT,
        ExitReason.OOM: EXIT_OOM,
        ExitReason.PIDS: EXIT_PIDS,
    }.get(result.reason, result.exit_status)
