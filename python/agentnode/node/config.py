"""agentnode.toml: the node's settings, with embedded defaults for every key.

Errors name the key and the line of the file it is on, so `agentnode run` can print one line a
user can act on.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dns.exception
import dns.rdatatype

from agentnode.egress.network import NodeNetwork
from agentnode.errors import ConfigError, PolicyError, UsageError
from agentnode.inference.config import ProxyConfig
from agentnode.inference.config import parse_config as parse_proxy_config
from agentnode.isolation.units import parse_duration
from agentnode.node.paths import DEFAULT_DATA_DIR, DEFAULT_SOCKET
from agentnode.tasks.model import CLASSES
from agentnode.tools.config import ToolsConfig, parse_tools_config

__all__ = ["NodeConfig", "TenantConfig", "load_config"]


@dataclass(frozen=True)
class TenantConfig:
    """A tenant's fair-share weight and running limit (0: none)."""

    weight: int = 1
    running: int = 0


@dataclass(frozen=True)
class NodeConfig:
    """Every setting of the node; `load_config` fills it from a TOML file."""

    data_dir: Path = DEFAULT_DATA_DIR
    socket: Path = DEFAULT_SOCKET
    listen: str | None = None
    api_token: str | None = None
    grace_s: float = 10.0
    #: A running task's log is rotated past this size (0: never); see `agentnode.node.logcap`.
    log_max_bytes: int = 100 << 20
    reserve_cpu_millis: int = 250
    reserve_memory_bytes: int = 256 << 20
    max_queued: int = 10_000
    tenant_queue_cap: int = 1000
    tenant_running: int = 0
    class_running: tuple[tuple[str, int], ...] = ()
    aging: int = 64
    retry_max_attempts: int = 1
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    #: Task networking (mode egress): the node bridge, its subnet, and where allowed names
    #: are resolved ("HOST" or "HOST:PORT"; default the host's first resolv.conf nameserver).
    bridge: str = "agentnode0"
    subnet: str = "10.88.0.0/24"
    dns_upstream: tuple[str, int] | None = None
    #: What the DNS forwarder lets each task send upstream (see docs/egress.md): queries per
    #: second (bursts of twice as many), label and name length under wildcard rules, and
    #: record types allowed besides the address types (e.g. ["TXT"]).
    dns_rate: float = 50.0
    dns_max_label: int = 40
    dns_max_name: int = 120
    dns_types: tuple[str, ...] = ()
    #: The inference proxy, started with the node when the file has an [inference] table.
    inference: ProxyConfig | None = None
    #: Layer 5: built-in tool limits, the web_search backend, MCP servers ([tools]).
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    #: Trace every exec inside every task into the audit log ([audit] exec_trace).
    exec_trace: bool = True
    #: On SIGTERM, leave the running tasks running for the next start to re-adopt (an
    #: upgrade) rather than stop them ([node] keep_tasks, `agentnode run --keep-tasks`).
    keep_tasks: bool = False
    #: Retention ([retention]): ended tasks' workspaces, logs and records are removed this
    #: long after they ended (failed, timed-out and lost ones after `retention_failed_s`), by a
    #: sweep every `retention_interval_s` and by `agentnode gc`.
    retention_ended_s: float = 7 * 86400.0
    retention_failed_s: float = 30 * 86400.0
    retention_interval_s: float = 600.0
    #: Where task timelines are exported as OpenTelemetry spans (OTLP/HTTP); None: not exported.
    otlp_endpoint: str | None = None
    source: Path | None = None


