"""Agents: what the node's checkpointer adds to a LangGraph agent step, against LangGraph's own
in-memory saver in the same run.

One run of a real LangGraph agent (langchain-openai's ChatOpenAI against the scripted mock
upstream on loopback, a prebuilt ToolNode): LLM call with a tool call, the tool, LLM call with
the answer — three super-steps, each checkpointed with `durability="sync"`. Ours:
`AgentnodeCheckpointer` over the memory API on loopback (RocksDB, each put fsynced); peer:
`InMemorySaver`. Goal (issue 26): ours <= 1.1x the peer per agent step. The proxy's own cost is
bench/proxy.py's.

The reference runtime's step (as root: a real `agentnode run` on a scratch data dir): the
runtime as a task, each step a model call through the node's proxy to the mock, `list_files`
through the node's tool API and two checkpoints (the answer, the result), against the same loop
with the `openai` SDK calling the mock directly and `os.listdir` in the benchmark's process.
Goal: <= 3 ms added per step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import SecretStr

from _harness import Bench

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from agentnode.inference.mock import MockUpstream, ToolCall, Turn
from agentnode.integrations.langgraph import AgentnodeCheckpointer
from agentnode.node.paths import DEFAULT_DATA_DIR
from agentnode.sdk import Memory
from agentnode.storage.api import make_app
from agentnode.storage.episodic import EpisodicStore
from agentnode.storage.objects import ObjectStore
from agentnode.storage.tenancy import StaticTokens
from support.node_daemon import daemon

TOKEN = "bench-token"
_THREADS = itertools.count()


@tool
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


def graph(llm: Any, saver: BaseCheckpointSaver[Any]) -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [llm.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode([add]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=saver)


REPO = Path(__file__).resolve().parents[1]
#: Timed inside the task: the loop alone, not the interpreter's start and imports.
_IN_TASK = (
    "import sys, time\n"
    "from agentnode.runtime import Agent, Limits\n"
    "agent = Agent(model='m', tools=['list_files'], limits=Limits(max_steps=1000))\n"
    "t0 = time.perf_counter(); agent.run('look'); print('ELAPSED', time.perf_counter() - t0)\n"
)


def _script(steps: int) -> deque[Turn]:
    call = Turn(tool_calls=(ToolCall("list_files", {}),))
    return deque([*([call] * (steps - 1)), Turn(text="done")])


def _direct(mock: MockUpstream, steps: int, workspace: Path) -> float:
    """The same loop with nothing of the node: the SDK to the mock, the tool in-process."""
    from openai import OpenAI

    llm = OpenAI(base_url=mock.base_url, api_key="k", max_retries=0)
    tools: Any = [{"type": "function", "function": {"name": "list_files", "parameters": {
        "type": "object", "properties": {}}}}]  # fmt: skip
    mock.script = _script(steps)
    messages: Any = [{"role": "user", "content": "look"}]
    t0 = time.perf_counter()
    while True:
        m = llm.chat.completions.create(model="m", messages=messages, tools=tools)
        msg = m.choices[0].message
        messages.append({"role": "assistant", "content": msg.content, "tool_calls": [
            c.model_dump(include={"id", "type", "function"}) for c in msg.tool_calls or ()]})  # fmt: skip
        if not msg.tool_calls:
            return (time.perf_counter() - t0) / steps
        for c in msg.tool_calls:
            entries = sorted(os.listdir(workspace))
            messages.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps(entries)})


def runtime_step(bench: Bench, mock: MockUpstream) -> None:
    """The reference runtime's per-step time as a node task against the direct loop's."""
    steps = 20 if bench.quick else 50
    DEFAULT_DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="agentnode-bench-agents-", dir=DEFAULT_DATA_DIR.parent))
    port = random.randint(20000, 30000)
    config = (
        f'[network]\nsubnet = "10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"\n'
        f'[inference]\nlisten = "127.0.0.1:{port}"\n'
        f'[inference.deployments.mock]\nkind = "openai"\nbase_url = "{mock.base_url}"\n'
        'models = ["m"]\nprice = { input = 2.5, output = 10 }\n'
    )
    ours, peer = [], []
    try:
        with daemon(root / "node", config) as d:
            for r in range(4 if bench.quick else 8):
                mock.script = _script(steps)
                task = d.submit(
                    [sys.executable, "-c", _IN_TASK], memory="512M", cpus=1, user="0",
                    ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")},
                    agent={"kind": "python"},
                )  # fmt: skip
                done = d.wait(task["id"], timeout=120)
                out = d.log(task["id"])
                if done["state"] != "succeeded":
                    why = f"{done['state']} ({done['reason']})"
                    raise RuntimeError(f"runtime task {why}: {out[-2000:]}")
                elapsed = float(out.split("ELAPSED")[-1])
                direct = _direct(mock, steps, root)
                if r:  # the first pair warms both
                    ours.append(elapsed / steps)
                    peer.append(direct)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bench.record(
        "runtime_step",
        statistics.median(ours) * 1000,
        statistics.median(peer) * 1000,
        "ms/step",
        peer_name="openai SDK to the mock + the tool in-process",
    )


def main() -> None:
    bench = Bench.from_args("agents")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        episodic = EpisodicStore(Path(tmp) / "episodic")
        objects = ObjectStore(Path(tmp) / "objects")
        app = make_app(episodic=episodic, objects=objects, auth=StaticTokens({TOKEN: "bench"}))
        runner = web.AppRunner(app, access_log=None)

        async def start() -> MockUpstream:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return await MockUpstream("openai").start()

        mock = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        llm = ChatOpenAI(model="m", base_url=mock.base_url, api_key=SecretStr("k"), max_retries=0)
        llm_tools = llm.bind_tools([add])
        turns = [Turn(tool_calls=(ToolCall("add", {"a": 2, "b": 3}),)), Turn(text="5")]

        def run(saver: BaseCheckpointSaver[Any]) -> float:
            mock.script = deque(turns)
            config: RunnableConfig = {"configurable": {"thread_id": f"t{next(_THREADS)}"}}
            t0 = time.perf_counter()
            graph(llm_tools, saver).invoke(
                {"messages": [HumanMessage("add 2 and 3")]}, config, durability="sync"
            )
            return (time.perf_counter() - t0) / 3  # per super-step

        with Memory(url, TOKEN) as memory:
            ours_saver, peer_saver = AgentnodeCheckpointer(memory, task="bench"), InMemorySaver()
            for _ in range(3):  # warm both: connections, imports, JIT-less caches
                run(ours_saver), run(peer_saver)
            ours: list[float] = []
            peer: list[float] = []
            for r in range(10 if bench.quick else 40):
                pair = [(ours, ours_saver), (peer, peer_saver)]
                for times, saver in pair if r % 2 == 0 else reversed(pair):
                    times.append(run(saver))
        if os.geteuid() == 0:
            runtime_step(bench, mock)
        bench.record(
            "langgraph_step",
            statistics.median(ours) * 1000,
            statistics.median(peer) * 1000,
            "ms/step",
            peer_name="LangGraph InMemorySaver",
        )
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        asyncio.run_coroutine_threadsafe(mock.close(), loop).result(30)
        episodic.close()
        objects.close()
    loop.call_soon_threadsafe(loop.stop)
    bench.save()


if __name__ == "__main__":
    main()
