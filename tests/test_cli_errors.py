"""Every CLI error is one line, `agentnode: error: <what> (<what to do>)`, with exit 2 for a
malformed command line and 1 for everything else: no traceback, no `internal error:`, no raw
HTTP status, no Rust panic. Walks bad invocations of every subcommand."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agentnode import cli
from conftest import run_cli

NOSOCK = ["--socket", "/nonexistent/agentnode/api.sock"]
#: One line; the what-to-do in parentheses at its end.
LINE = re.compile(r"agentnode: error: [^\n]+\([^\n]+\)\n")

USAGE: list[list[str]] = [
    [],
    ["frobnicate"],
    ["--bogus"],
    ["--debug"],
    ["doctor", "--bogus"],
    ["doctor", "extra"],
    # exec: every option's bad values, and numbers past what the kernel takes
    ["exec"],
    ["exec", "--"],
    ["exec", "--cpus", "abc", "--", "true"],
    ["exec", "--cpus", "0", "--", "true"],
    ["exec", "--cpus", "nan", "--", "true"],
    ["exec", "--cpus", "inf", "--", "true"],
    ["exec", "--cpu-weight", "0", "--", "true"],
    ["exec", "--cpu-weight", "1e3", "--", "true"],
    ["exec", "--memory", "12Q", "--", "true"],
    ["exec", "--memory", "0", "--", "true"],
    ["exec", "--memory", "99999999999999999999999G", "--", "true"],
    ["exec", "--memory-high", "-1M", "--", "true"],
    ["exec", "--swap", "lots", "--", "true"],
    ["exec", "--tmp-size", str(2**66), "--", "true"],
    ["exec", "--pids", "0", "--", "true"],
    ["exec", "--pids", str(2**64), "--", "true"],
    ["exec", "--timeout", "99999999999999999999999h", "--", "true"],
    ["exec", "--timeout", "1e400s", "--", "true"],
    ["exec", "--timeout", "0", "--", "true"],
    ["exec", "--timeout", "soon", "--", "true"],
    ["exec", "--user", "abc", "--", "true"],
    ["exec", "--user", "99999999999", "--", "true"],
    ["exec", "--user", "-5", "--", "true"],
    ["exec", "--user", "1:4294967295", "--", "true"],
    ["exec", "--cap-add", "bogus", "--", "true"],
    ["exec", "--cap-add", "", "--", "true"],
    ["exec", "--rootfs", "/nonexistent", "--", "true"],
    ["exec", "--ro", "/nonexistent", "--", "true"],
    ["exec", "--ro", "", "--", "true"],
    ["exec", "--rw", "/tmp:relative", "--", "true"],
    ["exec", "--rw", "/tmp:/a/../b", "--", "true"],
    ["exec", "--workspace", "/nonexistent", "--", "true"],
    ["exec", "--log-dir", "/nonexistent", "--", "true"],
    ["exec", "--env", "NOEQUALS", "--", "true"],
    ["exec", "--env", "=x", "--", "true"],
    ["exec", "--net", "bogus", "--", "true"],
    ["exec", "--net", "none", "--allow", "192.0.2.1", "--", "true"],
    ["exec", "--allow", "1.2.3.4/99", "--", "true"],
    ["exec", "--allow", "192.0.2.0/24:70000", "--", "true"],
    ["exec", "--allow-host", "", "--", "true"],
    ["exec", "--egress-rate", "fast", "--", "true"],
    ["exec", "--conn-rate", "x", "--", "true"],
    # submit: what the CLI checks before the node sees it
    ["submit", *NOSOCK],
    ["submit", *NOSOCK, "--cpus", "x", "--", "true"],
    ["submit", *NOSOCK, "--pids", "x", "--", "true"],
    ["submit", *NOSOCK, "--priority", "urgent", "--", "true"],
    ["submit", *NOSOCK, "--retries", "x", "--", "true"],
    ["submit", *NOSOCK, "--env", "X", "--", "true"],
    ["submit", *NOSOCK, "--allow", "1.2.3.4/99", "--", "true"],
    ["submit", *NOSOCK, "--net", "none", "--allow", "192.0.2.1", "--", "true"],
    # the other node commands
    ["ps", *NOSOCK, "--bogus"],
    ["ps", *NOSOCK, "extra"],
    ["ps", *NOSOCK, "--limit", "0"],
    ["gc", *NOSOCK, "extra"],
    ["logs", *NOSOCK],
    ["logs", *NOSOCK, "a", "b"],
    ["logs", *NOSOCK, "../x"],
    ["logs", *NOSOCK, ""],
    ["wait", *NOSOCK],
    ["wait", *NOSOCK, "a/b"],
    ["kill", *NOSOCK],
    ["kill", *NOSOCK, "?all=1"],
    ["egress", *NOSOCK],
    ["egress", *NOSOCK, "abc", "--allow", "bad"],
    ["egress", *NOSOCK, "abc", "--net", "none"],
    ["top", *NOSOCK, "--interval", "x"],
    ["top", *NOSOCK, "--interval", "-1", "--once"],
    ["top", *NOSOCK, "--interval", "nan", "--once"],
    # memory and proxy
    ["memory"],
    ["memory", "bogus"],
    ["memory", "serve"],
    ["memory", "ls", *NOSOCK, "bogus"],
    ["memory", "get", *NOSOCK],
    ["memory", "get", *NOSOCK, "objects"],
    ["memory", "put", *NOSOCK, "vectors/docs"],
    ["memory", "rm", *NOSOCK, "episodic/ns/task"],
    ["memory", "search", *NOSOCK, "vectors/docs", "not json"],
    ["memory", "ls", *NOSOCK, "--tenant", "a/b"],
    ["memory", "serve", "--data-dir", "/tmp", "--tenants", "/etc/hostname", "--listen", "bad"],
    ["memory", "serve", "--data-dir", "/tmp", "--tenants", "/x", "--sweep-interval", "x"],
    ["proxy", "--listen", "bad"],
    ["proxy", "--listen", "127.0.0.1:99999"],
    ["proxy", "--bogus"],
    ["agents"],
    ["agents", "install", "nope"],
    ["agents", "status", "--bogus"],
    ["submit", *NOSOCK, "--model", "m", "--", "true"],
    ["submit", *NOSOCK, "--agent", "nope", "--", "true"],
    ["run", "--bogus"],
    ["agent", *NOSOCK],
    ["agent", *NOSOCK, "hi", "--retries", "x"],
    ["agent", *NOSOCK, "hi", "--memory", "lots"],
    ["demo", "--bogus"],
    # tools
    ["tool"],
    ["tool", "bogus"],
    ["tool", "call"],
    ["tool", "call", "run_code", *NOSOCK, "--json", "[1]"],
    ["tool", "call", "run_code", *NOSOCK, "--json", "{nope"],
    ["tool", "ls", *NOSOCK, "extra"],
    # audit and timeline
    ["audit"],
    ["audit", "bogus"],
    ["audit", "verify", "a", "b"],
    ["timeline", *NOSOCK],
    ["timeline", *NOSOCK, "a", "b"],
    ["timeline", *NOSOCK, "../x"],
    ["timeline", *NOSOCK, "--follow", "zz"],
]

RUNTIME: list[list[str]] = [
    ["ps", *NOSOCK],
    ["gc", *NOSOCK],
    ["submit", *NOSOCK, "--", "true"],
    ["logs", *NOSOCK, "abc"],
    ["wait", *NOSOCK, "abc"],
    ["kill", *NOSOCK, "abc"],
    ["egress", *NOSOCK, "abc"],
    ["top", *NOSOCK, "--once"],
    ["memory", "serve", "--data-dir", "/tmp", "--tenants", "/nonexistent"],
    ["memory", "ls", *NOSOCK],
    ["memory", "get", *NOSOCK, "objects/x"],
    ["proxy", "--config", "/nonexistent"],
    ["proxy", "--config", "/etc/passwd"],
    ["proxy", "--state-dir", "/etc/passwd", "--listen", "127.0.0.1:1"],
    ["run", "--config", "/nonexistent", "--data-dir", "/nonexistent/d", "--socket", "/x/s"],
    ["exec", "--", "/nonexistent/program"],
    ["tool", "ls", *NOSOCK],
    ["tool", "call", "run_code", *NOSOCK, "--json", '{"code": "print(1)"}'],
    ["audit", "verify", "/nonexistent/audit"],
    ["audit", "verify", "/etc/hostname"],
    ["timeline", *NOSOCK, "abc"],
    ["agents", "install", "openclaw", "--cache", "/etc/passwd"],
    ["agent", *NOSOCK, "hello"],
]


def test_every_command_is_walked() -> None:
    walked = {args[0] for args in USAGE + RUNTIME if args and not args[0].startswith("-")}
    assert walked >= {name for names in cli.COMMANDS.values() for name in names}


@pytest.mark.parametrize("args", USAGE, ids=lambda a: " ".join(a) or "(none)")
def test_usage_errors_exit_2_with_one_line(
    args: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    if args[:1] == ["exec"] and os.geteuid() != 0:
        pytest.skip("exec needs root")
    assert cli.main(args) == 2
    out, err = capfd.readouterr()
    assert LINE.fullmatch(err), err
    assert "internal error" not in err and out == ""


@pytest.mark.parametrize("args", RUNTIME, ids=" ".join)
def test_runtime_errors_exit_1_with_one_line(
    args: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    if args[:1] == ["exec"] and os.geteuid() != 0:
        pytest.skip("exec needs root")
    assert cli.main(args) == 1
    _, err = capfd.readouterr()
    assert LINE.fullmatch(err), err
    assert "internal error" not in err and "Traceback" not in err


def test_the_command_itself_answers_the_same(tmp_path: Path) -> None:
    """The same through the `agentnode` process (its own stderr, no Rust panic text)."""
    for args, code in (
        (["exec", "--timeout", "99999999999999999999999h", "--", "true"], 2),
        (["exec", "--user", "99999999999", "--", "true"], 2),
        (["--debug"], 2),
        (["ps", *NOSOCK], 1),
    ):
        r = run_cli(args)
        assert r.returncode == code and LINE.fullmatch(r.stderr), (args, r.stderr)
