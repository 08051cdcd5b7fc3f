"""The reference runtime (`agentnode.runtime`) run as a daemon task against a scripted mock
model: tools called through the node, every model call metered, checkpoints that survive a
SIGKILL without asking the model again or re-running a recorded tool call, and limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agentnode.errors import TaskError
from agentnode.runtime import formats
from agentnode.runtime.formats import Call
from agentnode.runtime.inbox import Inbox
from agentnode.runtime.state import State
from conftest import processes_with, run_cli
from support.agent_env import ANTHROPIC_CALL_COST, CALL_COST, REPO, agent_node, ledger
from support.egress_world import World

#: run_code with a side effect, run_code that is slow the first time (the test kills the task
#: in it), write_file, the answer.
SIDE = "open('/workspace/side.txt', 'a').write('once\\n'); print('side effect done')"
SLOW = (
    "import os, time\n"
    "if not os.path.exists('/workspace/slow'):\n"
    "    open('/workspace/slow', 'w').close(); print('slow started', flush=True); time.sleep(3)\n"
    "print('slow done')"
)
SCRIPT = [
    {"tool_calls": [{"name": "run_code", "arguments": {"code": SIDE}}]},
    {"tool_calls": [{"name": "run_code", "arguments": {"code": SLOW}}]},
    {"tool_calls": [{"name": "write_file", "arguments": {"path": "answer.txt",
                                                          "content": "42\n"}}]},
    "The answer is 42, written to answer.txt.",
]  # fmt: skip


KEY = "k-acme-test"
TENANT = f'[inference.tenants.acme]\napi_keys = ["{KEY}"]\n'


def _runtime_of(task_id: str) -> list[int]:
    """The runtime processes of task `task_id` (other tests' and sessions' agents may run)."""
    mine = f"AGENTNODE_TASK_ID={task_id}".encode()
    found = []
    for pid in processes_with("agentnode.runtime"):
        try:
            if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        yield w


def _agent(
    d: Any, *args: str, model: str = "gpt-test", tenant: str = "acme"
) -> subprocess.Popen[str]:
    """`agentnode agent ARGS` against daemon `d`, as a user would run it."""
    return subprocess.Popen(
        [sys.executable, "-m", "agentnode", "agent", "--socket", str(d.socket), "--tenant",
         tenant, "--model", model, "--user", "0", "--ro", str(REPO),
         "--env", f"PYTHONPATH={REPO / 'python'}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _task_id(d: Any) -> str:
    deadline = time.monotonic() + 30
    while not (tasks := d.client.call("GET", "/v1/tasks?all=1")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return str(tasks[-1]["id"])


@pytest.mark.root
def test_runtime_runs_tools_is_metered_and_resumes_after_sigkill(
    world: World, tmp_path: Path
) -> None:
    """`agentnode agent` runs the loop as a task: run_code, run_code, write_file, answer.
    Killed by SIGKILL in step 2's tool call (step 1's result recorded), the retry continues
    there: the model is asked nothing twice and step 1's side effect happened once."""
    with agent_node(world, tmp_path, SCRIPT, extra=TENANT) as (d, mock):
        proc = _agent(d, "--retries", "1", "--tools", "run_code,write_file",
                      "compute the answer and write it down")  # fmt: skip
        task_id = _task_id(d)
        first_log = d.data / "logs" / f"{task_id}.1.log"
        deadline = time.monotonic() + 60
        while len(mock.requests) < 2 or "step 2: calls run_code" not in first_log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)  # into the slow tool call
        (pid,) = _runtime_of(task_id)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
        assert out.strip().splitlines()[-1] == "The answer is 42, written to answer.txt."
        done = d.task(task_id)
        assert done["state"] == "succeeded" and done["attempt"] == 2 and done["agent"] == "python"
        second = d.log(task_id, 2)
        assert "runtime: tools via mcp: run_code, write_file" in second, second
        assert "resumed after step 2" in second, second
        assert "step 1:" not in second, "a recorded step is not run again"
        # The model saw each conversation once, one step longer each time.
        assert [(r["messages"], r["last_role"]) for r in mock.requests] == [
            (1, "user"), (3, "tool"), (5, "tool"), (7, "tool")]  # fmt: skip
        assert all(r["tools"] == 2 and r["model"] == "gpt-test" and not r["stream"]
                   for r in mock.requests)  # fmt: skip
        assert mock.requests[1]["tool_results"] == ["side effect done\n"]
        workspace = d.data / "workspaces" / task_id
        assert (workspace / "side.txt").read_text() == "once\n"
        assert (workspace / "answer.txt").read_text() == "42\n"
        (row,) = [r for r in ledger(world, d, KEY) if r["task"] == task_id]
        assert (row["tenant"], row["requests"]) == ("acme", 4)
        assert Decimal(row["cost"]) == 4 * CALL_COST


