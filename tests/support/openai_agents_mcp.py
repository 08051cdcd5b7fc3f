"""An OpenAI Agents SDK agent as users write one, run as an agentnode task by tests: its model
is the node's proxy (OPENAI_BASE_URL and OPENAI_API_KEY, set for the task) and its tools are
the node's, through the SDK's own `MCPServerStreamableHttp` on $AGENTNODE_MCP_URL with the
task's token. Nothing here knows the node beyond those variables. Last line: a JSON report."""

from __future__ import annotations

import asyncio
import json
import os

from agents import Agent, Runner, set_default_openai_api, set_tracing_disabled
from agents.mcp import MCPServerStreamableHttp

# The mock upstream speaks Chat Completions; traces would go to api.openai.com (denied).
set_default_openai_api("chat_completions")
set_tracing_disabled(True)


async def main() -> None:
    params = {
        "url": os.environ["AGENTNODE_MCP_URL"],
        "headers": {"Authorization": f"Bearer {os.environ['AGENTNODE_TOKEN']}"},
        "timeout": 60,
    }
    # The first listing starts the node's MCP servers in their sandboxes: more than the SDK's
    # default 5 s read timeout on a loaded machine.
    async with MCPServerStreamableHttp(
        params,  # type: ignore[arg-type]
        name="agentnode",
        use_structured_content=True,
        client_session_timeout_seconds=60,
    ) as node:
        listed = sorted(t.name for t in await node.list_tools())
        agent = Agent(name="adder", instructions="Add with the tool.", model="gpt-test",
                      mcp_servers=[node])  # fmt: skip
        run = await Runner.run(agent, "What is 20 + 22?")
        outputs = [i.output for i in run.new_items if i.type == "tool_call_output_item"]
        # The same client's raw result: what the node adds in `_meta`.
        direct = (await node.call_tool("t__add", {"a": 1, "b": 2})).model_dump(by_alias=True)
    print(json.dumps({
        "listed": listed, "final": run.final_output, "outputs": outputs,
        "structured": direct["structuredContent"], "meta": direct["_meta"]["agentnode"],
    }))  # fmt: skip


asyncio.run(main())
