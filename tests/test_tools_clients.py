"""MCP-capable agents use node tools without changes: real clients, run inside tasks, against
the node's MCP endpoint ($AGENTNODE_MCP_URL with the task's token), each listing only its
tenant's tools, calling one through a sandboxed MCP server, getting the normalised result
with `_meta.agentnode`, and leaving the call in the task's audit log and timeline."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.agent_env import REPO, agent_node
from support.egress_world import World

HERE = Path(__file__).parent
SERVER = str(HERE / "support" / "tools_mcp_server.py")
#: The LangGraph agent's own environment (see its requirements), installed once, outside the repo.
LANGGRAPH_ENV = Path(os.environ.get("AGENTNODE_TEST_CACHE", "/var/cache/agentnode-test")) / (
    "langgraph-mcp"
)
LANGGRAPH_REQUIREMENTS = HERE / "support" / "langgraph-mcp-requirements.txt"

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        yield w


def servers(port: int) -> str:
    """Node config: the MCP endpoint on the node bridge (tasks with egress reach it by URL,
    as any client does), the test server for every tenant and one only tenant b may use."""
    python, path = json.dumps(sys.executable), json.dumps(str(REPO / "python"))
    common = f'env = {{ PYTHONPATH = {path} }}\nro = [{json.dumps(str(REPO))}]\nuser = "0"\n'
    return (
        f"[tools]\nmcp_port = {port}\n"
        f"[tools.mcp.t]\ncommand = [{python}, {json.dumps(SERVER)}]\n{common}"
        f"[tools.mcp.only_b]\ncommand = [{python}, {json.dumps(SERVER)}]\n{common}"
        'tenants = ["b"]\n'
    )


@pytest.fixture(scope="module")
def langgraph_env() -> Path:
    """A venv with LangGraph and langchain-mcp-adapters 0.3.2 (and so mcp 1.x), made the first
    time (or when the requirements change) from PyPI; without a network the test is skipped,
    or fails in CI."""
    want = hashlib.sha256(LANGGRAPH_REQUIREMENTS.read_bytes()).hexdigest()
    stamp = LANGGRAPH_ENV / "agentnode-requirements.sha256"
    if stamp.exists() and stamp.read_text() == want:
        return LANGGRAPH_ENV
    staging = LANGGRAPH_ENV.with_name(f".{LANGGRAPH_ENV.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        subprocess.run([str(staging / "bin/python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "-r", str(LANGGRAPH_REQUIREMENTS)],
                       check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    except subprocess.CalledProcessError as e:
        shutil.rmtree(staging, ignore_errors=True)
        why = f"the LangGraph environment could not be installed: {e.stderr}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    (staging / stamp.name).write_text(want)
    shutil.rmtree(LANGGRAPH_ENV, ignore_errors=True)
    staging.rename(LANGGRAPH_ENV)  # a venv's python finds its pyvenv.cfg beside it
    return LANGGRAPH_ENV


def run_task(
    d: Any, script: Path, *, python: Path = REPO / ".venv/bin/python"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs `script` with `python` as a task of tenant acme (an egress `python` agent: the
    proxy's variables are set, the node's MCP URL too); its report and the task."""
    task = d.client.call("POST", "/v1/tasks", {
        "command": [str(python), str(script)], "tenant": "acme", "agent": {"kind": "python"},
        "user": "0", "ro": [str(REPO)], "memory": "512M", "cpus": 1,
    })  # fmt: skip
    done = d.wait(task["id"], timeout=180)
    log = d.log(task["id"])
    assert done["state"] == "succeeded", log
    report: dict[str, Any] = json.loads(log.strip().splitlines()[-1])
    return report, done