# (section, key) -> (NodeConfig field, type, converter description)
_KEYS: dict[tuple[str, str], tuple[str, type]] = {
    ("node", "data_dir"): ("data_dir", str),
    ("node", "socket"): ("socket", str),
    ("node", "listen"): ("listen", str),
    ("node", "api_token"): ("api_token", str),
    ("node", "grace"): ("grace_s", float),
    ("node", "reserve_cpus"): ("reserve_cpu_millis", float),
    ("node", "reserve_memory_mb"): ("reserve_memory_bytes", int),
    ("node", "log_max_mb"): ("log_max_bytes", int),
    ("scheduler", "max_queued"): ("max_queued", int),
    ("scheduler", "tenant_queue_cap"): ("tenant_queue_cap", int),
    ("scheduler", "tenant_running"): ("tenant_running", int),
    ("scheduler", "aging"): ("aging", int),
    ("retry", "max_attempts"): ("retry_max_attempts", int),
    ("retry", "base"): ("retry_base_s", float),
    ("retry", "max"): ("retry_max_s", float),
    ("network", "bridge"): ("bridge", str),
    ("network", "subnet"): ("subnet", str),
    ("network", "dns_upstream"): ("dns_upstream", str),
    ("network", "dns_rate"): ("dns_rate", float),
    ("network", "dns_max_label"): ("dns_max_label", int),
    ("network", "dns_max_name"): ("dns_max_name", int),
    ("telemetry", "otlp_endpoint"): ("otlp_endpoint", str),
}


def _line_of(text: str, key: str) -> int | None:
    """The 1-based line on which `key` is assigned (the last part of a dotted key)."""
    pattern = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return n
    return None


class _Reader:
    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def error(self, key: str, problem: str) -> ConfigError:
        line = _line_of(self.text, key.rsplit(".", 1)[-1])
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {problem}")

    def number(self, key: str, value: Any, kind: type, *, minimum: float = 0) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            ok = ok and isinstance(value, int)
        if not ok or value < minimum:
            want = "an integer" if kind is int else "a number"
            raise self.error(key, f"must be {want} >= {minimum:g}, got {value!r}")
        return value


