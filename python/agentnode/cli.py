"""The `agentnode` command: one entry point with subcommands.

Errors are one line, `agentnode: error: <what> (<what to do>)`; exit 2 for usage errors, 1 for
runtime errors; a traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from agentnode import __version__, doctor
from agentnode.errors import AgentnodeError, UsageError
from agentnode.inference import command as inference_command
from agentnode.isolation import cli as isolation_cli
from agentnode.node import commands as node_commands
from agentnode.node import daemon
from agentnode.storage import serve as memory_serve

__all__ = ["ArgumentParser", "main"]

# Each command module contributes its subcommands; later layers add themselves here.
COMMANDS: list[Callable[[argparse._SubParsersAction[ArgumentParser]], None]] = [
    doctor.add_parser,
    daemon.add_parser,
    node_commands.add_parsers,
    isolation_cli.add_parser,
    memory_serve.add_parser,
    inference_command.add_parser,
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with agentnode's one-line usage errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="agentnode",
        description="Run autonomous AI agents on this host safely, fairly and fast.",
    )
    parser.add_argument("--version", action="version", version=f"agentnode {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors (for bug reports)"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=ArgumentParser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere before "--" (after it, words belong to the task's command).
    end = args_list.index("--") if "--" in args_list else len(args_list)
    debug = "--debug" in args_list[:end]
    args_list = [a for a in args_list[:end] if a != "--debug"] + args_list[end:]
    try:
        args = build_parser().parse_args(args_list)
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            raise UsageError("a command is required (see 'agentnode --help')")
        return func(args)
    except UsageError as e:
        if debug:
            raise
        print(f"agentnode: error: {e}", file=sys.stderr)
        return 2
    except AgentnodeError as e:
        if debug:
            raise
        print(f"agentnode: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug:
            raise
        print(
            f"agentnode: error: internal error: {type(e).__name__}: {e} "
            "(rerun with --debug and report the traceback)",
            file=sys.stderr,
        )
        return 1
