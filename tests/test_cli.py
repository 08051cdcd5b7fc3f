"""CLI usage errors are one clean line with exit 2; no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "a command is required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["doctor", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    r = run_cli(args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("agentnode: error: ")
    assert needle in lines[0]
    assert "--help" in lines[0]
    assert "Traceback" not in r.stderr


def test_help_lists_doctor() -> None:
    r = run_cli(["--help"])
    assert r.returncode == 0
    assert "doctor" in r.stdout


def test_version() -> None:
    r = run_cli(["--version"])
    assert r.returncode == 0
    assert r.stdout.startswith("agentnode ")


def test_command_table_names_every_command_its_modules_add() -> None:
    """cli.COMMANDS says which module adds which command (and lists them for --help without
    importing them); a stale entry would hide a command or list one that is not there."""
    import argparse
    import importlib

    from agentnode import cli

    for module, names in cli.COMMANDS.items():
        parser = cli.ArgumentParser(prog="agentnode")
        sub = parser.add_subparsers(parser_class=cli.ArgumentParser)
        importlib.import_module(module).add_parser(sub)
        assert isinstance(sub, argparse._SubParsersAction)
        assert sorted(sub.choices) == sorted(names), module
    listed = cli.build_parser()
    sub = next(a for a in listed._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(n for names in cli.COMMANDS.values() for n in names)


def test_a_command_imports_only_its_own_layer() -> None:
    """`agentnode proxy` loads neither the Rust extension nor the other layers' modules."""
    code = (
        "import sys; from agentnode import cli; cli.build_parser('proxy'); "
        "print(sorted(m for m in sys.modules if m.startswith('agentnode.') and "
        "m.split('.')[1] not in ('cli', 'cli_parser', 'cli_quick', 'errors', 'inference', '_lazy')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


HEAVY = ("aiohttp", "dns", "litellm", "uvloop", "prometheus_client", "rocksdict", "asyncio")
# Standard modules of a few milliseconds each that the quick commands leave alone: typing (the
# hints are the checker's), shutil (it brings bz2 and lzma), http.client with email and ssl (the
# node is spoken to by node.unixhttp), inspect's dis (inspect stays the stand-in cli puts in
# for dataclasses: a dataclass without a docstring would load it); exec also json. A stream
# (`logs`) keeps http.client.
LIGHT = ("typing", "shutil", "http", "email", "ssl", "dis")


def _imported_by(args: list[str], tmp_path: Path) -> set[str]:
    """Top-level packages a whole `agentnode ARGS` run imported (read at interpreter exit)."""
    out = tmp_path / "modules"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(out)!r}, 'w').write("
        "'\\n'.join(sorted({m.partition('.')[0] for m in sys.modules}))))\n"
        "from agentnode.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    return set(out.read_text().split())


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "--", "/bin/true"],
        ["--version"],
        ["--help"],
        ["ps", "--socket", "/nonexistent/api.sock"],
        ["submit", "--socket", "/nonexistent/api.sock", "--", "true"],
        ["logs", "--socket", "/nonexistent/api.sock", "abc"],
    ],
    ids=" ".join,
)
def test_commands_do_not_import_the_servers(args: list[str], tmp_path: Path) -> None:
    """The CLI answers in milliseconds: `exec`, `ps`, `submit`, `--help` never load aiohttp,
    dnspython, the LLM stack, uvloop or even asyncio (each costs tens of milliseconds), nor
    the standard modules of a few milliseconds they can do without (`LIGHT`)."""
    if args[0] == "exec" and os.geteuid() != 0:
        pytest.skip("exec needs root")
    modules = _imported_by(args, tmp_path)
    assert "agentnode" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    if args[0] != "logs":
        light = {*LIGHT, "json"} if args[0] == "exec" else set(LIGHT)
        assert not modules & light, sorted(modules & light)


def test_exec_with_a_network_still_finds_its_dns_forwarder(tmp_path: Path) -> None:
    """dnspython loads when a task needs the forwarder, not before: name rules still work."""
    if os.geteuid() != 0:
        pytest.skip("exec needs root")
    modules = _imported_by(["exec", "--allow-host", "localhost:80", "--", "/bin/true"], tmp_path)
    assert "dns" in modules


def test_a_reader_that_left_ends_the_command_quietly() -> None:
    """`agentnode doctor | head -1`: output to a closed pipe is no error to report."""
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "wb") as out:
        p = subprocess.run(
            [sys.executable, "-m", "agentnode", "doctor"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert (p.returncode, p.stderr) == (141, "")


@pytest.mark.parametrize("width", [80, 100, 160])
def test_top_fits_the_terminal_with_whole_headers_and_ids(width: int) -> None:
    import time

    from rich.console import Console

    from agentnode.node.commands import task_table

    stats = {"cpu_user_s": 1.2, "cpu_system_s": 0.3, "memory_current": 50 << 20}
    net = {"bytes_out": 123456, "bytes_in": 9876543, "connections_denied": 3}
    tasks: list[dict[str, Any]] = [
        {"id": f"{i:x}" * 32, "tenant": "a-rather-long-tenant-name", "priority": "normal",
         "state": state, "attempt": 1, "submitted_at": time.time() - 100, "network": "egress",
         "command": ["python", "-m", "agent", "--goal", "write a long report"],
         "stats": {**stats, "network": net} if state == "running" else None}
        for i, state in enumerate(["running", "queued", "starting"], start=10)
    ]  # fmt: skip
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(task_table({"running": 1, "queued": 1, "free_cpu_millis": 1500}, tasks,
                             width=width))  # fmt: skip
    console.file.close()
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), text
    header = lines[1].split()
    assert header[0] == "ID" and "STATE" in header and "COMMAND" in header, text
    assert ("PRIORITY" in header) == (width >= 100)
    for t in tasks:
        assert t["id"][:12] in text and t["state"] in text
