"""AutoGPT classic (`agpt` 0.2.2 from PyPI, in a venv the node installs) as an `--agent autogpt`
task against the node's proxy in front of the scripted mock, speaking AutoGPT's JSON reply
format (thoughts + command).

It is installed once into a cache outside the repo ($AGENTNODE_TEST_CACHE, default
/var/cache/agentnode-test) that later runs reuse; installing is this file's only network use
(PyPI). Under CI=true a missing AutoGPT that cannot be installed fails; elsewhere it skips."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agentnode.agents import autogpt
from agentnode.agents.kinds import AgentSpec
from agentnode.errors import TaskError
from conftest import run_cli
from support.agent_env import (
    CALL_COST,
    HERE,
    REPO,
    agent_node,
    ap_client_python,
    installed_agent,
    ledger,
)
from support.egress_world import World

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.network]

#: The mock bills each embedding request 8 prompt tokens at the test price (2.5 USD/M).
EMBED_COST = Decimal("0.00002")


def reply(command: str, args: dict[str, Any]) -> str:
    """One AutoGPT answer: its thoughts and the command it runs next."""
    thoughts = {"text": f"run {command}", "reasoning": "scripted", "plan": "- it",
                "criticism": "none", "speak": command}  # fmt: skip
    return json.dumps({"thoughts": thoughts, "command": {"name": command, "args": args}})


#: Task one: write a file, read it back, finish. Task two (a limit of 2): two reads, then a
#: third answer it never asks for.
SCRIPT = [
    reply("write_to_file", {"filename": "hello.txt", "text": "hi from AutoGPT on agentnode"}),
    reply("read_file", {"filename": "hello.txt"}),
    reply("task_complete", {"reason": "the file is written"}),
    reply("read_file", {"filename": "missing.txt"}),
    reply("read_file", {"filename": "missing.txt"}),
    reply("task_complete", {"reason": "never asked for"}),
]


@pytest.fixture(scope="module")
def cache() -> Path:
    return installed_agent(autogpt, "AutoGPT")


@pytest.fixture(scope="module")
def ap_client() -> Path:
    return ap_client_python()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        yield w


def test_autogpt_options_are_checked() -> None:
    """Steps only for autogpt, 1-1000; models AutoGPT can count tokens for; a missing install
    names the command that installs it."""
    assert AgentSpec.parse({"kind": "autogpt", "steps": 3}).steps == 3
    for bad in ({"kind": "autogpt", "steps": 0}, {"kind": "autogpt", "steps": "3"},
                {"kind": "autogpt", "steps": True}, {"kind": "python", "steps": 3},
                {"kind": "autogpt", "steps": 1001}):  # fmt: skip
        with pytest.raises(TaskError, match="agent steps"):
            AgentSpec.parse(bad)
    with pytest.raises(TaskError, match=r"counts tokens only for gpt-3\.5-turbo"):
        AgentSpec.parse({"kind": "autogpt", "model": "gpt-test"})
    with pytest.raises(TaskError, match="agents install autogpt"):
        autogpt.installed(Path("/nonexistent"))


def test_install_is_reported_by_status_and_doctor(cache: Path) -> None:
    found = autogpt.status(cache)
    assert found is not None and found["autogpt"] == autogpt.VERSION
    assert (cache / "autogpt" / "tiktoken").is_dir(), "tiktoken's tables come with the install"
    os.environ["AGENTNODE_AGENTS_CACHE"] = str(cache)
    try:
        r = run_cli(["agents", "status", "--json"])
        doc = run_cli(["doctor", "--json"])
    finally:
        del os.environ["AGENTNODE_AGENTS_CACHE"]
    assert json.loads(r.stdout)["autogpt"]["home"] == str(cache / "autogpt")
    (check,) = [c for c in json.loads(doc.stdout)["checks"] if c["id"] == "agents.autogpt"]
    assert check["status"] == "ok" and autogpt.VERSION in check["detail"]


@pytest.mark.timeout(300)
def test_autogpt_runs_headless_as_a_task_billed_to_it(
    cache: Path, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AutoGPT runs its continuous loop with no terminal: its chat and embedding calls go to
    the proxy with the task's token, each billed to the task at the exact price; its commands
    act in the task's workspace; it stops on `task_complete`, or at its step limit."""
    monkeypatch.setenv("AGENTNODE_AGENTS_CACHE", str(cache))
    tenant_key = "k-acme-test"
    extra = f'[inference.tenants.acme]\napi_keys = ["{tenant_key}"]\n'
    models = ("gpt-3.5-turbo", "text-embedding-ada-002")
    with agent_node(world, tmp_path, SCRIPT, extra=extra, models=models, embedding_size=1536) as (
        d,
        mock,
    ):
        common: dict[str, Any] = {"tenant": "acme", "user": "0", "ro": [str(REPO)],
                                  "env": {"PYTHONPATH": str(REPO / "python")}, "timeout": "240s",
                                  "memory": "1G", "cpus": 1}  # fmt: skip
        task = d.submit(["Write", "hello.txt"], agent={"kind": "autogpt", "steps": 5}, **common)
        assert task["agent"] == "autogpt" and task["command"][-1] == "Write hello.txt"
        done = d.wait(task["id"], timeout=240)
        out = d.log(task["id"])
        assert done["state"] == "succeeded", (done["reason"], out[-3000:])
        assert "Command write_to_file returned: File written to successfully." in out
        assert "Command read_file returned: hi from AutoGPT on agentnode" in out
        written = d.data / "workspaces" / task["id"] / "auto_gpt_workspace" / "hello.txt"
        assert written.read_text() == "hi from AutoGPT on agentnode"
        chats = [r for r in mock.requests if r["path"] == "/v1/chat/completions"]
        embeds = [r for r in mock.requests if r["path"] == "/v1/embeddings"]
        assert len(chats) == 3 and all(r["model"] == "gpt-3.5-turbo" for r in chats)
        assert embeds and all(r["model"] == "text-embedding-ada-002" for r in embeds)
        (row,) = [r for r in ledger(world, d, tenant_key) if r["task"] == task["id"]]
        assert (row["tenant"], row["requests"]) == ("acme", len(mock.requests))
        assert Decimal(row["cost"]) == len(chats) * CALL_COST + len(embeds) * EMBED_COST

        before = len(chats)
        limited = d.submit(["Read", "it"], agent={"kind": "autogpt", "steps": 2}, **common)
        done = d.wait(limited["id"], timeout=240)
        out = d.log(limited["id"])
        assert done["state"] == "succeeded", (done["reason"], out[-3000:])
        assert "Continuous Limit Reached" in out
        chats = [r for r in mock.requests if r["path"] == "/v1/chat/completions"]
        assert len(chats) - before == 2, "the step limit stops it before a third call"


