"""Everything of Layer 5 a node holds: the registry of built-ins, the MCP servers, the call
service, and how a task (by token or id) becomes a `Caller`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agentnode.egress.service import EgressService
from agentnode.isolation.spec import SpecError
from agentnode.tasks.model import Task
from agentnode.tools.code import CodeRunner
from agentnode.tools.config import ToolsConfig
from agentnode.tools.files import file_tools
from agentnode.tools.keys import KeyStore
from agentnode.tools.mcpservers import MCPServers
from agentnode.tools.registry import Caller, Registry
from agentnode.tools.sandboxed import sweep_scratch
from agentnode.tools.service import Record, ToolService, jsonl_recorder
from agentnode.tools.web import WebTools

__all__ = ["Toolbox", "caller_for"]


def caller_for(task: Task, workspaces: Path, alive: Callable[[], bool] | None = None) -> Caller:
    """The caller a task is: its tenant, workspace, user and its own network and policy;
    `alive` for the task's own calls, which end with it."""
    spec = task.spec
    try:
        mode, policy = spec.sandbox.egress()
    except SpecError:
        mode, policy = "none", None
    return Caller(
        task=task.id,
        tenant=spec.tenant,
        workspace=workspaces / task.id,
        network=mode,
        egress=policy,
        user=spec.sandbox.user,
        userns=spec.sandbox.userns,
        task_limits=spec.sandbox.limits,
        **({} if alive is None else {"alive": alive}),
    )


class Toolbox:
    """The node's tools. `on_record` receives each call's audit record (default: JSON lines
    in DATA_DIR/tools.log)."""

    def __init__(
        self,
        config: ToolsConfig,
        *,
        data_dir: Path,
        node_network: EgressService | None = None,
        on_record: Record | None = None,
        held_back: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.config = config
        sweep_scratch(data_dir)
        self.code = CodeRunner(
            limits=config.run_code, network=config.run_code_network, node_network=node_network
        )
        web = WebTools(
            node_network=node_network,
            limits=config.web,
            search_url=config.search_url,
            search_network=config.search_network,
        )
        self.registry = Registry([self.code.tool(), *file_tools(), *web.tools()])
        self.mcp = MCPServers(config.mcp, node_network=node_network)
        #: Idempotency keys' first results, kept across restarts of the node.
        self.keys = KeyStore(data_dir / "tools" / "keys")
        self.service = ToolService(
            self.registry,
            on_record=on_record or jsonl_recorder(data_dir / "tools.log"),
            sources=[self.mcp],
            keys=self.keys,
            held_back=held_back,
        )

    def end_task(self, task_id: str) -> None:
        """Ends what a task held: its run_code sessions."""
        self.code.end_task(task_id)

    async def close(self) -> None:
        self.code.close()
        await self.mcp.close()
        self.keys.close()
