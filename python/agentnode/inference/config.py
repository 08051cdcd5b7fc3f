"""The inference proxy's configuration: deployments, routes, aliases, tenants.

It lives under `[inference]` in the node's TOML (or at the top level of a proxy-only file).
Every error names the offending key, e.g. `inference.deployments.gpt.price.output`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from agentnode.errors import ConfigError

__all__ = [
    "Deployment",
    "Price",
    "ProxyConfig",
    "Route",
    "Tenant",
    "from_environment",
    "load_config",
    "parse_config",
]

KINDS = ("openai", "anthropic")
#: `prompt_cache`: "auto" marks requests from agent tasks, "always" every request, "off" none.
PROMPT_CACHE_MODES = ("auto", "always", "off")
PROMPT_CACHE_TTLS = ("5m", "1h")
#: Whose requests share a `prompt_cache_key` on OpenAI-compatible deployments.
PROMPT_CACHE_KEYS = ("task", "tenant", "off")
BUCKETS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens for each usage bucket."""

    input: Decimal = Decimal(0)
    cached_input: Decimal = Decimal(0)
    #: Prompt-cache writes with the 5 min TTL (OpenAI has no other).
    cache_write: Decimal = Decimal(0)
    #: Prompt-cache writes with Anthropic's 1 h TTL.
    cache_write_1h: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    reasoning: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One upstream endpoint serving one or more models."""

    name: str
    kind: str
    base_url: str
    api_key: str | None
    models: tuple[str, ...]
    price: Price
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    timeout: float = 600.0
    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0
    retries: int = 2
    prompt_cache: str = "auto"
    prompt_cache_ttl: str = "5m"
    #: No breakpoint where the prefix is estimated shorter (the provider would not cache it).
    prompt_cache_min_tokens: int = 1024
    prompt_cache_key: str = "task"
    #: Per model, from the price table, when the deployment configures no `price`.
    model_prices: dict[str, Price] = field(default_factory=dict)

    def price_of(self, model: str) -> Price:
        """What `model` costs here: the configured price, else the price table's."""
        return self.model_prices.get(model, self.price)


@dataclass(frozen=True, slots=True)
class Route:
    """A name clients may use as `model` (or in `x-agentnode-route`): models in fallback order."""

    name: str
    models: tuple[str, ...]
    cache: bool = False
    #: Override the deployments' `prompt_cache` and `prompt_cache_ttl` for this route.
    prompt_cache: str | None = None
    prompt_cache_ttl: str | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who pays: matched by API key; optional per-tenant and per-task limits and budgets (USD)."""

    name: str
    api_keys: tuple[str, ...]
    budget: Decimal | None = None
    task_budget: Decimal | None = None
    rpm: int | None = None
    tpm: int | None = None
    task_rpm: int | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The whole proxy configuration (see `parse_config`)."""

    host: str = "127.0.0.1"
    port: int = 4000
    state_dir: Path = Path("/var/lib/agentnode/inference")
    cache_ttl: float = 300.0
    #: Days raw ledger rows are kept (0: forever); the usage sums are kept regardless.
    ledger_retention_days: float = 0.0
    max_wait: float = 0.0
    max_retry_after: float = 10.0
    backoff_base: float = 0.05
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0
    deployments: dict[str, Deployment] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    tenants: dict[str, Tenant] = field(default_factory=dict)


