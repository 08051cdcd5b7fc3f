"""`agentnode memory ls/get/put/rm/search` against a real daemon: the operator on the admin
socket picks a tenant and sees only that tenant's records, objects and vectors; a task's own
token (in the task) reaches only its tenant; bad paths and names are one-line usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from support.node_daemon import Daemon, daemon


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("node")) as d:
        yield d


def mem(d: Daemon, tenant: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["memory", args[0], "--socket", str(d.socket), "--tenant", tenant, *args[1:]])


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_records_round_trip_and_stay_with_their_tenant(node: Daemon) -> None:
    rid = ok(mem(node, "alpha", "put", "episodic/notes/t1", '{"step": 1}')).strip()
    ok(mem(node, "alpha", "put", "episodic/notes/t1", '"two"', "--id", "r2"))
    assert json.loads(ok(mem(node, "alpha", "get", f"episodic/notes/t1/{rid}")))["value"] == {
        "step": 1
    }
    assert "episodic/notes/t1" in ok(mem(node, "alpha", "ls"))
    listed = ok(mem(node, "alpha", "ls", "episodic/notes/t1", "--json")).splitlines()
    assert {json.loads(line)["id"] for line in listed} == {rid, "r2"}
    # Another tenant sees none of it, by listing or by name.
    assert "notes" not in ok(mem(node, "beta", "ls"))
    r = mem(node, "beta", "get", f"episodic/notes/t1/{rid}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    ok(mem(node, "alpha", "rm", "episodic/notes/t1/r2"))
    assert mem(node, "alpha", "get", "episodic/notes/t1/r2").returncode == 1


def test_objects_round_trip_through_files_and_pipes(node: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    src.write_bytes(bytes(range(256)) * 1000)
    ok(mem(node, "alpha", "put", "objects/blob.bin", str(src)))
    out = tmp_path / "back"
    ok(mem(node, "alpha", "get", "objects/blob.bin", "-o", str(out)))
    assert out.read_bytes() == src.read_bytes()
    piped = subprocess.run(
        [sys.executable, "-m", "agentnode", "memory", "put", "--socket", str(node.socket),
         "--tenant", "alpha", "objects/piped.txt"],
        input=b"from stdin\n", capture_output=True, check=False,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert ok(mem(node, "alpha", "get", "objects/piped.txt")) == "from stdin\n"
    assert "objects/blob.bin  256000" in ok(mem(node, "alpha", "ls", "objects"))
    assert "blob.bin" not in ok(mem(node, "beta", "ls", "objects"))
    ok(mem(node, "alpha", "rm", "objects/blob.bin"))
    assert "blob.bin" not in ok(mem(node, "alpha", "ls", "objects"))


def test_vectors_create_upsert_search_and_drop(node: Daemon) -> None:
    ok(mem(node, "alpha", "put", "vectors/docs", "--dims", "3"))
    ok(mem(node, "alpha", "put", "vectors/docs/1", "[1, 0, 0]", "--metadata", '{"t": "x"}'))
    ok(mem(node, "alpha", "put", "vectors/docs/2", "[0, 1, 0]"))
    hits = [json.loads(h) for h in ok(mem(node, "alpha", "search", "vectors/docs", "[0.9, 0.1, 0]",
                                          "-k", "2", "--json")).splitlines()]  # fmt: skip
    assert [h["key"] for h in hits] == [1, 2] and hits[0]["metadata"] == {"t": "x"}
    assert json.loads(ok(mem(node, "alpha", "get", "vectors/docs/2")))["key"] == 2
    assert "vectors/docs" in ok(mem(node, "alpha", "ls", "vectors"))
    assert mem(node, "beta", "search", "vectors/docs", "[1, 0, 0]").returncode == 1
    ok(mem(node, "alpha", "rm", "vectors/docs/2"))
    ok(mem(node, "alpha", "rm", "vectors/docs"))
    assert "vectors/docs" not in ok(mem(node, "alpha", "ls", "vectors"))


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "bogus"],
        ["ls", "episodic/a/b/c/d"],
        ["get", "episodic/ns/task"],
        ["get", "objects"],
        ["get", "objects/../../v1/tasks"],
        ["get", "objects/a?x=1"],
        ["get", "vectors/docs/not-a-number"],
        ["get", "vectors/docs/-1"],
        ["put", "episodic/ns/task"],
        ["put", "episodic/ns/task", "not json"],
        ["put", "episodic/ns/task", "1", "--ttl", "nan"],
        ["put", "episodic/n s/task", "1"],
        ["put", "vectors/docs"],
        ["put", "vectors/docs", "--dims", str(1 << 66)],
        ["put", "vectors/docs", "--dims", "65537"],
        ["put", "vectors/docs/1", "[1, NaN]"],
        ["put", "vectors/docs/1", "{}"],
        ["rm", "episodic"],
        ["search", "episodic/ns", "[1]"],
        ["search", "vectors/docs", "[1]", "-k", "0"],
        ["ls", "--tenant", "bad tenant"],
    ],
    ids=" ".join,
)
def test_bad_paths_and_values_are_usage_errors(node: Daemon, args: list[str]) -> None:
    r = run_cli(["memory", args[0], "--socket", str(node.socket), *args[1:]])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("agentnode: error: "), r.stderr
    assert r.stderr.rstrip().endswith(")"), r.stderr


def test_a_task_reaches_its_own_tenant_only(node: Daemon, tmp_path: Path) -> None:
    """Inside a task, `agentnode memory` uses the task's own token: its tenant's objects, its
    own task's records, nothing of another tenant."""
    (tmp_path / "f").write_text("x")
    ok(mem(node, "gamma", "put", "objects/gamma.txt", str(tmp_path / "f")))
    ok(mem(node, "delta", "put", "objects/delta.txt", str(tmp_path / "f")))
    # As root (the venv may not be readable by nobody), the checkout bound in (as test_node).
    repo = Path(__file__).resolve().parents[1]
    agentnode = f"{sys.executable} -m agentnode memory"
    script = f'{agentnode} put "episodic/mine/$AGENTNODE_TASK_ID" \'"hi"\' && {agentnode} ls'
    r = run_cli(["submit", "--socket", str(node.socket), "--tenant", "delta", "--user", "0",
                 "--memory", "128M", "--ro", str(repo), "--env", f"PYTHONPATH={repo / 'python'}",
                 "-a", "--", "sh", "-c", script])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "objects/delta.txt" in r.stdout and "gamma" not in r.stdout, r.stdout
    assert "episodic/mine/" in r.stdout


def test_a_value_msgpack_cannot_hold_is_one_line(node: Daemon) -> None:
    r = mem(node, "alpha", "put", "episodic/ns/task", str(1 << 66))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("agentnode: error: cannot send /v1/memory/episodic/ns/task"), (
        r.stderr
    )
