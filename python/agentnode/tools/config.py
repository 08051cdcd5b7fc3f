"""The `[tools]` table of agentnode.toml: limits of the built-ins, the web_search backend,
and the MCP servers (`[tools.mcp.NAME]`) the node runs."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from agentnode.egress.mode import network_and_policy
from agentnode.errors import AgentnodeError, ConfigError
from agentnode.isolation.spec import SpecError, parse_mount
from agentnode.isolation.units import parse_duration, parse_size
from agentnode.tools.code import NETWORKS
from agentnode.tools.mcpservers import SERVER_LIMITS, MCPServerSpec
from agentnode.tools.registry import ToolLimits

__all__ = ["ToolsConfig", "parse_tools_config"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolsConfig:
    """What `[tools]` says (every key has a default: no table means the built-ins only)."""

    run_code: ToolLimits = field(default_factory=ToolLimits)
    #: `run_code`'s network: "none", or "task" (the calling task's own mode and policy).
    run_code_network: str = "none"
    web: ToolLimits = field(default_factory=lambda: ToolLimits(memory=128 << 20))
    search_url: str | None = None
    search_network: str = "egress"
    #: Also serve the MCP endpoint on this TCP port of the node bridge (tasks with egress).
    mcp_port: int | None = None
    mcp: tuple[MCPServerSpec, ...] = field(default_factory=tuple)


def _limits(name: str, table: dict[str, Any], base: ToolLimits) -> ToolLimits:
    values: dict[str, Any] = {}
    for key, parse in (("memory", parse_size), ("output", parse_size)):
        if key in table:
            v = table[key]
            values[key] = parse(str(v), option=f"{name}.{key}") if isinstance(v, str) else v
    if "timeout" in table:
        v = table["timeout"]
        values["timeout"] = parse_duration(v, option=f"{name}.timeout") if isinstance(v, str) else v
    for key in ("cpus", "pids"):
        if key in table:
            values[key] = table[key]
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ConfigError(f"{name}.{key}: must be a positive number, got {v!r}")
    return ToolLimits(**{**_fields(base), **values})


def _fields(limits: ToolLimits) -> dict[str, Any]:
    return {k: getattr(limits, k) for k in ("cpus", "memory", "pids", "timeout", "output")}


_LIMIT_KEYS = {"memory", "output", "timeout", "cpus", "pids"}
_MCP_KEYS = _LIMIT_KEYS | {
    "command",
    "url",
    "env",
    "network",
    "allow",
    "allow_hosts",
    "idle",
    "tenants",
    "ro",
    "rw",
    "user",
    "idempotent",
    "cwd",
}

#: What applies to a server a user runs at a url (the node only connects to it).
_USER_SERVER_KEYS = {"url", "timeout", "idle", "tenants", "idempotent"}


def _check_keys(name: str, table: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: must be a table")
    for key in table:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return table


def _server(name: str, table: Any) -> MCPServerSpec:
    where = f"tools.mcp.{name}"
    t = _check_keys(where, table, _MCP_KEYS)
    command = t.get("command", [])
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise ConfigError(f"{where}.command: must be a non-empty list of strings")
    url = t.get("url")
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"{where}.url: must be a string, got {url!r}")
    if url is None and not command:
        raise ConfigError(f"{where}: give a command to run, a url to connect to, or both")
    if not command:
        for key in t:
            if key not in _USER_SERVER_KEYS:
                raise ConfigError(
                    f"{where}.{key}: applies only to a server the node runs (give its command)"
                )
    env = t.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{where}.env: must be a table of strings")
    mode, policy = network_and_policy(
        t.get("network", "none"),
        allow=t.get("allow", []),
        hosts=t.get("allow_hosts", []),
        names={
            "mode": f"{where}.network",
            "allow": f"{where}.allow",
            "hosts": f"{where}.allow_hosts",
        },
    )
    mounts = []
    for key in ("ro", "rw"):
        for spec in t.get(key, []):
            try:
                mount = parse_mount(key, spec)
            except SpecError as e:
                raise ConfigError(f"{where}.{e!s}") from None
            if not os.path.exists(mount.src):
                raise ConfigError(f"{where}.{key}: {mount.src!r} does not exist on this host")
            mounts.append(mount)
    tenants = t.get("tenants")
    idle = t.get("idle", 300)
    return MCPServerSpec(
        name=name,
        command=tuple(command),
        url=url,
        env=env,
        network=mode,
        egress=policy,
        limits=_limits(where, t, SERVER_LIMITS),
        mounts=tuple(mounts),
        cwd=str(t.get("cwd", "/workspace")),
        user=str(t.get("user", "65534")),
        idle_s=parse_duration(idle, option=f"{where}.idle") if isinstance(idle, str) else idle,
        tenants=None if tenants is None else frozenset(tenants),
        idempotent=bool(t.get("idempotent", False)),
    )


def parse_tools_config(table: Any) -> ToolsConfig:
    """A `ToolsConfig` from the `[tools]` table; `ConfigError` names the bad key."""
    t = _check_keys("tools", table, {"run_code", "http_fetch", "web_search", "mcp", "mcp_port"})
    try:
        search = _check_keys("tools.web_search", t.get("web_search", {}), {"url", "network"})
        servers = _check_keys("tools.mcp", t.get("mcp", {}), set(t.get("mcp", {})))
        url = search.get("url")
        if url is not None:
            parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"tools.web_search.url: give http(s)://host[:port], got {url!r}")
        port = t.get("mcp_port")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
        ):
            raise ConfigError(f"tools.mcp_port: must be a port number, got {port!r}")
        run_code = _check_keys("tools.run_code", t.get("run_code", {}), _LIMIT_KEYS | {"network"})
        network = run_code.get("network", "none")
        if network not in NETWORKS:
            raise ConfigError(
                f'tools.run_code.network: use "none" or "task" (the calling task\'s own '
                f"network and egress policy), got {network!r}"
            )
        return ToolsConfig(
            run_code=_limits("tools.run_code", run_code, ToolLimits()),
            run_code_network=network,
            web=_limits(
                "tools.http_fetch",
                _check_keys("tools.http_fetch", t.get("http_fetch", {}), _LIMIT_KEYS),
                ToolsConfig().web,
            ),
            search_url=search.get("url"),
            search_network=search.get("network", "egress"),
            mcp_port=port,
            mcp=tuple(_server(name, s) for name, s in servers.items()),
        )
    except ConfigError:
        raise
    except AgentnodeError as e:
        raise ConfigError(str(e)) from None
