"""Agent kinds (`submit --agent`): what they change in a task and what they refuse, and a real
LangGraph agent run as a task against the proxy, killed mid-graph and resumed."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from agentnode.agents import LLM_HOSTS, AgentSpec, llm_environment, prepare
from agentnode.agents.install import staging_dir
from agentnode.agents.openclaw import openclaw_config
from agentnode.errors import AgentnodeError, TaskError
from agentnode.isolation.spec import Limits, Mount, Sandbox
from agentnode.tasks.model import TaskSpec
from conftest import processes_with, run_cli
from support.agent_env import CALL_COST, REPO, agent_node, audit
from support.egress_world import OTHER4, World

HERE = Path(__file__).parent


def _spec(memory: int | None = None, **fields: object) -> TaskSpec:
    """A task spec whose sandbox has `fields` (and `memory`)."""
    sandbox = Sandbox(limits=Limits(memory=memory), **fields)  # type: ignore[arg-type]
    return TaskSpec(tenant="acme", command=("python3", "agent.py"), sandbox=sandbox)


def test_every_sdk_variable_points_at_the_proxy_with_the_task_token() -> None:
    env = llm_environment("http://10.0.0.1:8080", "tok")
    assert {k: v for k, v in env.items() if "KEY" not in k} == {
        "OPENAI_BASE_URL": "http://10.0.0.1:8080/v1",
        "OPENAI_API_BASE": "http://10.0.0.1:8080/v1",
        "OPENAI_API_BASE_URL": "http://10.0.0.1:8080/v1",
        "ANTHROPIC_BASE_URL": "http://10.0.0.1:8080",
        "ANTHROPIC_API_URL": "http://10.0.0.1:8080",
    }
    assert env["OPENAI_API_KEY"] == env["ANTHROPIC_API_KEY"] == "tok"


def test_a_kind_defaults_to_egress_and_records_itself(tmp_path: Path) -> None:
    spec = prepare(_spec(), AgentSpec.parse({"kind": "langgraph", "model": "gpt-test"}),
                   network_given=False, cache=tmp_path)  # fmt: skip
    assert spec.sandbox.network == "egress" and spec.agent == "langgraph"
    assert ("AGENTNODE_MODEL", "gpt-test") in spec.sandbox.env
    assert spec.sandbox.egress()[1] is not None
    none = prepare(_spec(network="none"), AgentSpec.parse({"kind": "python"}),
                   network_given=True, cache=tmp_path)  # fmt: skip
    assert none.sandbox.network == "none", "an explicit choice is kept"


@pytest.mark.parametrize(
    "rule",
    ["api.openai.com", "API.OpenAI.com.", "api.openai.com:443", "*.openai.com", "*.com",
     "*.googleapis.com", "generativelanguage.googleapis.com:443/tcp", "*.anthropic.com",
     "x.openai.azure.com", "*.azure.com", "openrouter.ai"],
)  # fmt: skip
def test_rules_that_reach_an_llm_provider_are_refused(rule: str, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"allow_hosts .* directly, unmetered") as e:
        prepare(_spec(allow_hosts=(rule,)), AgentSpec(kind="python"), network_given=False,
                cache=tmp_path)  # fmt: skip
    assert "\n" not in str(e.value)


def test_other_rules_and_kinds_pass_and_bad_agents_say_why(tmp_path: Path) -> None:
    ok = prepare(_spec(allow_hosts=("pypi.org:443", "*.example.com")), AgentSpec(kind="python"),
                 network_given=False, cache=tmp_path)  # fmt: skip
    assert ok.sandbox.allow_hosts == ("pypi.org:443", "*.example.com")
    with pytest.raises(TaskError, match="network host"):
        prepare(_spec(network="host"), AgentSpec(kind="python"), network_given=True,
                cache=tmp_path)  # fmt: skip
    for bad, message in (
        ({"kind": "autogen"}, "not one of python, langgraph, openclaw"),
        ("langgraph", "must be an object"),
        ({"kind": "python", "modle": "x"}, "unknown fields"),
        ({"kind": "python", "model": "a b"}, "is not a model name"),
        ({"kind": "openclaw"}, "needs a model"),
    ):
        with pytest.raises(TaskError, match=message):
            AgentSpec.parse(bad)
    with pytest.raises(TaskError, match=r"OpenClaw is not installed in .*agents install openclaw"):
        prepare(_spec(), AgentSpec(kind="openclaw", model="m"), network_given=False,
                cache=tmp_path)  # fmt: skip
    assert all(h == h.lower() for h in LLM_HOSTS)


def test_openclaw_gets_memory_for_a_turn(tmp_path: Path) -> None:
    home = tmp_path / "openclaw"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "node").write_bytes(b"")
    (home / "node_modules" / "openclaw").mkdir(parents=True)
    (home / "node_modules" / "openclaw" / "openclaw.mjs").write_bytes(b"")
    (home / "agentnode-install.json").write_text('{"openclaw": "x", "node": "v24.19.0"}')
    agent = AgentSpec(kind="openclaw", model="m")
    spec = prepare(_spec(), agent, network_given=False, cache=tmp_path)
    assert spec.memory_bytes == 2 << 30 and spec.sandbox.mounts[-1] == Mount(str(home), str(home))
    assert spec.command[-1] == "python3 agent.py" and "--model" in spec.command
    assert prepare(_spec(memory=1 << 30), agent, network_given=False,
                   cache=tmp_path).memory_bytes == 1 << 30  # fmt: skip
    with pytest.raises(TaskError, match=r"at least 1G .* got 256 MiB"):
        prepare(_spec(memory=256 << 20), agent, network_given=False, cache=tmp_path)


def test_openclaw_config_points_its_provider_at_the_proxy() -> None:
    config = openclaw_config(base_url="http://gw/v1", token="tok", model="m", mcp_url=None)
    assert config == {"models": {"providers": {"agentnode": {
        "baseUrl": "http://gw/v1", "apiKey": "tok", "api": "openai-completions",
        "models": [{"id": "m", "name": "m"}]}}}}  # fmt: skip
    with_tools = openclaw_config(base_url="u", token="tok", model="m", mcp_url="http://gw/mcp")
    assert with_tools["mcp"]["servers"]["agentnode"] == {
        "url": "http://gw/mcp", "headers": {"Authorization": "Bearer tok"}}  # fmt: skip


def test_submit_cli_checks_agent_options() -> None:
    r = run_cli(["submit", "--model", "m", "--", "true"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "need --agent" in r.stderr
    r = run_cli(["submit", "--agent", "nope", "--", "true"])
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        yield w


#: Three LLM turns: call `add`, call `crash_once` (the process dies in it), answer.
LANGGRAPH_SCRIPT = [
    {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
    {"tool_calls": [{"name": "crash_once", "arguments": {}}]},
    "2 + 3 = 5, and I survived",
]


@pytest.mark.root
def test_langgraph_agent_runs_metered_fails_closed_and_resumes(
    world: World, tmp_path: Path
) -> None:
    """A LangGraph agent (langchain-openai, unmodified SDK) as a `--agent langgraph` task: its
    LLM calls go to the proxy and are billed to its task and tenant at the exact price; it
    cannot resolve a provider nor connect elsewhere (the denial is audited); killed mid-graph
    by SIGKILL and retried, it resumes at the step it died in: no LLM call is made twice."""
    with agent_node(world, tmp_path, LANGGRAPH_SCRIPT) as (d, mock):
        with pytest.raises(AgentnodeError, match=r"agent: allow_hosts 'api\.openai\.com'"):
            d.client.call("POST", "/v1/tasks", {"command": ["true"], "allow_hosts": [
                "api.openai.com"], "agent": {"kind": "langgraph"}})  # fmt: skip
        submitted = run_cli(
            ["submit", "--socket", str(d.socket), "--tenant", "acme", "--agent", "langgraph",
             "--model", "gpt-test", "--retries", "1", "--user", "0", "--ro", str(REPO),
             "--env", f"PYTHONPATH={REPO / 'python'}", "--",
             str(REPO / ".venv/bin/python"), str(HERE / "support" / "langgraph_agent.py"), OTHER4]
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        task = d.task(submitted.stdout.strip())
        assert task["agent"] == "langgraph" and task["network"] == "egress"
        deadline = time.monotonic() + 90
        first_log = d.data / "logs" / f"{task['id']}.1.log"
        while not first_log.exists() or "crash_once: waiting" not in first_log.read_text():
            assert time.monotonic() < deadline and d.task(task["id"])["attempt"] == 1
            time.sleep(0.05)
        assert len(mock.requests) == 2
        for pid in processes_with(str(HERE / "support" / "langgraph_agent.py")):
            os.kill(pid, signal.SIGKILL)
        done = d.wait(task["id"], timeout=120)
        first, second = d.log(task["id"], 1), d.log(task["id"], 2)
        assert done["state"] == "succeeded" and done["attempt"] == 2, (done, first, second)
        report = json.loads(second.splitlines()[-1])
        assert report["final"] == "2 + 3 = 5, and I survived" and report["resumed"] is True
        assert report["resolve"] == "gaierror"
        assert report["connect"] == f"errno {errno.EPERM}"
        (row,) = report["usage"]
        assert (row["tenant"], row["task"], row["requests"]) == ("acme", task["id"], 3)
        assert Decimal(row["cost"]) == 3 * CALL_COST
        # What the model saw: one request per step, each with the history one step longer.
        assert [(r["messages"], r["last_role"]) for r in mock.requests] == [
            (1, "user"), (3, "tool"), (5, "tool")]  # fmt: skip
        assert all(r["tools"] == 2 and r["model"] == "gpt-test" for r in mock.requests)
        denied = [a for a in audit(d) if a["task"] == task["id"]]
        assert {(a["address"], a["port"]) for a in denied} == {(OTHER4, 443)}
        assert len(denied) == 2, "each attempt's try is audited"


def test_an_install_sweeps_what_killed_installs_left(tmp_path: Path) -> None:
    """A staging directory whose install process is gone is removed by the next install; one
    whose process lives (another install running now) is left alone."""
    dead, live, other = (tmp_path / ".autogpt-999999999", tmp_path / ".autogpt-1",
                         tmp_path / ".openclaw-999999999")  # fmt: skip
    for d in (dead, live, other):
        (d / "lib").mkdir(parents=True)
    staging = staging_dir(tmp_path, "autogpt")
    assert staging == tmp_path / f".autogpt-{os.getpid()}" and not staging.exists()
    assert not dead.exists() and live.exists() and other.exists()
