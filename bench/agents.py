"""Agents: what the node's checkpointer adds to a LangGraph agent step, against LangGraph's own
in-memory saver in the same run.

One run of a real LangGraph agent (langchain-openai's ChatOpenAI against the scripted mock
upstream on loopback, a prebuilt ToolNode): LLM call with a tool call, the tool, LLM call with
the answer — three super-steps, each checkpointed with `durability="sync"`. Ours:
`AgentnodeCheckpointer` over the memory API on loopback (RocksDB, each put fsynced); peer:
`InMemorySaver`. Goal (issue 26): ours <= 1.1x the peer per agent step. The proxy's own cost is
bench/proxy.py's.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
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
from agentnode.inference.mock import MockUpstream, ToolCall, Turn
from agentnode.integrations.langgraph import AgentnodeCheckpointer
from agentnode.sdk import Memory
from agentnode.storage.api import make_app
from agentnode.storage.episodic import EpisodicStore
from agentnode.storage.objects import ObjectStore
from agentnode.storage.tenancy import StaticTokens

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