@pytest.mark.timeout(300)
def test_an_agent_protocol_client_drives_autogpt(
    cache: Path, ap_client: Path, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Agent Protocol's own client (`agent-protocol-client`, every answer parsed by its
    models) over the node's TCP API with its token: it creates an AutoGPT task, executes its
    steps until `is_last`, reads back the steps, the file AutoGPT wrote and one it uploaded."""
    monkeypatch.setenv("AGENTNODE_AGENTS_CACHE", str(cache))
    port = 33000 + os.getpid() % 2000
    extra = f'[node]\nlisten = "127.0.0.1:{port}"\napi_token = "tok"\n'
    models = ("gpt-3.5-turbo", "text-embedding-ada-002")
    with agent_node(
        world, tmp_path, SCRIPT[:3], extra=extra, models=models, embedding_size=1536
    ) as (_, mock):
        task = {"user": "0", "ro": [str(REPO)], "env": {"PYTHONPATH": str(REPO / "python")},
                "memory": "1G", "cpus": 1}  # fmt: skip
        body = {"input": "Write hello.txt",
                "additional_input": {"agent": "autogpt", "steps": 5, "task": task}}  # fmt: skip
        out = subprocess.run(
            ["nsenter", f"--net=/run/netns/{world.task}", str(ap_client),
             str(HERE / "ap_sdk_client.py"), f"http://127.0.0.1:{port}", "tok", json.dumps(body)],
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-1500:]
        report = json.loads(out.stdout)
        names = [s["name"] for s in report["steps"]]
        assert names.count("llm_call gpt-3.5-turbo") == 3, names
        assert names.count("llm_call text-embedding-ada-002") >= 1, names
        assert names[-1] == "finish" and report["steps"][-1]["is_last"]
        assert report["listed"] == report["executed"]
        assert report["artifacts"]["auto_gpt_workspace/hello.txt"] == "hi from AutoGPT on agentnode"
        assert report["artifacts"]["given/note.txt"] == "from the client"
        assert report["uploaded"] is False and report["missing"] == 404
        assert report["tasks"] == [report["task_id"]]
        assert len([r for r in mock.requests if r["path"] == "/v1/chat/completions"]) == 3
