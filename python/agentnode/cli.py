"""The `agentnode` command: one entry point with subcommands.

Errors are one line, `agentnode: error: <what> (<what to do>)`; exit 2 for usage errors, 1 for
runtime errors; a traceback only with `--debug`.
"""

from __future__ import annotations

import os
import sys
import types

from agentnode import cli_quick
from agentnode.errors import AgentnodeError, UsageError

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from agentnode.cli_parser import ArgumentParser as ArgumentParser

__all__ = ["ArgumentParser", "build_parser", "main"]


def __getattr__(name: str) -> object:
    # argparse loads only for a command line `cli_quick` leaves to it (docs/design/cli-speed.md).
    if name == "ArgumentParser":
        from agentnode.cli_parser import ArgumentParser

        return ArgumentParser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Each command module's `add_parser` adds the commands named here; later layers add themselves
# here. A module is imported only when one of its commands runs: importing every layer cost
# each command ~10 MiB and the start-up of layers it never uses (`agentnode proxy` idled at
# 62 MiB, 52 MiB with its own imports only), and `--help` lists the commands from this table
# alone (importing every module for it took ~100 ms of CPU).
COMMANDS: dict[str, dict[str, str]] = {
    "agentnode.doctor": {"doctor": "check this host for every capability the node needs"},
    "agentnode.node.daemon": {
        "run": "run the node agent (foreground; SIGTERM stops it gracefully)"
    },
    "agentnode.node.commands": {
        "submit": "queue a task on the node",
        "egress": "change a task's egress rules",
        "ps": "list tasks",
        "gc": "remove ended tasks past their retention now",
        "logs": "print a task's output",
        "wait": "wait for a task and exit with its status",
        "kill": "cancel a task",
        "top": "live table of tasks",
    },
    "agentnode.isolation.cli": {
        "exec": "run a command isolated (namespaces, cgroup limits, seccomp)"
    },
    "agentnode.storage.cli": {"memory": "agent memory: episodic records, objects and vectors"},
    "agentnode.inference.command": {"proxy": "run the OpenAI/Anthropic-compatible inference proxy"},
    "agentnode.tools.cli": {"tool": "list and call the node's tools (built-ins and MCP servers)"},
    "agentnode.audit.cli": {
        "audit": "check the node's hash-chained audit log",
        "timeline": "a task's ordered record: states, execs, LLM and tool calls, denials",
    },
    "agentnode.agents.cli": {"agents": "install agent runtimes (OpenClaw)"},
    "agentnode.runtime.cli": {"agent": "run the reference agent runtime on TASK TEXT as a task"},
    "agentnode.runtime.demo": {"demo": "the whole stack offline in under a minute (as root)"},
}


def build_parser(command: str | None = None, *, commands: bool = True) -> ArgumentParser:
    """The CLI's parser: with `command`'s module and so its options, or, for no or an unknown
    command, every command by name and summary only (for --help and the error naming them),
    or (not `commands`) none: `agentnode --version` needs no command."""
    import importlib

    from agentnode.cli_parser import ArgumentParser, Version

    parser = ArgumentParser(
        prog="agentnode",
        description="Run autonomous AI agents on this host safely, fairly and fast.",
    )
    parser.add_argument("--version", action=Version)
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors (for bug reports)"
    )
    if not commands:
        return parser
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=ArgumentParser)
    for module, names in COMMANDS.items():
        if command in names:
            importlib.import_module(module).add_parser(sub)
        elif command not in _NAMES:
            for name, summary in names.items():
                sub.add_parser(name, help=summary)
    return parser


def _with_hint(message: str, command: str | None) -> str:
    """`message`, ending in what to do: the command's help unless it already says."""
    if message.endswith(")"):
        return message
    return f"{message} (see 'agentnode {command + ' ' if command in _NAMES else ''}--help')"


#: The module of each command.
_MODULES = {name: module for module, names in COMMANDS.items() for name in names}
_NAMES = frozenset(_MODULES)


def _defer_inspect() -> None:
    """Makes `inspect` load on first use. dataclasses imports it (with ast, dis and tokenize:
    ~6 ms of CPU, a tenth of a quick command) for one thing only, the signature it writes into
    the docstring of a dataclass that has none; the commands' dataclasses all have one
    (test_cli checks that `exec`, `ps`, `submit` never load it). Not importlib's LazyLoader:
    an `import inspect` of a module it made already loads it (the import reads `__spec__`)."""
    if "inspect" in sys.modules:
        return
    stub = types.ModuleType("inspect", "Stands in for the inspect module until first used.")

    def load(name: str) -> object:
        if sys.modules.get("inspect") is stub:
            del sys.modules["inspect"]
        import importlib

        real = importlib.import_module("inspect")
        # Whoever imported the stand-in (dataclasses) holds it: it becomes the real one's copy.
        stub.__dict__.update(real.__dict__)
        stub.__dict__.pop("__getattr__", None)
        return getattr(real, name)

    stub.__dict__["__getattr__"] = load
    sys.modules["inspect"] = stub


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns its exit code."""
    _defer_inspect()
    args_list = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere before "--" (after it, words belong to the task's command).
    end = args_list.index("--") if "--" in args_list else len(args_list)
    debug = "--debug" in args_list[:end]
    # Options before the command take no value, so the first other word names it.
    command = next((a for a in args_list[:end] if not a.startswith("-")), None)
    args_list = [a for a in args_list[:end] if a != "--debug"] + args_list[end:]
    try:
        # A plain command line (nothing before the command, only options it declares) is
        # parsed from the same declarations without argparse.
        quick = None
        if command in _NAMES and args_list[0] == command:
            quick = cli_quick.parse(_MODULES[command], args_list)
        if quick is not None:
            # The commands only read the namespace's attributes, which are argparse's own.
            args: argparse.Namespace = quick  # type: ignore[assignment]
        else:
            words = set(args_list[:end])
            bare = command is None and "--version" in words and not {"-h", "--help"} & words
            args = build_parser(command, commands=not bare).parse_args(args_list)
        # The command line is this process's own (not a caller's in-process `main(argv)`): a
        # command may then act for the whole process (`exec` makes nothing ahead).
        args.own_process = argv is None
        args.debug = debug
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            raise UsageError("a command is required (see 'agentnode --help')")
        return func(args)
    except UsageError as e:
        # Never a traceback, even with --debug: the command line is wrong, not agentnode.
        print(f"agentnode: error: {_with_hint(str(e), command)}", file=sys.stderr)
        return 2
    except AgentnodeError as e:
        if debug:
            raise
        print(f"agentnode: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`agentnode ps | head`): exit quietly, as a killed-by-SIGPIPE
        # command does, and keep the interpreter's last flush off the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        # The host refused something (a path, a permission, a port): not a bug to report.
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(
            f"agentnode: error: {e.strerror or e}{where} (check the path and its permissions)",
            file=sys.stderr,
        )
        return 1
    except Exception as e:
        if debug:
            raise
        print(
            f"agentnode: error: internal error: {type(e).__name__}: {e} "
            "(rerun with --debug and report the traceback)",
            file=sys.stderr,
        )
        return 1