#: A slow first tool call, during which the node goes and comes back.
_SLOW = ("import time; open('/workspace/started', 'a').write('x'); time.sleep(4); "
         "print('slow done')")  # fmt: skip
_ACROSS = [
    {"tool_calls": [{"name": "run_code", "arguments": {"code": _SLOW}}]},
    {"tool_calls": [{"name": "write_file", "arguments": {"path": "a.txt", "content": "42"}}]},
    "Done.",
]


@pytest.mark.root
@pytest.mark.parametrize(
    ("door", "how"),
    [("mcp", signal.SIGKILL), ("api", signal.SIGKILL), ("mcp", signal.SIGTERM)],
    ids=["mcp-kill9", "api-kill9", "mcp-stop"],
)
def test_runtime_rides_out_a_node_restart_in_one_attempt(
    world: World, tmp_path: Path, door: str, how: signal.Signals
) -> None:
    """The node goes during a tool call (kill -9, or a stop keeping its tasks) and comes back,
    re-adopting the task: the runtime connects again and sends the call again under its key,
    and the task finishes in its first attempt. The call is never run twice: cut off by the
    crash it is told so; finished meanwhile, its result comes."""
    extra = "[node]\nkeep_tasks = true\n" if how == signal.SIGTERM else ""
    with agent_node(world, tmp_path, _ACROSS, extra=extra) as (d, mock):
        task = d.submit(
            [sys.executable, "-m", "agentnode.runtime", "--tools", "run_code,write_file",
             "--tools-via", door, "--", "compute"],
            tenant="acme", agent={"kind": "python", "model": "gpt-test"},
            memory="512M", user="0", ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")},
        )  # fmt: skip
        started = d.data / "workspaces" / task["id"] / "started"
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline, d.task(task["id"])
            time.sleep(0.05)
        time.sleep(0.5)  # into the slow call
        d.stop(how)
        d.start()
        done = d.wait(task["id"], timeout=120)
        assert (done["state"], done["attempt"]) == ("succeeded", 1), (done, d.log(task["id"], 1))
        (result,) = mock.requests[1]["tool_results"]
        # Killed, the call is cut off; a stop lets it end if it can within the stop's wait.
        if how == signal.SIGKILL or "cut off by a node restart" in result:
            assert "cut off by a node restart" in result, result
        else:
            assert result == "slow done\n", result
        workspace = d.data / "workspaces" / task["id"]
        assert (workspace / "started").read_text() == "x", "run once"
        assert (workspace / "a.txt").read_text() == "42"
        # The model was asked each step once, one step longer each time.
        assert [(r["messages"], r["last_role"]) for r in mock.requests] == [
            (1, "user"), (3, "tool"), (5, "tool")]  # fmt: skip


