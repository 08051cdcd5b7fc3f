"""The README's and the docs' examples stay true: every Python block compiles, every `agentnode`
command line parses with the real CLI, and the README's tour runs for real."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from agentnode.cli import build_parser
from conftest import run_cli
from support.node_daemon import daemon

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "SECURITY.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(page.read_text()) if kind == lang]


def readme_block(start: str) -> str:
    """The README's Python block that begins with `start`."""
    return next(b for b in blocks(REPO / "README.md", "python") if b.startswith(start))


def command_lines() -> list[tuple[str, str]]:
    """(page, line) for each `agentnode …` line of the sh blocks, without its comment; synopses
    with [optional] parts or ellipses are prose, not commands."""
    found = []
    for page in PAGES:
        for body in blocks(page, "sh"):
            for raw in body.replace("\\\n", " ").splitlines():
                line = raw.split(" # ")[0].split("  #")[0].strip()
                if line.startswith("agentnode ") and not re.search(r"[\[…|]|\.\.\.", line):
                    found.append((page.name, line))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_python_blocks_compile(page: Path) -> None:
    for i, body in enumerate(blocks(page, "python")):
        compile(body, f"{page.name}:python[{i}]", "exec")


@pytest.mark.parametrize(("page", "line"), command_lines())
def test_command_lines_parse(page: str, line: str) -> None:
    words = shlex.split(line)[1:]
    build_parser(words[0]).parse_args(words)


def test_there_are_examples_to_check() -> None:
    assert len(command_lines()) >= 8
    assert sum(len(blocks(p, "python")) for p in PAGES) >= 8


@pytest.mark.root
def test_the_tour_exec_runs() -> None:
    line = next(line for _, line in command_lines() if line.startswith("agentnode exec --memory"))
    r = run_cli(shlex.split(line)[1:])
    assert (r.returncode, r.stdout, r.stderr) == (0, "65534\n", "")


@pytest.mark.root
def test_the_tour_spawn_runs() -> None:
    code = readme_block("from agentnode.isolation import")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "1\n0\n"), out.stderr


@pytest.mark.root
def test_the_tour_memory_runs_in_a_task(tmp_path: Path) -> None:
    code = readme_block("import os\n\nfrom agentnode.sdk import Memory")
    with daemon(tmp_path) as d:
        task = d.submit(
            [sys.executable, "-c", code],
            user="0",
            memory="128M",
            cpus=0.5,
            ro=[str(REPO)],
            env={"PYTHONPATH": str(REPO / "python")},
        )
        done = d.wait(task["id"], timeout=60)
        log = d.log(task["id"])
    assert done["state"] == "succeeded", log
    assert "'title': 'A'" in log
