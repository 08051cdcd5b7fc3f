"""The `agentnode` command: one entry point with subcommands.

Errors are one line, `agentnode: error: <what> (<what to do>)`; exit 2 for usage errors, 1 for
runtime errors; a traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from agentnode.errors import AgentnodeError, UsageError

__all__ = ["ArgumentParser", "main"]

# Each command module's `add_parser` adds the subcommands named here; later layers add
# themselves here. A module is imported only when one of its commands runs (all of them for
# --help): importing every layer cost each command ~10 MiB and the start-up of layers it never
# uses (`agentnode proxy` idled at 62 MiB, 52 MiB with its own imports only).
COMMANDS: dict[str, tuple[str, ...]] = {
    "agentnode.doctor": ("doctor",),
    "agentnode.node.daemon": ("run",),
    "agentnode.node.commands": ("submit", "egress", "ps", "logs", "wait", "kill", "top"),
    "agentnode.isolation.cli": ("exec",),
    "agentnode.storage.serve": ("memory",),
    "agentnode.inference.command": ("proxy",),
    "agentnode.agents.cli": ("agents",),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with agentnode's one-line usage errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Version(argparse.Action):
    """--version, which loads the version (from the Rust extension) only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from agentnode import __version__

        print(f"agentnode {__version__}")
        parser.exit()


def build_parser(command: str | None = None) -> ArgumentParser:
    """The CLI's parser, with every command, or only the module that provides `command`."""
    parser = ArgumentParser(
        prog="agentnode",
        description="Run autonomous AI agents on this host safely, fairly and fast.",
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors (for bug reports)"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=ArgumentParser)
    known = any(command in names for names in COMMANDS.values())
    for module, names in COMMANDS.items():
        if not known or command in names:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere before "--" (after it, words belong to the task's command).
    end = args_list.index("--") if "--" in args_list else len(args_list)
    debug = "--debug" in args_list[:end]
    # Options before the command take no value, so the first other word names it.
    command = next((a for a in args_list[:end] if not a.startswith("-")), None)
    args_list = [a for a in args_list[:end] if a != "--debug"] + args_list[end:]
    try:
        args = build_parser(command).parse_args(args_list)
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
