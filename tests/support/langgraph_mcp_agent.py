"""A LangGraph agent as users write one (a prebuilt ReAct agent, langchain-openai) whose tools
come from `langchain-mcp-adapters` on $AGENTNODE_MCP_URL with the task's token, run as an
agentnode task by tests in its own environment (mcp 1.x). Nothing here knows the node beyond
those variables and the proxy's. Last line: a JSON report."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent


async def main() -> None:
    metas: list[Any] = []

    async def keep_meta(request: Any, handler: Any) -> Any:
        # A tool-call interceptor (the adapters' own hook): sees the raw CallToolResult.
        result = await handler(request)
        metas.append((result.meta or {}).get("agentnode"))
        return result

    client = MultiServerMCPClient(
        {"agentnode": {
            "transport": "streamable_http", "url": os.environ["AGENTNODE_MCP_URL"],
            "headers": {"Authorization": f"Bearer {os.environ['AGENTNODE_TOKEN']}"},
        }},
        tool_interceptors=[keep_meta],
    )  # fmt: skip
    tools = await client.get_tools()
    agent = create_react_agent(ChatOpenAI(model="gpt-test"), tools)
    out = await agent.ainvoke({"messages": [("user", "What is 20 + 22?")]})
    messages = out["messages"]
    print(json.dumps({
        "listed": sorted(t.name for t in tools),
        "final": messages[-1].content,
        "tool_messages": [m.content for m in messages if m.type == "tool"],
        "metas": metas,
    }))  # fmt: skip


asyncio.run(main())
