"""A LangGraph agent as users write one (langchain-openai, a prebuilt ToolNode), run as an
agentnode task by tests: it knows nothing of the node beyond AgentnodeCheckpointer.

It first tries what an agent ignoring its base URL would do (resolve a provider, connect to
an address directly), then runs its graph on the thread named for its task, resuming from the
last checkpoint when the node retries it. Its tool `crash_once`, the first time it runs (after
the graph's second LLM call), notes that it ran, says so and waits to be killed from outside
(the test sends SIGKILL, as the OOM killer would). Last line: a JSON report.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request

from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from agentnode.errors import NotFoundError
from agentnode.integrations.langgraph import AgentnodeCheckpointer
from agentnode.sdk import Memory

TASK = os.environ["AGENTNODE_TASK_ID"]
notes = Memory()


@tool
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@tool
def crash_once() -> str:
    """Waits to be killed the first time it is called; says it survived after that."""
    try:
        notes.get("agent-test", TASK, "crashed")
    except NotFoundError:
        notes.append("agent-test", TASK, {"at": time.time()}, id="crashed", sync=True)
        print("crash_once: waiting to be killed", flush=True)
        time.sleep(120)
    return "survived"


def escape_attempts(address: str) -> dict[str, str]:
    out = {}
    try:
        socket.getaddrinfo("api.openai.com", 443)
        out["resolve"] = "resolved"
    except OSError as e:
        out["resolve"] = type(e).__name__
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((address, 443))
        out["connect"] = "connected"
    except OSError as e:
        out["connect"] = f"errno {e.errno}"
    finally:
        s.close()
    return out


def main() -> None:
    escaped = escape_attempts(sys.argv[1])
    llm = ChatOpenAI(model=os.environ["AGENTNODE_MODEL"], max_retries=0).bind_tools(
        [add, crash_once]
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [llm.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode([add, crash_once]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    saver = AgentnodeCheckpointer(Memory())
    graph = builder.compile(checkpointer=saver)
    config: RunnableConfig = {"configurable": {"thread_id": TASK}}
    resumed = saver.get_tuple(config) is not None
    start: MessagesState | None = (
        None if resumed else {"messages": [HumanMessage("add 2 and 3, then crash once")]}
    )
    # "sync": each super-step's checkpoint is stored before the next starts, so a SIGKILL
    # loses no completed step (LangGraph's default, "async", saves it while the next runs).
    result = graph.invoke(start, config, durability="sync")
    req = urllib.request.Request(
        os.environ["OPENAI_API_BASE"] + "/usage?group_by=tenant,task",
        headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]},
    )
    usage = json.load(urllib.request.urlopen(req))["data"]
    final = result["messages"][-1].content
    print(json.dumps({"final": final, "resumed": resumed, "usage": usage, **escaped}))


if __name__ == "__main__":
    main()