def load_config(path: str | os.PathLike[str]) -> ProxyConfig:
    """Reads a TOML file; the proxy section is `[inference]` when present, else the whole file."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror} (check the path)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e} (fix the syntax)") from None
    if "inference" in raw:
        return parse_config(_table(raw, "inference", "inference"), prefix="inference")
    return parse_config(raw, prefix="")


def parse_config(raw: dict[str, Any], *, prefix: str = "inference") -> ProxyConfig:
    """Validates a parsed TOML table; errors name the key (`<prefix>.deployments.x.kind`)."""
    key = _Keys(prefix)
    known = {"listen", "state_dir", "cache_ttl", "max_wait", "max_retry_after", "backoff_base"}
    known |= {"ledger_retention_days"}
    known |= {"breaker_failures", "breaker_cooldown", "deployments", "routes", "aliases", "tenants"}
    _no_unknown(raw, known, key)
    host, port = "127.0.0.1", 4000
    if "listen" in raw:
        listen = _str(raw, "listen", key)
        h, sep, p = listen.rpartition(":")
        if (
            not sep
            or not h
            or not (p.isascii() and p.isdigit() and len(p) <= 5)
            or not 0 < int(p) < 65536
        ):
            raise ConfigError(
                f"{key('listen')} = {listen!r} is not HOST:PORT (e.g. 127.0.0.1:4000)"
            )
        host, port = h.strip("[]"), int(p)
    deps = _table(raw, "deployments", key(), default={})
    state_dir = Path(_str(raw, "state_dir", key, "/var/lib/agentnode/inference"))
    deployments = {
        name: _deployment(
            name, _table(deps, name, key("deployments")), key.sub("deployments", name), state_dir
        )
        for name in deps
    }
    served = {m for d in deployments.values() for m in d.models}
    routes: dict[str, Route] = {}
    raw_routes = _table(raw, "routes", key(), default={})
    for name in raw_routes:
        rk = key.sub("routes", name)
        r = _table(raw_routes, name, key("routes"))
        _no_unknown(r, {"models", "cache", "prompt_cache", "prompt_cache_ttl"}, rk)
        models = tuple(_str_list(r, "models", rk))
        if not models:
            raise ConfigError(f"{rk('models')} is empty (list at least one model)")
        routes[name] = Route(
            name,
            models,
            cache=_bool(r, "cache", rk, False),
            prompt_cache=_choice(r, "prompt_cache", rk, PROMPT_CACHE_MODES, None),
            prompt_cache_ttl=_choice(r, "prompt_cache_ttl", rk, PROMPT_CACHE_TTLS, None),
        )
    for name, target in _table(raw, "aliases", key(), default={}).items():
        if not isinstance(target, str):
            raise ConfigError(f"{key.sub('aliases')(name)} must be a model name (a string)")
        routes[name] = Route(name, (target,))
    for route in routes.values():
        for i, m in enumerate(route.models):
            if m not in served:
                raise ConfigError(
                    f"{key.sub('routes', route.name)('models')}[{i}] = {m!r} is served by no deployment "
                    "(add it to a deployment's models)"
                )
    raw_tenants = _table(raw, "tenants", key(), default={})
    tenants = {
        name: _tenant(name, _table(raw_tenants, name, key("tenants")), key.sub("tenants", name))
        for name in raw_tenants
    }
    owners: dict[str, str] = {}
    for t in tenants.values():
        for k in t.api_keys:
            if k in owners:
                raise ConfigError(
                    f"{key.sub('tenants', t.name)('api_keys')} repeats a key of tenant {owners[k]!r} "
                    "(give every tenant its own keys)"
                )
            owners[k] = t.name
    return ProxyConfig(
        host=host,
        port=port,
        state_dir=state_dir,
        cache_ttl=_num(raw, "cache_ttl", key, 300.0),
        ledger_retention_days=_num(raw, "ledger_retention_days", key, 0.0),
        max_wait=_num(raw, "max_wait", key, 0.0),
        max_retry_after=_num(raw, "max_retry_after", key, 10.0),
        backoff_base=_num(raw, "backoff_base", key, 0.05),
        breaker_failures=int(_num(raw, "breaker_failures", key, 3, integer=True)),
        breaker_cooldown=_num(raw, "breaker_cooldown", key, 30.0),
        deployments=deployments,
        routes=routes,
        tenants=tenants,
    )


class _Keys:
    """Builds dotted key names for error messages."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, name: str = "") -> str:
        parts = [p for p in (self.prefix, name) if p]
        return ".".join(parts) if parts else "(top level)"

    def sub(self, *names: str) -> _Keys:
        return _Keys(".".join(p for p in (self.prefix, *names) if p))