def load_config(path: Path | None, **overrides: Any) -> NodeConfig:
    """Reads `path` (None: embedded defaults only), then applies non-None `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror} (check --config)") from e
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
        values = _parse(_Reader(path, text), doc)
        values["source"] = path
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("data_dir", "socket"):
        if key in values:
            values[key] = Path(values[key])
    if values.pop("inference_in_data_dir", False):
        data_dir = values.get("data_dir", DEFAULT_DATA_DIR)
        values["inference"] = replace(values["inference"], state_dir=data_dir / "inference")
    return NodeConfig(**values)


def _parse(r: _Reader, doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, table in doc.items():
        if section == "tenants":
            out["tenants"] = _tenants(r, table)
            continue
        if section == "inference":
            if not isinstance(table, dict):
                raise r.error(section, "must be a table like [inference]")
            try:
                out["inference"] = parse_proxy_config(table)
            except ConfigError as e:
                raise ConfigError(f"{r.path}: {e}") from None
            # Without its own state_dir, the proxy keeps its ledger in the node's data dir.
            out["inference_in_data_dir"] = "state_dir" not in table
            continue
        if section == "tools":
            try:
                out["tools"] = parse_tools_config(table)
            except ConfigError as e:
                raise r.error(str(e).split(":", 1)[0], str(e).split(": ", 1)[-1]) from None
            continue
        if not isinstance(table, dict):
            raise r.error(section, "must be a table like [node]")
        for key, value in table.items():
            name = f"{section}.{key}"
            if (section, key) == ("scheduler", "class_running"):
                out["class_running"] = _class_running(r, name, value)
                continue
            if (section, key) in _BOOLS:
                if not isinstance(value, bool):
                    raise r.error(name, f"must be true or false, got {value!r}")
                out[_BOOLS[section, key]] = value
                continue
            if section == "retention" and key in _RETENTION:
                out[_RETENTION[key]] = _duration(r, name, value)
                continue
            if (section, key) == ("network", "dns_types"):
                out["dns_types"] = _dns_types(r, name, value)
                continue
            if (section, key) not in _KEYS:
                known = ", ".join(sorted(f"{s}.{k}" for s, k in _KEYS))
                raise r.error(
                    name,
                    f"unknown key (known: {known}, scheduler.class_running, network.dns_types, "
                    "audit.exec_trace, node.keep_tasks, retention.ended, retention.failed, "
                    "retention.interval)",
                )
            field_name, kind = _KEYS[(section, key)]
            if kind is str:
                if not isinstance(value, str) or not value:
                    raise r.error(name, f"must be a non-empty string, got {value!r}")
                out[field_name] = value
            elif field_name == "reserve_cpu_millis":
                out[field_name] = int(r.number(name, value, float) * 1000)
            elif field_name in ("reserve_memory_bytes", "log_max_bytes"):
                out[field_name] = r.number(name, value, int) << 20
            else:
                minimum = 1 if field_name in _AT_LEAST_ONE else 0
                out[field_name] = r.number(name, value, kind, minimum=minimum)
    _check_network(r, out)
    return out


_AT_LEAST_ONE = frozenset({"retry_max_attempts", "dns_rate", "dns_max_label", "dns_max_name"})


#: (section, key) of the true/false settings -> NodeConfig field.
_BOOLS = {("audit", "exec_trace"): "exec_trace", ("node", "keep_tasks"): "keep_tasks"}

_RETENTION = {
    "ended": "retention_ended_s",
    "failed": "retention_failed_s",
    "interval": "retention_interval_s",
}


def _duration(r: _Reader, name: str, value: Any) -> float:
    """Seconds in a duration setting: a number of seconds or text like "7d", "12h"."""
    if isinstance(value, str):
        try:
            return parse_duration(value, option=name)
        except UsageError as e:
            raise r.error(name, str(e).split(": ", 1)[-1]) from None
    return float(r.number(name, value, float, minimum=0.001))


def _dns_types(r: _Reader, name: str, value: Any) -> tuple[str, ...]:
    """Record type names (TXT, NULL, ...), each one dnspython knows."""
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise r.error(name, f'must be a list of record type names like ["TXT"], got {value!r}')
    for t in value:
        try:
            dns.rdatatype.from_text(t)
        except dns.exception.DNSException:
            raise r.error(name, f"{t!r} is not a DNS record type (e.g. TXT, NULL)") from None
    return tuple(t.upper() for t in value)


def _check_network(r: _Reader, out: dict[str, Any]) -> None:
    for key in ("bridge", "subnet"):
        if key in out:
            try:
                NodeNetwork(**{key: out[key]})
            except PolicyError as e:
                raise r.error(f"network.{key}", str(e)) from None
    if "dns_upstream" in out:
        try:
            out["dns_upstream"] = parse_upstream(out["dns_upstream"])
        except ValueError as e:
            raise r.error("network.dns_upstream", str(e)) from None


def parse_upstream(value: str) -> tuple[str, int]:
    """ "HOST" or "HOST:PORT" (an IPv4 address; port 53 by default) as (host, port)."""
    host, _, port = value.partition(":")
    try:
        ipaddress.IPv4Address(host)
        number = int(port or 53)
    except ValueError:
        raise ValueError(f"must be an IPv4 address with an optional :PORT, got {value!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range 1..65535")
    return host, number


def _class_running(r: _Reader, name: str, value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        raise r.error(name, "must be a table like { batch = 4 }")
    for cls, n in value.items():
        if cls not in CLASSES:
            raise r.error(name, f"unknown class {cls!r} (use {', '.join(CLASSES)})")
        r.number(f"{name}.{cls}", n, int)
    return tuple(value.items())


def _tenants(r: _Reader, table: Any) -> dict[str, TenantConfig]:
    if not isinstance(table, dict):
        raise r.error("tenants", "must be tables like [tenants.acme]")
    out = {}
    for tenant, entry in table.items():
        if not isinstance(entry, dict):
            raise r.error(f"tenants.{tenant}", "must be a table like [tenants.acme]")
        for key in entry:
            if key not in ("weight", "running"):
                raise r.error(f"tenants.{tenant}.{key}", "unknown key (use weight, running)")
        out[tenant] = TenantConfig(
            weight=r.number(f"tenants.{tenant}.weight", entry.get("weight", 1), int, minimum=1),
            running=r.number(f"tenants.{tenant}.running", entry.get("running", 0), int),
        )
    return out
