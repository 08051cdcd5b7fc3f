"""CLI usage errors are one clean line with exit 2; no tracebacks."""

from __future__ import annotations

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
