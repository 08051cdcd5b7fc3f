"""Agent kinds: what each one changes in a task before it is queued.

The node's egress is deny-by-default with DNS names resolved only when a host rule allows them,
so an agent task given no rules reaches the node's services (the inference proxy among them)
and nothing else. `prepare` keeps it so: it refuses host rules that would let the task resolve
a public LLM provider (it would spend unmetered, past the proxy), and `host` networking.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from agentnode.egress.policy import HostRule, parse_host
from agentnode.errors import PolicyError, TaskError
from agentnode.isolation.spec import Mount
from agentnode.tasks.model import DEFAULT_MEMORY, TaskSpec

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from typing import Any


__all__ = ["KINDS", "LLM_HOSTS", "AgentSpec", "agents_cache", "llm_environment", "prepare"]

#: `python`: any command (a custom agent); `langgraph`: a LangGraph program; `openclaw`: one
#: headless OpenClaw turn whose message is the task's command words; `autogpt`: AutoGPT classic
#: run headless for `steps` steps with the command words as its goal.
KINDS = ("python", "langgraph", "openclaw", "autogpt")

#: Public LLM API hosts an agent task may never resolve (`*.` covers every name under it).
LLM_HOSTS = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "*.openai.azure.com",
    "api.mistral.ai",
    "api.cohere.com",
    "api.cohere.ai",
    "api.groq.com",
    "api.deepseek.com",
    "api.x.ai",
    "api.together.xyz",
    "api.fireworks.ai",
    "api.perplexity.ai",
    "openrouter.ai",
    "api.openrouter.ai",
)

#: What an OpenClaw turn is given unless the submitter chose (one peaks near 835 MB).
_OPENCLAW_MEMORY = 2 << 30

_MODEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/@-")


@dataclass(frozen=True, kw_only=True)
class AgentSpec:
    """The `agent` object of a task submission: its kind and the kind's options."""

    kind: str
    #: The model the agent uses, as the proxy's deployments name it (openclaw: required).
    model: str = ""
    #: autogpt: its --continuous-limit (0: `autogpt.DEFAULT_STEPS`).
    steps: int = 0

    @classmethod
    def parse(cls, obj: Any) -> AgentSpec:
        """From JSON (`{"kind": ..., "model"?: ..., "steps"?: ...}`); `TaskError` names the
        bad field."""
        if not isinstance(obj, dict):
            raise TaskError(f'agent must be an object like {{"kind": "langgraph"}}, got {obj!r}')
        unknown = set(obj) - {"kind", "model", "steps"}
        if unknown:
            raise TaskError(
                f"agent has unknown fields {sorted(unknown)} (known: kind, model, steps)"
            )
        kind, model, steps = obj.get("kind"), obj.get("model", ""), obj.get("steps", 0)
        if kind not in KINDS:
            raise TaskError(f"agent kind {kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(model, str) or len(model) > 200 or not set(model) <= _MODEL_CHARS:
            raise TaskError(f"agent model {model!r} is not a model name (letters, digits, ._:/@-)")
        if kind == "openclaw" and not model:
            raise TaskError("agent kind openclaw needs a model (e.g. --model gpt-4o)")
        if "steps" in obj and (
            type(steps) is not int or not 1 <= steps <= 1000 or kind != "autogpt"
        ):
            raise TaskError(
                f"agent steps {steps!r}: an autogpt agent's step limit, an integer 1-1000"
            )
        if kind == "autogpt":
            from agentnode.agents.autogpt import MODELS

            if model and model not in MODELS:
                raise TaskError(
                    f"agent model {model!r}: AutoGPT 0.2.2 counts tokens only for "
                    f"{', '.join(MODELS)} (serve one of them on the proxy)"
                )
        return cls(kind=kind, model=model, steps=steps)


def llm_environment(base_url: str, token: str) -> dict[str, str]:
    """The variables each SDK reads for its endpoint and key, all pointing at the proxy
    (`base_url`, no path) with the task's token: the OpenAI and Anthropic SDKs, LangChain
    (`OPENAI_API_BASE` before `OPENAI_BASE_URL`, `ANTHROPIC_API_URL`) and AutoGPT
    (`OPENAI_API_BASE_URL`)."""
    openai = base_url + "/v1"
    return {
        "OPENAI_BASE_URL": openai,
        "OPENAI_API_BASE": openai,
        "OPENAI_API_BASE_URL": openai,
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_URL": base_url,
        "OPENAI_API_KEY": token,
        "ANTHROPIC_API_KEY": token,
    }


def agents_cache(data_dir: Path) -> Path:
    """Where agent runtimes are installed on this node: $AGENTNODE_AGENTS_CACHE, else
    DATA_DIR/agents."""
    return Path(os.environ.get("AGENTNODE_AGENTS_CACHE") or data_dir / "agents")


def _llm_rule(rule: HostRule) -> str | None:
    """The provider host `rule` would let a task resolve, if any."""
    for host in LLM_HOSTS:
        probe = "probe" + host[1:] if host.startswith("*.") else host
        if rule.matches(probe) or (host.startswith("*.") and rule.pattern.endswith(host[1:])):
            return host
    return None


def prepare(spec: TaskSpec, agent: AgentSpec, *, network_given: bool, cache: Path) -> TaskSpec:
    """`spec` made ready for `agent`'s kind; `TaskError` says what cannot be allowed."""
    sandbox = spec.sandbox
    network = sandbox.network if network_given else "egress"
    if network == "host":
        raise TaskError(
            "agent tasks cannot use network host: it bypasses the egress policy that keeps "
            "their LLM calls on the node's proxy (use egress, the default for agents)"
        )
    for text in sandbox.allow_hosts:
        try:
            host = _llm_rule(parse_host(text))
        except PolicyError as e:
            raise TaskError(f"allow_hosts {text!r}: {e}") from None
        if host is not None:
            raise TaskError(
                f"allow_hosts {text!r} would let an agent reach {host} directly, unmetered "
                "(agents reach LLMs through the node's proxy: drop the rule)"
            )
    env = dict(sandbox.env)
    env["AGENTNODE_AGENT"] = agent.kind
    if agent.model:
        env["AGENTNODE_MODEL"] = agent.model
    command, mounts, memory = spec.command, sandbox.mounts, spec.memory_bytes
    if agent.kind == "openclaw":
        if memory == DEFAULT_MEMORY:
            memory = _OPENCLAW_MEMORY
        elif memory < _OPENCLAW_MEMORY // 2:
            raise TaskError(
                f"agent kind openclaw needs memory of at least 1G (a turn peaks near 835 MB), "
                f"got {memory >> 20} MiB (default for openclaw: 2G)"
            )
        from agentnode.agents import openclaw

        home = openclaw.installed(cache)
        command = openclaw.task_command(
            home, model=agent.model, timeout_s=spec.timeout_s, message=" ".join(spec.command)
        )
        # Under its host path: the root file system is the host's, read-only, and a bind to a
        # path that exists there needs no new mount point.
        mounts = (*mounts, Mount(str(home), str(home)))
    elif agent.kind == "autogpt":
        from agentnode.agents import autogpt

        home = autogpt.installed(cache)
        command = autogpt.task_command(
            home,
            model=agent.model or autogpt.MODELS[0],
            steps=agent.steps or autogpt.DEFAULT_STEPS,
            message=" ".join(spec.command),
        )
        mounts = (*mounts, Mount(str(home), str(home)))
    sandbox = replace(
        sandbox,
        network=network,
        env=tuple(env.items()),
        mounts=mounts,
        limits=replace(sandbox.limits, memory=memory),
    )
    return replace(spec, sandbox=sandbox, agent=agent.kind, command=command)