@pytest.mark.root
def test_runtime_stops_on_max_steps_budget_and_wall_time(world: World, tmp_path: Path) -> None:
    """A limit ends the task with exit 3 and a line naming it, before another model call."""
    call = {"tool_calls": [{"name": "list_files", "arguments": {}}]}
    slow = {"tool_calls": [{"name": "run_code", "arguments": {
        "code": "import time; time.sleep(1.5)"}}]}  # fmt: skip
    with agent_node(world, tmp_path, [call, call, call, slow]) as (d, mock):
        steps = _agent(d, "--retries", "0", "--max-steps", "1", "--stream", "--tools-via", "api",
                       "look around")  # fmt: skip
        out, err = steps.communicate(timeout=120)
        # The timeline, then the runtime's last line, on stdout; the task's end on stderr.
        assert steps.returncode == 3 and "exited with code 3" in err, (out, err)
        assert out.splitlines()[-1] == (
            "agentnode.runtime: stopped: max steps (1) reached before a final answer"
        )
        assert " list_files -> ok in " in out, out
        assert "runtime: tools via api:" in d.log(_task_id(d), 1)
        # The spend the proxy told with the answer (its header; a stream's closing comment),
        # exact and this task's own: each task stops after its first call.
        for stream in ((), ("--stream",)):
            budget = _agent(d, "--retries", "0", *stream, "--budget", "0.004", "look around")
            out, err = budget.communicate(timeout=120)
            assert budget.returncode == 3, (out, err)
            assert out.splitlines()[-1] == (
                "agentnode.runtime: stopped: budget of $0.004 spent ($0.00495 so far) before a "
                "final answer"
            )
        assert len(mock.requests) == 3, "none made a call past its limit"
        assert [r["stream"] for r in mock.requests] == [True, False, True]
        wall = _agent(d, "--retries", "0", "--max-time", "1s", "look around")
        out, err = wall.communicate(timeout=120)
        assert wall.returncode == 3, (out, err)
        assert out.splitlines()[-1].startswith(
            "agentnode.runtime: stopped: wall time of 1 s used ("
        ) and out.splitlines()[-1].endswith(" s) before a final answer"), out
        assert len(mock.requests) == 4, "no call after the wall time was used"
        bad = _agent(d, "--budget", "lots", "x")
        out, err = bad.communicate(timeout=120)
        assert bad.returncode == 2 and "'lots' is not an amount of US dollars" in out, out


FACT = "the launch code is 7-4-1"
OTHER = "the other tenant's secret is 99"
#: Task 1 (acme) remembers a fact next to a node tool; task 2 (tenant other) remembers its own
#: and looks for acme's; task 3 (acme) recalls with words of both facts, and calls badly.
MEMORY_SCRIPT = [
    {"tool_calls": [{"name": "remember", "arguments": {"text": FACT}},
                    {"name": "run_code", "arguments": {"code": "print('noted')"}}]},
    "Noted.",
    {"tool_calls": [{"name": "remember", "arguments": {"text": OTHER}},
                    {"name": "recall", "arguments": {"query": "Secret"}},
                    {"name": "recall", "arguments": {"query": "launch code"}}]},
    "Nothing about a launch.\x1b]0;owned\x07\x1b[2K",  # terminal control: shown, not obeyed
    {"tool_calls": [{"name": "recall", "arguments": {"query": "launch secret tenant"}},
                    {"name": "recall", "arguments": {"query": "LAUNCH", "limit": 0}},
                    {"name": "recall", "arguments": {}},
                    {"name": "remember", "arguments": {"text": " ... "}}]},
    "The launch code is 7-4-1.",
]  # fmt: skip