def _table_prices(models: tuple[str, ...], state_dir: Path) -> dict[str, Price]:
    # Imported here: the table is only read when some deployment has no price of its own.
    from agentnode.inference.prices import load_table

    table = load_table(state_dir)
    return {
        m: _price({b: Decimal(v) for b, v in row.items() if b in BUCKETS}, row["kind"])
        for m in models
        if (row := table.models.get(m)) is not None
    }


def _price(buckets: dict[str, Decimal], kind: str) -> Price:
    """A price from its buckets, the 1 h write price filled in when not given: Anthropic's
    prompt-caching docs price 1 h cache writes at 2x the base input price (5 min writes 1.25x,
    reads 0.1x); other kinds cache only for 5 min, so there it is moot and the 5 min one."""
    if "cache_write_1h" not in buckets:
        inp = buckets.get("input", Decimal(0))
        one_hour = 2 * inp if kind == "anthropic" else buckets.get("cache_write", inp)
        buckets = buckets | {"cache_write_1h": one_hour}
    return Price(**buckets)


def from_environment(config: ProxyConfig, environ: dict[str, str]) -> ProxyConfig:
    """With no deployments configured: one per provider whose API key is in `environ`
    (OPENAI_API_KEY, ANTHROPIC_API_KEY; base URLs from OPENAI_BASE_URL, ANTHROPIC_BASE_URL as
    the SDKs read them), serving the price table's models of that provider at its prices."""
    if config.deployments:
        return config
    from agentnode.inference.prices import load_table

    table = load_table(config.state_dir)
    deployments = {}
    for kind, default_url in (
        ("openai", "https://api.openai.com/v1"),
        ("anthropic", "https://api.anthropic.com"),
    ):
        api_key = environ.get(f"{kind.upper()}_API_KEY")
        if not api_key:
            continue
        base_url = (environ.get(f"{kind.upper()}_BASE_URL") or default_url).rstrip("/")
        models = tuple(table.kind_models(kind))
        deployments[kind] = Deployment(
            name=kind,
            kind=kind,
            base_url=base_url,
            api_key=api_key,
            models=models,
            price=Price(),
            prompt_cache_key="task" if _is_openai(base_url) else "off",
            model_prices=_table_prices(models, config.state_dir),
        )
    return dataclasses.replace(config, deployments=deployments)


def _deployment(name: str, d: dict[str, Any], key: _Keys, state_dir: Path) -> Deployment:
    known = {"kind", "base_url", "api_key_env", "models", "price", "weight", "rpm", "tpm"}
    known |= {"timeout", "connect_timeout", "first_byte_timeout", "retries", "prompt_cache"}
    known |= {"prompt_cache_ttl", "prompt_cache_min_tokens", "prompt_cache_key"}
    _no_unknown(d, known, key)
    kind = _str(d, "kind", key)
    if kind not in KINDS:
        raise ConfigError(f"{key('kind')} = {kind!r} is not one of {', '.join(KINDS)}")
    base_url = _str(d, "base_url", key).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{key('base_url')} = {base_url!r} must start with http:// or https://")
    api_key = None
    if "api_key_env" in d:
        env = _str(d, "api_key_env", key)
        api_key = os.environ.get(env)
        if api_key is None:
            raise ConfigError(
                f"{key('api_key_env')}: environment variable {env} is not set (export it)"
            )
    models = tuple(_str_list(d, "models", key))
    if not models:
        raise ConfigError(f"{key('models')} is empty (list the model names this deployment serves)")
    pk = key.sub("price")
    # A configured price always wins; without one, the price table's, per model.
    model_prices = {} if "price" in d else _table_prices(models, state_dir)
    p = _table(d, "price", key(), default={})
    _no_unknown(p, set(BUCKETS), pk)
    prices = {}
    for b in BUCKETS:
        v = p.get(b, 0)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"{pk(b)} must be a non-negative number (USD per 1M tokens)")
        if b in p or b != "cache_write_1h":
            prices[b] = Decimal(str(v))
    weight = _num(d, "weight", key, 1.0)
    if weight <= 0:
        raise ConfigError(f"{key('weight')} must be positive")
    return Deployment(
        name=name,
        kind=kind,
        base_url=base_url,
        api_key=api_key,
        models=models,
        price=_price(prices, kind),
        weight=weight,
        rpm=_opt_int(d, "rpm", key),
        tpm=_opt_int(d, "tpm", key),
        timeout=_num(d, "timeout", key, 600.0),
        connect_timeout=_num(d, "connect_timeout", key, 5.0),
        first_byte_timeout=_num(d, "first_byte_timeout", key, 60.0),
        retries=int(_num(d, "retries", key, 2, integer=True)),
        prompt_cache=_choice(d, "prompt_cache", key, PROMPT_CACHE_MODES, "auto") or "auto",
        prompt_cache_ttl=_choice(d, "prompt_cache_ttl", key, PROMPT_CACHE_TTLS, "5m") or "5m",
        prompt_cache_min_tokens=_opt_int(d, "prompt_cache_min_tokens", key) or 1024,
        model_prices=model_prices,
        # Only OpenAI's own API is known to take the field; other "compatible" servers may
        # refuse a field they do not know.
        prompt_cache_key=_choice(d, "prompt_cache_key", key, PROMPT_CACHE_KEYS, None)
        or ("task" if _is_openai(base_url) else "off"),
    )


