"""Layer 6: agent frameworks as task kinds (`agentnode submit --agent KIND`).

A kind prepares a task for its framework so the agent's own code needs no change: every kind
gets each SDK's base-URL variables pointing at the node's inference proxy (the task's token as
the API key) and an egress policy that reaches the node's services and no public LLM provider;
`openclaw` also gets OpenClaw's config and its headless command. See docs/agents.md.
"""

from agentnode.agents.kinds import KINDS, LLM_HOSTS, AgentSpec, llm_environment, prepare

__all__ = ["KINDS", "LLM_HOSTS", "AgentSpec", "llm_environment", "prepare"]
