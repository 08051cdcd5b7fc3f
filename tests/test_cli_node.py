"""The node's CLI (`submit`, `ps`, `logs`, `wait`, `kill`, `egress`) against a real daemon: ids
by unique prefix, `submit --attach`, and ids that cannot reach another route."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from support.node_daemon import Daemon, daemon


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("node"), "[node]\ngrace = 0.5\n") as d:
        yield d


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli([args[0], "--socket", str(d.socket), *args[1:]])


def one_error(r: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("agentnode: error: "), r.stderr
    assert needle in r.stderr, r.stderr


def test_every_id_command_takes_the_prefix_ps_shows(node: Daemon) -> None:
    task = node.submit(["sh", "-c", "echo started; sleep 30"])
    short = task["id"][:12]
    node.wait(task["id"], states=("running",))
    assert short in cli(node, "ps").stdout
    # The node answered for the whole id (this task has no network to change).
    one_error(cli(node, "egress", short), 1, f"task {task['id']} runs with network none")
    assert cli(node, "kill", short).returncode == 0
    w = cli(node, "wait", short[:6].upper())
    assert w.returncode == 130, w.stderr
    assert cli(node, "logs", short).stdout == "started\n"


def test_an_ambiguous_prefix_is_refused_and_names_the_fix(node: Daemon) -> None:
    ids = [node.submit(["true"])["id"] for _ in range(17)]  # 17 ids share a first digit
    first, _ = Counter(i[0] for i in ids).most_common(1)[0]
    for command in ("logs", "wait", "kill"):
        one_error(cli(node, command, first), 2, "is ambiguous")
    one_error(cli(node, "egress", first), 2, "give more characters")


@pytest.mark.parametrize(
    ("text", "code", "needle"),
    [
        ("ffffffffffff", 1, "no task 'ffffffffffff'"),
        ("f" * 32, 1, "no task"),
        ("../node", 2, "is not a task id"),
        ("a/b", 2, "is not a task id"),
        ("%2e%2e", 2, "is not a task id"),
        ("", 2, "is not a task id"),
        ("abc?all=1", 2, "is not a task id"),
    ],
)
def test_an_unknown_or_malformed_id_is_one_line(
    node: Daemon, text: str, code: int, needle: str
) -> None:
    for command in ("logs", "wait", "kill", "egress"):
        one_error(cli(node, command, text), code, needle)


def test_submit_attach_prints_the_output_and_exits_with_the_status(node: Daemon) -> None:
    r = cli(node, "submit", "-a", "--", "sh", "-c", "echo hello; echo oops >&2; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == "hello\noops\n", "stdout carries the task's output alone"
    lines = r.stderr.splitlines()
    assert lines[0].startswith("agentnode: task ") and "exited with code 3" in lines[1]
    ok = cli(node, "submit", "--attach", "--", "echo", "hello")
    assert (ok.returncode, ok.stdout) == (0, "hello\n"), ok.stderr


def test_submit_prints_the_id_on_a_line_of_its_own(node: Daemon) -> None:
    r = cli(node, "submit", "--wait", "--", "sh", "-c", "exit 4")
    assert r.returncode == 4
    assert r.stdout.endswith("\n") and len(r.stdout.strip()) == 32, r.stdout
    assert r.stderr.startswith("agentnode: task ") and "\n" in r.stderr


def test_ps_tenant_is_escaped_into_the_query(node: Daemon, tmp_path: Path) -> None:
    node.submit(["true"], tenant="alpha")
    r = cli(node, "ps", "--all", "--tenant", "alpha&all=0")
    assert r.returncode == 0 and r.stdout.splitlines() == [r.stdout.splitlines()[0]], r.stdout


@pytest.mark.parametrize(
    "option",
    [
        ["--memory", "12Q"],
        ["--memory", str(2**70)],
        ["--timeout", "never"],
        ["--timeout", "99999999999999999999999h"],
        ["--pids", "-1"],
        ["--cpu-weight", "0"],
        ["--tmp-size", "0"],
        ["--user", "nobody:x"],
        ["--cap-add", "bogus"],
        ["--cwd", "relative"],
    ],
    ids=" ".join,
)
def test_a_submit_the_node_refuses_is_a_usage_error(node: Daemon, option: list[str]) -> None:
    """What only the node checks still reads as the CLI's own usage error (exit 2)."""
    r = cli(node, "submit", *option, "--", "true")
    assert r.stdout == ""
    one_error(r, 2, option[0].lstrip("-").replace("-", "_").split("_")[0])


#: Commands a tenant may submit that a terminal would take for its own: markup rich reads,
#: escapes that redraw or retitle it, a newline that forges a line of the printer's own.
HOSTILE = [
    ["sh", "-c", "sleep 30", "[/nope]", "[link=http://x]x[/link]"],
    ["sh", "-c", "sleep 30", "\x1b]0;owned\x07\x1b[2J"],
    ["sh", "-c", "sleep 30", "x\n00:00:00.000  tool_call     fake -> ok in 1 ms"],
]


def test_what_a_task_names_never_drives_the_operators_terminal(node: Daemon) -> None:
    # ps, top and the timeline print commands and argv a tenant chose: each is shown, with
    # its control characters as escapes, and neither crashes the view nor adds a line.
    tasks = [node.submit(command) for command in HOSTILE]
    for t in tasks:
        node.wait(t["id"], states=("running",))
    try:
        for view in (["ps"], ["top", "--once"]):
            r = cli(node, *view)
            assert r.returncode == 0 and r.stderr == "", (view, r.stderr)
            assert "\x1b" not in r.stdout and "\x07" not in r.stdout, view
            rows = [line for line in r.stdout.splitlines() if any(
                t["id"][:12] in line for t in tasks)]  # fmt: skip
            assert len(rows) == len(tasks), (view, r.stdout)
        assert "[/nope]" in cli(node, "ps").stdout
        for t in tasks:
            r = cli(node, "timeline", t["id"])
            assert r.returncode == 0 and "\x1b" not in r.stdout, r.stderr
            assert not any(" fake -> " in line and "exec" not in line
                           for line in r.stdout.splitlines()), r.stdout  # fmt: skip
    finally:
        for t in tasks:
            cli(node, "kill", t["id"])