def tool_records(d: Any, task_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The task's tool calls in the audit log and in its timeline."""
    timeline = d.client.call("GET", f"/v1/tasks/{task_id}/timeline")
    path = d.data / "audit" / "audit.log"
    logged = [json.loads(x) for x in path.read_text().splitlines()]
    audited = [r for r in logged if r["kind"] == "tool_call" and r.get("task") == task_id]
    return audited, [e for e in timeline if e["kind"] == "tool_call"]


def check_meta(meta: dict[str, Any]) -> None:
    assert meta["class"] == "ok" and meta["retryable"] is False and meta["attempts"] == 1
    assert meta["duration_ms"] > 0 and meta["memory_peak"] > 0
    assert {"cpu_s", "bytes_out", "truncated"} <= set(meta)


def test_openai_agents_sdk_runs_its_model_tool_call_through_node_tools(
    world: World, tmp_path: Path
) -> None:
    """The OpenAI Agents SDK (its `MCPServerStreamableHttp`): an `Agent` run whose model (the
    mock upstream, through the proxy) asks for `t__add`: the call goes through the node's
    endpoint to the test server in its sandbox, the model gets the sum back, and a direct call
    by the same client shows the node's `_meta.agentnode`."""
    pytest.importorskip("agents", reason="openai-agents is in the dev extra")
    script = [{"tool_calls": [{"name": "t__add", "arguments": {"a": 20, "b": 22}}]},
              "20 + 22 = 42"]  # fmt: skip
    port = random.randint(30001, 40000)
    with agent_node(world, tmp_path, script, extra=servers(port)) as (d, mock):
        report, task = run_task(d, HERE / "support" / "openai_agents_mcp.py")
        audited, timeline = tool_records(d, task["id"])
        requests = mock.requests
    assert "t__add" in report["listed"] and "run_code" in report["listed"]
    assert not any(n.startswith("only_b") for n in report["listed"]), "another tenant's"
    assert report["final"] == "20 + 22 = 42"
    assert report["outputs"] == ['{"sum": 42}']
    # What the model was sent: the tool's answer, as the node returned it.
    assert [r["tools"] >= len(report["listed"]) for r in requests] == [True, True]
    assert requests[1]["last_role"] == "tool" and requests[1]["tool_results"] == ['{"sum": 42}']
    assert report["structured"] == {"sum": 3}
    check_meta(report["meta"])
    assert [(r["tool"], r["tenant"], r["class"]) for r in audited] == [
        ("t__add", "acme", "ok"), ("t__add", "acme", "ok")]  # fmt: skip
    assert [r["args"] for r in audited] == [{"a": 20, "b": 22}, {"a": 1, "b": 2}]
    assert [(e["tool"], e["class"]) for e in timeline] == [("t__add", "ok"), ("t__add", "ok")]


@pytest.mark.timeout(900)  # the first run installs the agent's environment from PyPI
def test_langgraph_agent_uses_node_tools_through_langchain_mcp_adapters(
    world: World, tmp_path: Path, langgraph_env: Path
) -> None:
    """LangGraph through `langchain-mcp-adapters` 0.3.2 (mcp 1.x, the agent's own environment
    against the node's mcp 2.3 endpoint): a prebuilt ReAct agent whose model asks for `t__add`
    gets the sum from the test server in its sandbox, and the adapters' interceptor sees the
    node's `_meta.agentnode`."""
    script = [{"tool_calls": [{"name": "t__add", "arguments": {"a": 20, "b": 22}}]},
              "20 + 22 = 42"]  # fmt: skip
    port = random.randint(30001, 40000)
    with agent_node(world, tmp_path, script, extra=servers(port)) as (d, mock):
        report, task = run_task(d, HERE / "support" / "langgraph_mcp_agent.py",
                                python=langgraph_env / "bin/python")  # fmt: skip
        audited, timeline = tool_records(d, task["id"])
        requests = mock.requests
    assert "t__add" in report["listed"] and "run_code" in report["listed"]
    assert not any(n.startswith("only_b") for n in report["listed"]), "another tenant's"
    assert report["final"] == "20 + 22 = 42"
    assert len(requests) == 2 and requests[1]["last_role"] == "tool"
    assert "42" in requests[1]["tool_results"][0]
    (meta,) = report["metas"]
    check_meta(meta)
    assert [(r["tool"], r["tenant"], r["class"], r["args"]) for r in audited] == [
        ("t__add", "acme", "ok", {"a": 20, "b": 22})]  # fmt: skip
    assert [(e["tool"], e["class"]) for e in timeline] == [("t__add", "ok")]
