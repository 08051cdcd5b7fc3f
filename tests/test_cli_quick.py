"""`cli_quick` parses a plain command line from the commands' own declarations, as argparse
would, and leaves every other line (help, errors, abbreviations, unrecorded option kinds) to
argparse."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentnode import cli, cli_quick
from agentnode.errors import UsageError


def _recorded(module: str) -> dict[str, cli_quick._Parser]:
    commands = cli_quick._Commands()
    try:
        importlib.import_module(module).add_parser(commands)
    except cli_quick._Unsupported:
        return {}
    return commands.parsers


#: Commands whose every declaration `cli_quick` reads (the others always go to argparse).
PLAIN = sorted(
    name for module in cli.COMMANDS for name, parser in _recorded(module).items() if parser.plain
)
#: What the top-level parser adds to every namespace (`--version`, `--debug`): the quick path
#: is taken only when nothing precedes the command, and no command reads these.
TOP = {a.dest for a in cli.build_parser(commands=False)._actions} - {"help"}


def _argparse(argv: list[str]) -> dict[str, object]:
    args = cli.build_parser(argv[0]).parse_args(argv)
    return {k: v for k, v in vars(args).items() if k not in TOP}


def test_exec_is_read_without_argparse() -> None:
    assert "exec" in PLAIN
    assert {"doctor", "exec"} <= set(PLAIN)


def test_every_command_module_can_be_recorded() -> None:
    """A module that asks for what only argparse has (subcommands, exclusive groups) is left
    to argparse whole; the others record without error."""
    for module, names in cli.COMMANDS.items():
        parsers = _recorded(module)
        assert not parsers or set(parsers) == set(names), module


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--", "/bin/true"],
        ["exec", "/bin/echo", "x"],
        ["exec", "--memory", "512M", "--stats", "--json", "--", "sh", "-c", "exit 3"],
        ["exec", "--workspace=/tmp", "--env", "A=1", "--env=B=2", "--cap-add", "NET_RAW", "true"],
        ["exec", "--net", "egress", "--allow", "10.0.0.0/8:443", "--allow-host", "x.io", "--"],
        ["exec", "--stats", "--", "--stats"],
        ["exec", "--", "--"],
        ["exec", "--env", "", "true"],
        ["exec", "--env", "A=1", "--env", "B", "--stats", "--", "true"],
        ["exec"],
        ["doctor", "--json"],
    ],
    ids=" ".join,
)
def test_plain_lines_parse_as_argparse_parses_them(argv: list[str]) -> None:
    quick = cli_quick.parse(cli._MODULES[argv[0]], argv)
    assert quick is not None
    assert vars(quick) == _argparse(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--help"],
        ["exec", "-h", "--", "true"],
        ["exec", "--work", "/tmp", "--", "true"],  # an abbreviation
        ["exec", "--memory", "--", "true"],  # a value missing
        ["exec", "--cpus", "-1", "--", "true"],  # a value that looks like an option
        ["exec", "--net", "bogus", "--", "true"],  # not a choice
        ["exec", "--stats=yes", "--", "true"],
        ["exec", "--bogus", "--", "true"],
        ["exec", "-", "true"],
        ["exec", "sh", "-c", "true"],  # argparse weighs -c as an option (or an abbreviation)
        ["exec", "true", "--cp"],  # ...and would refuse this one as ambiguous
        ["doctor", "x"],  # no positional to take it
        ["ps"],  # an option kind cli_quick does not record
        ["memory", "ls"],  # subcommands
    ],
    ids=" ".join,
)
def test_other_lines_are_left_to_argparse(argv: list[str]) -> None:
    assert cli_quick.parse(cli._MODULES[argv[0]], argv) is None


def _words(command: str) -> st.SearchStrategy[list[str]]:
    """Command lines of `command`: its options (exact, abbreviated, with `=`), values of every
    kind (empty, with '-', '=', choices and not), help, short options, "--" and commands."""
    parser = _recorded(cli._MODULES[command])[command]
    options = sorted(parser.options)
    choices = sorted(
        {str(c) for *_, cs in parser.options.values() if isinstance(cs, tuple) for c in cs}
    )
    value = st.sampled_from(["v", "", "-x", "-1", "a=b", "512M", "--", "/bin/true", *choices])
    option = st.sampled_from(
        [*options, "-h", "--help", "-x", "--bogus", *(o[:-2] for o in options)]
    )
    word = st.one_of(
        option,
        value,
        st.tuples(option, value).map(lambda ov: f"{ov[0]}={ov[1]}"),
        st.text(alphabet="-=ax /", max_size=5),
    )
    return st.lists(word, max_size=8).map(lambda ws: [command, *ws])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_whatever_the_quick_path_reads_argparse_reads_alike(data: st.DataObject) -> None:
    """Over random lines of every plain command: when `cli_quick` gives a namespace, argparse
    accepts the line and gives the same one (it never turns an error into a parse)."""
    argv = data.draw(st.sampled_from(PLAIN).flatmap(_words))
    quick = cli_quick.parse(cli._MODULES[argv[0]], argv)
    if quick is None:
        return
    try:
        parsed = _argparse(argv)
    except UsageError as e:
        raise AssertionError(f"{argv}: quick gave {quick}, argparse refused: {e}") from None
    assert vars(quick) == parsed, argv


def _modules_of_exec(tmp_path: Path, *args: str) -> set[str]:
    """Every module a whole `agentnode exec ARGS` process imported, as `python -m agentnode`."""
    out = tmp_path / "modules"
    code = (
        "import atexit, runpy, sys\n"
        f"atexit.register(lambda: open({str(out)!r}, 'w').write('\\n'.join(sys.modules)))\n"
        f"sys.argv = ['agentnode', 'exec', *{list(args)!r}]\n"
        "runpy.run_module('agentnode', run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, text=True)
    assert r.returncode == 0, r.stderr
    return set(out.read_text().split())


#: What `agentnode exec -- CMD` may import beyond a bare interpreter (`python3 -c pass`):
#: the dataclasses of the one Sandbox spec (with re and enum), the extension, signal and these.
#: A new module on this path costs every exec; add it here only with its measured cost
#: (docs/design/cli-speed.md).
EXEC_MODULES = {
    "agentnode", "agentnode._lazy", "agentnode._native", "agentnode.cli", "agentnode.cli_quick",
    "agentnode.egress", "agentnode.egress.cli", "agentnode.egress.mode", "agentnode.errors",
    "agentnode.isolation", "agentnode.isolation.cli", "agentnode.isolation.launch",
    "agentnode.isolation.spec", "agentnode.isolation.task", "agentnode.isolation.units",
    "__future__", "_collections", "_functools", "_operator", "_sre", "_thread", "_weakrefset",
    "atexit", "collections", "collections.abc", "copy", "copyreg", "dataclasses", "enum",
    "functools", "importlib", "importlib._bootstrap", "importlib._bootstrap_external", "inspect", "itertools", "keyword", "math", "operator", "re",
    "re._casefix", "re._compiler", "re._constants", "re._parser", "reprlib", "signal", "types",
    "warnings", "weakref",
    # `python -m`'s own (the console script does without): runpy and what it imports.
    "runpy", "importlib.machinery", "importlib.util", "importlib._abc", "contextlib",
}  # fmt: skip


@pytest.mark.root
def test_exec_imports_only_what_a_start_needs(tmp_path: Path) -> None:
    """`agentnode exec -- /bin/true` imports no module beyond `EXEC_MODULES` (argparse,
    pathlib, the egress rule parser, threading, typing stay out); rules load the parser."""
    env_modules = subprocess.run(
        [sys.executable, "-c", "import sys; print('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    ws = tmp_path / "ws"
    ws.mkdir()
    extra = _modules_of_exec(tmp_path, "--workspace", str(ws), "--", "/bin/true")
    extra -= set(env_modules)
    assert extra <= EXEC_MODULES, sorted(extra - EXEC_MODULES)
    for absent in ("argparse", "pathlib", "agentnode.egress.policy", "threading", "typing"):
        assert absent not in extra
    with_rules = _modules_of_exec(tmp_path, "--allow", "127.0.0.1:80", "--", "/bin/true")
    assert "agentnode.egress.policy" in with_rules


def test_quick_path_errors_are_argparse_errors() -> None:
    """A line the quick path leaves alone still gets argparse's one-line error and exit 2."""
    r = subprocess.run(
        [sys.executable, "-m", "agentnode", "exec", "--net", "bogus", "--", "true"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "argument --net: invalid choice: 'bogus'" in r.stderr