@pytest.mark.root
def test_runtime_remembers_across_tasks_of_a_tenant_only(world: World, tmp_path: Path) -> None:
    """`remember` in one task, `recall` in a later task of the same tenant finds it; another
    tenant's task finds only its own. `agentnode agent` prints the timeline as it runs (the
    model calls with their cost, the node's tool calls), then the cost and the answer."""
    with agent_node(world, tmp_path, MEMORY_SCRIPT, extra=TENANT) as (d, mock):
        first = _agent(d, "--tools", "remember,run_code", "remember the launch code")
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, (out, err)
        lines = out.strip().splitlines()
        assert lines[-2:] == [f"agentnode: 2 model calls, ${2 * CALL_COST}", "Noted."], out
        assert sum(" llm_call      chat gpt-test -> 200: " in line and f"${CALL_COST};" in line
                   for line in lines) == 2, out  # fmt: skip
        assert sum(" tool_call     run_code -> ok in " in line for line in lines) == 1, out
        assert " state         succeeded attempt 1" in out, out
        assert err.startswith("agentnode: task "), err
        assert mock.requests[0]["tools"] == 2
        assert mock.requests[1]["tool_results"] == [f"remembered: {FACT}", "noted\n"]

        other = _agent(d, "--tools", "remember,recall", "any launch code?", tenant="other")
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0, err
        assert out.splitlines()[-1] == "Nothing about a launch.\\x1b]0;owned\\x07\\x1b[2K", out
        assert mock.requests[3]["tool_results"] == [
            f"remembered: {OTHER}", f"- {OTHER}", "nothing remembered about launch code"]  # fmt: skip

        again = _agent(d, "--memory-space", "default", "what is the launch code?")
        out, err = again.communicate(timeout=120)
        assert again.returncode == 0 and out.splitlines()[-1] == FACT.capitalize() + ".", err
        assert mock.requests[5]["tool_results"] == [
            f"- {FACT}",
            "error: recall's 'limit' is a whole number from 1 to 100, got 0",
            "error: recall needs 'query': words to look for",
            "error: remember needs 'text': the fact to store, in words",
        ]
        # Without --tools the model is offered the node's tools and both memory tools.
        assert mock.requests[4]["tools"] > 2

        # A space that is no storage name is refused; --no-memory-tools offers neither tool.
        bad = _agent(d, "--retries", "0", "--memory-space", "no/such", "x")
        out, err = bad.communicate(timeout=120)
        assert bad.returncode == 2 and "--memory-space: invalid memory space 'no/such'" in out, out
        off = _agent(d, "--retries", "0", "--no-memory-tools", "--tools", "recall", "x")
        out, err = off.communicate(timeout=120)
        assert off.returncode == 1 and "no node tool recall" in out, out
        assert len(mock.requests) == 6


#: Two calls in one answer (their results share one user message), then the answer.
ANTHROPIC_SCRIPT = [
    {"text": "Two things first.", "tool_calls": [
        {"name": "run_code", "arguments": {"code": "print(6 * 7)"}},
        {"name": "write_file", "arguments": {"path": "a.txt", "content": "42\n"}}]},
    "Done: 42, in a.txt.",
]  # fmt: skip


@pytest.mark.root
def test_runtime_speaks_anthropic_streamed_through_the_proxy(world: World, tmp_path: Path) -> None:
    """`--api anthropic --stream`: the Messages API with `tool_use` and `tool_result` blocks,
    streamed through the node's proxy to a mock in Anthropic's wire format; tools over MCP;
    each call metered at Anthropic's usage under the task."""
    with agent_node(world, tmp_path, ANTHROPIC_SCRIPT, extra=TENANT, kind="anthropic") as (
        d, mock):  # fmt: skip
        proc = _agent(d, "--api", "anthropic", "--stream", "--tools", "run_code,write_file",
                      "--json", "what is six times seven? write it down", model="claude-test")  # fmt: skip
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
        # --json: the timeline's entries as they came, then the outcome, one object a line.
        *entries, outcome = [json.loads(line) for line in out.splitlines()]
        assert outcome == {"kind": "outcome", "task": _task_id(d), "exit_status": 0,
                           "model_calls": 2, "cost": str(2 * ANTHROPIC_CALL_COST),
                           "last_line": "Done: 42, in a.txt."}  # fmt: skip
        assert [e["tool"] for e in entries if e["kind"] == "tool_call"] == [
            "run_code", "write_file"]  # fmt: skip
        assert [e["state"] for e in entries if e["kind"] == "state"] == [
            "queued", "starting", "running", "succeeded"]  # fmt: skip
        assert sum(e["kind"] == "llm_call" for e in entries) == 2
        assert [(r["path"], r["messages"], r["last_role"], r["stream"]) for r in mock.requests] == [
            ("/v1/messages", 1, "user", True), ("/v1/messages", 3, "user", True)]  # fmt: skip
        assert mock.requests[1]["tool_results"] == ["42\n", "wrote 3 bytes to a.txt"]
        task_id = _task_id(d)
        assert (d.data / "workspaces" / task_id / "a.txt").read_text() == "42\n"
        (row,) = [r for r in ledger(world, d, KEY) if r["task"] == task_id]
        assert (row["tenant"], row["requests"]) == ("acme", 2)
        assert Decimal(row["cost"]) == 2 * ANTHROPIC_CALL_COST