def _tenant(name: str, t: dict[str, Any], key: _Keys) -> Tenant:
    _no_unknown(t, {"api_keys", "budget", "task_budget", "rpm", "tpm", "task_rpm"}, key)
    keys = tuple(_str_list(t, "api_keys", key))
    if not keys:
        raise ConfigError(f"{key('api_keys')} is empty (give the tenant at least one key)")
    budgets = {}
    for b in ("budget", "task_budget"):
        budgets[b] = Decimal(str(_num(t, b, key, 0.0))) if b in t else None
    return Tenant(
        name=name,
        api_keys=keys,
        budget=budgets["budget"],
        task_budget=budgets["task_budget"],
        rpm=_opt_int(t, "rpm", key),
        tpm=_opt_int(t, "tpm", key),
        task_rpm=_opt_int(t, "task_rpm", key),
    )


def _is_openai(base_url: str) -> bool:
    host = base_url.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0].lower()
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


def _choice(
    d: dict[str, Any], name: str, key: _Keys, choices: tuple[str, ...], default: str | None
) -> str | None:
    if name not in d:
        return default
    v = d[name]
    if v not in choices:
        raise ConfigError(f"{key(name)} = {v!r} is not one of {', '.join(choices)}")
    return str(v)


def _no_unknown(d: dict[str, Any], known: set[str], key: _Keys) -> None:
    for k in d:
        if k not in known:
            raise ConfigError(f"{key(k)} is not a known key (known: {', '.join(sorted(known))})")


def _table(d: dict[str, Any], name: str, where: str, default: Any = None) -> dict[str, Any]:
    if name not in d and default is not None:
        return dict(default)
    v = d.get(name)
    full = f"{where}.{name}" if where and where != "(top level)" else name
    if not isinstance(v, dict):
        raise ConfigError(f"{full} must be a table")
    return v


def _str(d: dict[str, Any], name: str, key: _Keys, default: str | None = None) -> str:
    if name not in d:
        if default is None:
            raise ConfigError(f"{key(name)} is required")
        return default
    v = d[name]
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key(name)} must be a non-empty string")
    return v


def _str_list(d: dict[str, Any], name: str, key: _Keys) -> list[str]:
    v = d.get(name)
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{key(name)} must be a list of non-empty strings")
    return v


def _bool(d: dict[str, Any], name: str, key: _Keys, default: bool) -> bool:
    v = d.get(name, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{key(name)} must be true or false")
    return v


def _num(
    d: dict[str, Any], name: str, key: _Keys, default: float, *, integer: bool = False
) -> float:
    v = d.get(name, default)
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or v < 0:
        what = "integer" if integer else "number"
        raise ConfigError(f"{key(name)} must be a non-negative {what}")
    return float(v)


def _opt_int(d: dict[str, Any], name: str, key: _Keys) -> int | None:
    if name not in d:
        return None
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{key(name)} must be a positive integer")
    return v