def test_checkpoint_state_knows_pending_calls_and_refuses_foreign_blobs() -> None:
    fmt = formats._OpenAI.__new__(formats._OpenAI)  # the format's reading, without a client
    call = {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    bad = {"id": "c2", "type": "function", "function": {"name": "t", "arguments": "[1]"}}
    s = State(api="openai", messages=[{"role": "user", "content": "hi"},
              {"role": "assistant", "content": None, "tool_calls": [call, bad]}], steps=1)  # fmt: skip
    assert s.pending(fmt) == [Call("c1", "t", {}), Call("c2", "t", None, "not an object")]
    assert s.answer(fmt) is None
    fmt.add_result(s.messages, "c1", "ok", error=False)
    fmt.add_result(s.messages, "c2", "bad arguments", error=True)
    assert State.load(s.dump()).pending(fmt) == [] and State.load(s.dump()).steps == 1
    assert s.messages[-1]["content"] == "error: bad arguments"
    s.messages.append({"role": "assistant", "content": "done"})
    assert s.answer(fmt) == "done"
    for blob in (b"", b"{}", json.dumps({"v": 9}).encode(), b"[1]", json.dumps({"v": 1}).encode()):
        with pytest.raises(Exception, match="not a runtime checkpoint"):
            State.load(blob)


def test_anthropic_results_share_one_user_message() -> None:
    """Anthropic wants every result of an answer in the one user message after it."""
    fmt = formats._Anthropic.__new__(formats._Anthropic)
    answer = {"role": "assistant", "content": [
        {"type": "text", "text": "two calls"},
        {"type": "tool_use", "id": "a", "name": "t", "input": {"x": 1}},
        {"type": "tool_use", "id": "b", "name": "t", "input": "x"}]}  # fmt: skip
    s = State(api="anthropic", messages=[{"role": "user", "content": "hi"}, answer], steps=1)
    assert s.pending(fmt) == [Call("a", "t", {"x": 1}), Call("b", "t", None, "not an object")]
    fmt.add_result(s.messages, "a", "1", error=False)
    assert [c.id for c in s.pending(fmt)] == ["b"]
    fmt.add_result(s.messages, "b", "no", error=True)
    assert s.pending(fmt) == [] and len(s.messages) == 3
    assert s.messages[2]["content"][1] == {
        "type": "tool_result", "tool_use_id": "b", "content": "no", "is_error": True}  # fmt: skip
    s.messages.append({"role": "assistant", "content": [{"type": "text", "text": "done"}]})
    assert s.answer(fmt) == "done"


@pytest.mark.root
def test_demo_runs_the_stack_offline_in_under_a_minute() -> None:
    started = time.monotonic()
    r = run_cli(["demo"], timeout=90)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert time.monotonic() - started < 60
    assert "runtime: step 1: run_code -> ok" in r.stdout
    assert "runtime: step 2: http_fetch -> policy" in r.stdout
    # The timeline it prints holds both tool calls and the connection the node refused.
    timeline = r.stdout.split("its timeline:", 1)[1]
    assert " tool_call     run_code -> ok in " in timeline
    assert " tool_call     http_fetch -> policy in " in timeline
    assert " egress_denied tcp 203.0.113.7 port 80 (policy, pid " in timeline
    assert "tool http_fetch)" in timeline
    assert "demo: the task succeeded" in r.stdout
    assert "demo: 3 model calls, $0.01125" in r.stdout
    assert not list(Path(tempfile.gettempdir()).glob("agentnode-demo-*")), "scratch dir removed"


def test_demo_without_root_says_so() -> None:
    r = run_cli(["demo"], user=65534)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "needs root (run: sudo agentnode demo)" in r.stderr


def test_inputs_sent_to_the_agent_are_read_once_whole_lines_only(tmp_path: Path) -> None:
    """The inbox is read from an offset, a line only once it is whole; each input becomes a
    user message in the format's shape (Anthropic: after an answer's results, in their turn)."""
    path = tmp_path / "inbox"
    inbox = Inbox(str(path))
    assert inbox.read(0) == ([], 0), "no inbox yet: nothing sent"
    path.write_bytes(b'{"input": "one", "additional_input": null}\n{"input": "tw')
    texts, offset = inbox.read(0)
    assert texts == ["one"] and offset == path.read_bytes().index(b"\n") + 1
    assert inbox.read(offset) == ([], offset), "half a line waits for the rest"
    with path.open("ab") as f:
        f.write(b'o", "additional_input": {"k": 1}}\n{"input": ""}\n')
    texts, end = inbox.read(offset)
    assert texts == ["two"] and end == path.stat().st_size
    path.write_bytes(b"not json\n")
    with pytest.raises(TaskError, match="not an input object"):
        inbox.read(0)
    state = State(api="openai", messages=[{"role": "user", "content": "hi"}], inbox=end)
    assert State.load(state.dump()).inbox == end
    old = json.loads(state.dump())
    del old["inbox"]  # a checkpoint written before inputs were read
    assert State.load(json.dumps(old).encode()).inbox == 0

    openai = formats._OpenAI.__new__(formats._OpenAI)
    openai.add_user(state.messages, "more")
    assert state.messages[-1] == {"role": "user", "content": "more"}
    fmt = formats._Anthropic.__new__(formats._Anthropic)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    fmt.add_user(messages, "and this")
    assert messages == [{"role": "user", "content": [
        {"type": "text", "text": "go"}, {"type": "text", "text": "and this"}]}]  # fmt: skip
    messages.append({"role": "assistant", "content": [
        {"type": "tool_use", "id": "u1", "name": "t", "input": {}}]})  # fmt: skip
    fmt.add_result(messages, "u1", "ok", error=False)
    fmt.add_user(messages, "also")
    assert [b["type"] for b in messages[-1]["content"]] == ["tool_result", "text"]
    assert fmt.results(messages[2:]) == {"u1"}
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "done"}]})
    fmt.add_user(messages, "again")
    assert messages[-1] == {"role": "user", "content": [{"type": "text", "text": "again"}]}


#: A conversation in each format: a tool call, its result, then a user's text.
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "openai": [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "list_files", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '["a.txt"]'},
        {"role": "user", "content": "and now?"},
    ],
    "anthropic": [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "u1", "name": "list_files",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "u1",
                                      "content": '["a.txt"]', "is_error": False},
                                     {"type": "text", "text": "and now?"}]},
    ],
}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_the_conversation_reaches_the_model_as_the_runtime_holds_it(
    api: str, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime sends its conversation as the request's `messages` untouched (past the SDKs'
    parameter transform, `formats._as_is`), streamed or not: equal to what it holds, after the
    system prompt in OpenAI's format, with the tools and the model as the SDK sends them."""
    import asyncio
    import threading
    from collections import deque

    from agentnode.inference.mock import MockUpstream, Turn

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    mock = asyncio.run_coroutine_threadsafe(MockUpstream(api).start(), loop).result(30)
    try:
        monkeypatch.setenv("OPENAI_BASE_URL" if api == "openai" else "ANTHROPIC_BASE_URL",
                           mock.base_url)  # fmt: skip
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
        mock.script = deque([Turn(text="two files")])
        fmt: Any = formats.make(api, model="m", system="be brief", stream=stream, max_tokens=64)
        held = json.loads(json.dumps(CONVERSATIONS[api]))
        tool = fmt.tool("list_files", "Lists files.", {"type": "object", "properties": {}})
        with fmt._llm:
            answer = fmt.ask(held, [tool])
        assert fmt.text(answer) == "two files" and not fmt.calls(answer)
        assert held == CONVERSATIONS[api]  # not changed by the call
        (sent,) = [r["json"] for r in mock.requests]
        system = [{"role": "system", "content": "be brief"}] if api == "openai" else []
        assert sent["messages"] == [*system, *CONVERSATIONS[api]]
        assert (sent["model"], sent["tools"], sent.get("stream", False)) == ("m", [tool], stream)
        if api == "anthropic":
            assert (sent["system"], sent["max_tokens"]) == ("be brief", 64)
    finally:
        asyncio.run_coroutine_threadsafe(mock.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_plain_http_proxy_costs_its_client_no_ca_bundle(
    api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's proxy is plain HTTP: the SDK client the runtime makes for it gets a TLS
    context that trusts nothing (no CA bundle read: 20 ms of CPU a client), so a redirect to
    https fails its certificate check; an https base URL keeps the SDK's own default."""
    import ssl

    var = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}[api]
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")

    def context(base_url: str) -> ssl.SSLContext:
        monkeypatch.setenv(var, base_url)
        fmt: Any = formats.make(api, model="m", system=None, stream=False, max_tokens=16)
        # httpx2's transport keeps the context its connection pool will use.
        ctx: ssl.SSLContext = fmt._llm._client._transport._pool._ssl_context
        return ctx

    plain = context("http://10.0.0.1:8080" + ("/v1" if api == "openai" else ""))
    assert plain.cert_store_stats()["x509_ca"] == 0
    assert plain.verify_mode is ssl.CERT_REQUIRED and plain.check_hostname
    tls = context("https://example.invalid" + ("/v1" if api == "openai" else ""))
    assert tls.cert_store_stats()["x509_ca"] > 0


def test_budget_reads_its_own_spend_on_one_connection_across_idle_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`Agent.spent` takes the spend the proxy told with the last answer; without one it asks
    the proxy for this task's usage alone on one kept connection, and when the proxy has closed
    it while idle (a long step), the next check reconnects once."""
    import asyncio
    import threading

    from aiohttp import web

    from agentnode.runtime.loop import Agent

    asked: list[tuple[str, int]] = []

    async def usage(request: web.Request) -> web.Response:
        asked.append((request.query_string, id(request.transport)))
        rows = [{"task": request.query["task"], "cost": "0.25"}, {"task": "other", "cost": "9"}]
        return web.json_response({"data": rows})

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_get("/v1/usage", usage)
    runner = web.AppRunner(app, keepalive_timeout=0.2)  # closes idle connections soon

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "token")
    agent = object.__new__(Agent)  # only what `spent` reads: no node needed
    agent.task = type("Task", (), {"id": "t-1"})()
    agent.format = type("Untold", (), {"spent": None})()  # no answer told a spend
    agent._usage = None
    try:
        assert agent.spent() == agent.spent() == Decimal("0.25")
        assert asked[0][1] == asked[1][1], "the second check reuses the connection"
        time.sleep(0.6)  # the proxy closes it
        assert agent.spent() == Decimal("0.25")
        assert all(q == "group_by=task&task=t-1" for q, _ in asked) and len(asked) == 3
        # Once the last answer told the spend, a check asks nothing.
        agent.format = type("Told", (), {"spent": Decimal("0.125")})()
        assert agent.spent() == Decimal("0.125") and len(asked) == 3
    finally:
        assert agent._usage is not None
        agent._usage[0].close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
