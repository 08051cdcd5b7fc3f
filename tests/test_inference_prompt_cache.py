"""Prompt-prefix caching, per-model breakers and cache savings, driven by the official SDKs
against mocks that bill by provider prompt caching as the providers document it."""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from agentnode.errors import ConfigError
from agentnode.inference.config import parse_config
from agentnode.inference.mock import Fault, PromptCache
from agentnode.inference.prices import SHIPPED
from agentnode.inference.pricing import anthropic_usage
from support.proxy_env import PRICE_CLAUDE, ProxyEnv

MSG = [{"role": "user", "content": "hi"}]
# ~4,000 tokens of system prompt (the mock counts a token per 4 bytes), and tools.
SYSTEM = " ".join(f"Rule {i}: act carefully and check every result twice." for i in range(300))
TOOLS = [
    {
        "name": f"tool_{i}",
        "description": f"Tool number {i}, which does one thing well.",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
    for i in range(8)
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- breakers ------------------------------------------------------------------------------


def test_a_failing_model_opens_only_its_own_circuit(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["breaker_failures"] = 2
        c["breaker_cooldown"] = 30.0
        c["deployments"]["gpt-a"]["models"] = ["gpt-x", "gpt-sick"]

    env = make_env(cfg)
    env.mocks["a"].failing_models["gpt-sick"] = 500
    client = env.openai()
    for _ in range(2):
        with pytest.raises(openai.InternalServerError, match="HTTP 500"):
            client.chat.completions.create(model="gpt-sick", messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.InternalServerError, match="circuit for gpt-sick open"):
        client.chat.completions.create(model="gpt-sick", messages=MSG)  # type: ignore[arg-type]
    assert len(env.mocks["a"].requests) == 2  # the third was not sent
    # The healthy model of the same deployment keeps serving, several times over.
    for _ in range(3):
        r = client.chat.completions.create(model="gpt-x", messages=MSG)  # type: ignore[arg-type]
        assert r.choices[0].message.content == "Hello"
    # And its successes do not close the sick model's circuit.
    with pytest.raises(openai.InternalServerError, match="circuit for gpt-sick open"):
        client.chat.completions.create(model="gpt-sick", messages=MSG)  # type: ignore[arg-type]


def test_an_unreachable_deployment_opens_for_all_its_models(
    make_env: Callable[..., ProxyEnv],
) -> None:
    port = _free_port()  # nothing listens: connection refused

    def cfg(c: dict[str, Any]) -> None:
        c["breaker_failures"] = 2
        c["breaker_cooldown"] = 30.0
        c["deployments"]["dead"] = c["deployments"]["gpt-a"] | {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "models": ["gpt-p", "gpt-q"],
        }

    env = make_env(cfg)
    client = env.openai()
    for _ in range(2):
        with pytest.raises(openai.InternalServerError, match="cannot reach"):
            client.chat.completions.create(model="gpt-p", messages=MSG)  # type: ignore[arg-type]
    # The other model of the deployment is refused without a connection attempt.
    with pytest.raises(openai.InternalServerError, match="repeated connection failures"):
        client.chat.completions.create(model="gpt-q", messages=MSG)  # type: ignore[arg-type]
    # Other deployments are untouched.
    client.chat.completions.create(model="gpt-x", messages=MSG)  # type: ignore[arg-type]


# ---- Anthropic breakpoints ----------------------------------------------------------------


def _cached_env(make_env: Callable[..., ProxyEnv], **route: Any) -> ProxyEnv:
    def cfg(c: dict[str, Any]) -> None:
        c["routes"]["claude-nocache"] = {"models": ["claude-x"], "prompt_cache": "off"}
        c["routes"]["claude-1h"] = {"models": ["claude-x"], "prompt_cache_ttl": "1h"} | route

    env = make_env(cfg)
    for m in ("c", "d"):
        env.mocks[m].prompt_cache = PromptCache()
    return env


def _conversation(client: anthropic.Anthropic, model: str, steps: int) -> list[dict[str, Any]]:
    """An agent loop: each step sends the system prompt, tools and the whole conversation,
    then appends the model's tool call and its result. Returns what the client sent."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Fix the failing test."}]
    sent = []
    for i in range(steps):
        req: dict[str, Any] = {
            "model": model,
            "max_tokens": 256,
            "system": SYSTEM,
            "tools": TOOLS,
            "messages": copy.deepcopy(messages),
        }
        sent.append(copy.deepcopy(req))
        client.messages.create(**req)
        call = {"type": "tool_use", "id": f"toolu_{i}", "name": "tool_1", "input": {"path": "a"}}
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, call]}
        )
        result = {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"line {i} " * 40}
        messages.append({"role": "user", "content": [result]})
    return sent


def _normal(value: Any) -> Any:
    """A request with every cache_control removed and strings as the text block they mean."""
    if isinstance(value, dict):
        out = {k: _normal(v) for k, v in value.items() if k != "cache_control"}
        for k in ("system", "content"):
            if isinstance(out.get(k), str):
                out[k] = [{"type": "text", "text": out[k]}]
        return out
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _marks(value: Any) -> int:
    if isinstance(value, dict):
        return int("cache_control" in value) + sum(_marks(v) for v in value.values())
    if isinstance(value, list):
        return sum(_marks(v) for v in value)
    return 0


def _input_cost(rows: list[Any]) -> Decimal:
    p = {k: Decimal(str(v)) for k, v in PRICE_CLAUDE.items()}
    return sum(
        (
            r.input * p["input"]
            + r.cached_input * p["cached_input"]
            + r.cache_write * p["cache_write"]
        )
        / 1_000_000
        for r in rows
    ) or Decimal(0)


def test_agent_conversation_is_billed_mostly_as_cache_reads(
    make_env: Callable[..., ProxyEnv],
) -> None:
    env = _cached_env(make_env)
    client = env.anthropic(default_headers={"x-agentnode-task": "task-1"})
    sent = _conversation(client, "claude-x", 20)
    received = [r["json"] for r in env.mocks["c"].requests]
    rows = env.rows()
    cached = _input_cost(rows)
    # The same conversation with caching off for this route: the client's bytes pass as-is.
    plain_sent = _conversation(client, "claude-nocache", 20)
    plain_rows = env.rows()[20:]
    plain = [r["json"] for r in env.mocks["c"].requests[20:]]
    assert all(r.cache_write == 0 and r.cached_input == 0 for r in plain_rows)
    uncached = _input_cost(plain_rows)
    assert cached <= uncached * Decimal("0.3"), (cached, uncached)
    reads = sum(r.cached_input for r in rows)
    assert reads >= 0.85 * sum(r.input + r.cached_input + r.cache_write for r in rows)
    for s, r, p, ps in zip(sent, received, plain, plain_sent, strict=True):
        # Nothing but the markers changed, nothing reordered (the SDK's own key order, as the
        # uncached run passed its bytes through), at most 4 of them.
        assert _normal(r) == _normal(s) and list(r) == list(p)
        assert 1 <= _marks(r) <= 4
        assert _marks(p) == 0 and p == ps | {"model": "claude-x"}
    # The saving is in the ledger and in /v1/usage per task and model.
    assert sum(Decimal(r.saving) for r in rows) > 0
    u = httpx.get(
        env.url + "/v1/usage?group_by=task,model", headers={"x-api-key": "sk-acme"}
    ).json()["data"]
    [mine] = [g for g in u if g["task"] == "task-1" and g["model"] == "claude-x"]
    assert Decimal(mine["saving"]) == sum(Decimal(r.saving) for r in rows) > 0
    # Saving + what was paid = what the same tokens cost uncached (the bodies are the same).
    assert Decimal(mine["saving"]) + cached == uncached


def test_client_markers_are_kept_and_requests_outside_tasks_untouched(
    make_env: Callable[..., ProxyEnv],
) -> None:
    env = _cached_env(make_env)
    task = env.anthropic(default_headers={"x-agentnode-task": "task-1"})
    own = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    body = {"model": "claude-x", "max_tokens": 64, "system": own, "tools": TOOLS, "messages": MSG}
    task.messages.create(**body)  # type: ignore[call-overload]
    assert env.mocks["c"].requests[-1]["json"] == body
    # A tenant's own request (no task): "auto" leaves it alone.
    plain = {"model": "claude-x", "max_tokens": 64, "system": SYSTEM, "messages": MSG}
    env.anthropic().messages.create(**plain)  # type: ignore[call-overload]
    assert env.mocks["c"].requests[-1]["json"] == plain
    # A route's 1h TTL reaches the markers; a short prompt gets none (below the minimum).
    task.messages.create(**(plain | {"model": "claude-1h"}))  # type: ignore[call-overload]
    sent = env.mocks["c"].requests[-1]["json"]
    assert sent["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert sent["messages"][0]["content"][0]["cache_control"]["ttl"] == "1h"
    task.messages.create(model="claude-x", max_tokens=8, messages=MSG)  # type: ignore[arg-type]
    assert env.mocks["c"].requests[-1]["json"]["messages"] == MSG


def test_the_mock_refuses_a_fifth_breakpoint_and_the_proxy_passes_it_on(
    make_env: Callable[..., ProxyEnv],
) -> None:
    env = _cached_env(make_env)
    mark = {"type": "ephemeral"}
    msgs = [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": mark}]}] * 5
    with pytest.raises(anthropic.BadRequestError, match="A maximum of 4 blocks"):
        env.anthropic().messages.create(model="claude-x", max_tokens=8, messages=msgs)  # type: ignore[arg-type]


# ---- OpenAI prompt_cache_key ----------------------------------------------------------------


def test_openai_gets_a_stable_prompt_cache_key_per_task(
    make_env: Callable[..., ProxyEnv],
) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-a"]["prompt_cache_key"] = "task"

    env = make_env(cfg)
    env.mocks["a"].prompt_cache = PromptCache()
    long = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "go"}]

    def key(client: openai.OpenAI, **kw: Any) -> Any:
        r = client.chat.completions.create(model="gpt-x", messages=long, **kw)  # type: ignore[arg-type]
        body = env.mocks["a"].requests[-1]
        assert json.loads(body["body"]) == body["json"]
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return body["json"].get("prompt_cache_key"), r.usage.prompt_tokens_details.cached_tokens

    t1 = env.openai(default_headers={"x-agentnode-task": "t1"})
    k1, cached_first = key(t1)
    k1b, cached_again = key(t1)
    assert k1 == k1b and k1.startswith("agentnode-") and "t1" not in k1
    assert cached_first == 0 and cached_again > 3000  # the provider's own prefix cache hit
    k2, _ = key(env.openai(default_headers={"x-agentnode-task": "t2"}))
    k3, _ = key(env.openai(key="sk-globex", default_headers={"x-agentnode-task": "t1"}))
    assert len({k1, k2, k3}) == 3  # per task, and never shared between tenants
    assert key(t1, extra_body={"prompt_cache_key": "mine"})[0] == "mine"
    assert key(env.openai())[0] is None  # not a task: "auto" leaves it alone


def test_prompt_cache_config_errors_name_the_key() -> None:
    base: dict[str, Any] = {
        "deployments": {"d": {"kind": "anthropic", "base_url": "http://x", "models": ["m"]}}
    }
    for where, k, v in (
        ("d", "prompt_cache", "yes"),
        ("d", "prompt_cache_ttl", "2h"),
        ("d", "prompt_cache_key", "user"),
        ("d", "prompt_cache_min_tokens", 0),
    ):
        raw = copy.deepcopy(base)
        raw["deployments"][where][k] = v
        with pytest.raises(ConfigError, match=rf"inference\.deployments\.d\.{k}"):
            parse_config(raw)
    raw = copy.deepcopy(base) | {"routes": {"r": {"models": ["m"], "prompt_cache": "on"}}}
    with pytest.raises(ConfigError, match=r"inference\.routes\.r\.prompt_cache = 'on'"):
        parse_config(raw)
    d = parse_config(base).deployments["d"]
    assert (d.prompt_cache, d.prompt_cache_ttl, d.prompt_cache_min_tokens) == ("auto", "5m", 1024)
    assert d.prompt_cache_key == "off"  # only OpenAI's own API is known to take the key
    raw = copy.deepcopy(base)
    raw["deployments"]["d"] |= {"kind": "openai", "base_url": "https://api.openai.com/v1"}
    assert parse_config(raw).deployments["d"].prompt_cache_key == "task"


# ---- cache-aware routing --------------------------------------------------------------------


def test_a_shared_prefix_goes_to_the_deployment_that_has_seen_it(
    make_env: Callable[..., ProxyEnv],
) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["breaker_failures"] = 100
        # Two deployments of one model, equal weights, on mocks c and d.
        c["deployments"]["claude-b"]["models"] = ["claude-x", "claude-y"]

    env = make_env(cfg)
    for m in ("c", "d"):
        env.mocks[m].prompt_cache = PromptCache()
    client = env.anthropic(default_headers={"x-agentnode-task": "t"})
    where: list[set[str]] = []
    for conv in range(12):
        first = [{"role": "user", "content": f"Task {conv}: fix the failing test."}]
        seen = set()
        for step in range(3):
            msgs = first + [{"role": "assistant", "content": "ok"}, MSG[0]] * step
            before = {n: len(env.mocks[n].requests) for n in ("c", "d")}
            client.messages.create(
                model="claude-x",
                max_tokens=8,
                system=SYSTEM,
                tools=TOOLS,  # type: ignore[arg-type]
                messages=msgs,  # type: ignore[arg-type]
            )
            seen |= {n for n in ("c", "d") if len(env.mocks[n].requests) > before[n]}
        where.append(seen)
    assert all(len(s) == 1 for s in where), where  # every conversation stayed on one
    assert {n for s in where for n in s} == {"c", "d"}  # conversations spread over both
    rows = env.rows()
    assert all(r.cached_input > 0 for r in rows[1::3] + rows[2::3])  # steps 2 and 3 read
    # Its deployment failing, a conversation falls back to the other, normally.
    [home] = where[0]
    other = "d" if home == "c" else "c"
    env.mocks[home].faults.append(Fault(status=500))
    first = [{"role": "user", "content": "Task 0: fix the failing test."}]
    n = len(env.mocks[other].requests)
    kw: dict[str, Any] = {"system": SYSTEM, "tools": TOOLS, "messages": first}
    r = client.messages.create(model="claude-x", max_tokens=8, **kw)
    assert r.content and len(env.mocks[other].requests) == n + 1


# ---- 1 h cache writes -----------------------------------------------------------------------


def _expected(usage: dict[str, Any], price: dict[str, Decimal]) -> tuple[Decimal, Decimal]:
    """Cost and saving of an Anthropic usage object, from its own TTL split."""
    split = usage["cache_creation"]
    w5, w1 = split["ephemeral_5m_input_tokens"], split["ephemeral_1h_input_tokens"]
    cached = usage["cache_read_input_tokens"] + w5 + w1
    spent = (
        usage["cache_read_input_tokens"] * price["cached_input"]
        + w5 * price["cache_write"]
        + w1 * price["cache_write_1h"]
    )
    cost = spent + usage["input_tokens"] * price["input"] + usage["output_tokens"] * price["output"]
    return cost / 1_000_000, (cached * price["input"] - spent) / 1_000_000


@pytest.mark.parametrize("stream", [False, True])
def test_one_hour_writes_are_billed_at_their_own_price(
    make_env: Callable[..., ProxyEnv], stream: bool
) -> None:
    env = _cached_env(make_env)
    client = env.anthropic(default_headers={"x-agentnode-task": "task-1h"})
    req = {"model": "claude-1h", "max_tokens": 64, "system": SYSTEM, "tools": TOOLS}
    # A 1 h route, then the deployments' 5 min TTL on a prompt of its own.
    for model, system in (("claude-1h", SYSTEM), ("claude-x", f"Be brief. {SYSTEM}")):
        for i in range(3):
            q = [{"role": "user", "content": f"q{i}"}]
            body = req | {"model": model, "system": system, "messages": q}
            if stream:
                with client.messages.stream(**body) as s:  # type: ignore[arg-type]
                    s.get_final_message()
            else:
                client.messages.create(**body)  # type: ignore[call-overload]
    billed = [r["usage"] for r in env.mocks["c"].requests]
    rows = env.rows()
    assert [r.stream for r in rows] == [stream] * 6
    # Claude's price configures no 1 h write price: Anthropic's 2x the input price.
    price = {k: Decimal(str(v)) for k, v in PRICE_CLAUDE.items()} | {"cache_write_1h": Decimal(6)}
    for r, u in zip(rows, billed, strict=True):
        split = u["cache_creation"]
        assert (r.cache_write, r.cache_write_1h, r.cached_input, r.input) == (
            split["ephemeral_5m_input_tokens"],
            split["ephemeral_1h_input_tokens"],
            u["cache_read_input_tokens"],
            u["input_tokens"],
        )
        assert (Decimal(r.cost), Decimal(r.saving)) == _expected(u, price)
    one_hour, five_min = rows[:3], rows[3:]
    # The 1 h route writes its prefix at the 1 h price, then reads it (all but the question).
    assert one_hour[0].cache_write_1h > 1000 and one_hour[0].cache_write == 0
    assert one_hour[0].cached_input == 0 and Decimal(one_hour[0].saving) < 0
    assert all(r.cached_input > 1000 and r.cache_write == 0 for r in one_hour[1:])
    assert all(Decimal(r.saving) > 0 for r in one_hour[1:])
    # The 5 min route's writes stay in the 5 min bucket at the 5 min price.
    assert all(r.cache_write_1h == 0 for r in five_min)
    assert five_min[0].cache_write > 1000 and Decimal(five_min[0].saving) < 0
    assert all(r.cached_input > 1000 for r in five_min[1:])
    # /v1/usage sums equal the rows, bucket by bucket.
    u = httpx.get(
        env.url + "/v1/usage?group_by=task,model", headers={"x-api-key": "sk-acme"}
    ).json()["data"]
    [mine] = [g for g in u if g["task"] == "task-1h"]
    for bucket in ("input", "cached_input", "cache_write", "cache_write_1h", "output"):
        assert mine[bucket] == sum(getattr(r, bucket) for r in rows), bucket
    assert Decimal(mine["cost"]) == sum(Decimal(r.cost) for r in rows)
    assert Decimal(mine["saving"]) == sum(Decimal(r.saving) for r in rows)


def test_one_hour_write_price_defaults(tmp_path: Path) -> None:
    def dep(kind: str, models: list[str], **price: float) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": kind, "base_url": "http://x", "models": models}
        return d | ({"price": price} if price else {})

    raw: dict[str, Any] = {
        "state_dir": str(tmp_path),
        "deployments": {
            "own": dep("anthropic", ["m"], input=3, cache_write=3.75, cache_write_1h=7),
            "doubled": dep("anthropic", ["m"], input=3, cache_write=3.75),
            "openai": dep("openai", ["g"], input=2, cache_write=2),
            "table": dep("anthropic", ["claude-haiku-4-5", "claude-new"]),
        },
    }
    # An updated table without a 1 h price for a model: twice its input price.
    table = json.loads(SHIPPED.read_text())
    table["models"]["claude-new"] = {"kind": "anthropic", "input": "1.5", "output": "7"}
    (tmp_path / "prices.json").write_text(json.dumps(table))
    ds = parse_config(raw).deployments
    assert ds["own"].price.cache_write_1h == Decimal(7)
    assert ds["doubled"].price.cache_write_1h == Decimal(6)
    assert ds["openai"].price.cache_write_1h == Decimal(2)  # OpenAI writes only for 5 min
    haiku = table["models"]["claude-haiku-4-5"]["cache_write_1h"]
    assert ds["table"].price_of("claude-haiku-4-5").cache_write_1h == Decimal(haiku)
    assert ds["table"].price_of("claude-new").cache_write_1h == Decimal(3)
    raw["deployments"]["own"]["price"]["cache_write_1h"] = -1
    with pytest.raises(ConfigError, match=r"deployments\.own\.price\.cache_write_1h must be"):
        parse_config(raw)


def test_anthropic_usage_splits_writes_by_ttl_without_losing_any() -> None:
    def usage(total: int, split: dict[str, int] | None) -> Any:
        u = {"input_tokens": 5, "cache_creation_input_tokens": total, "output_tokens": 1}
        return anthropic_usage(u | ({"cache_creation": split} if split is not None else {}))

    def split(five: int, hour: int) -> dict[str, int]:
        return {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour}

    one = usage(300, split(100, 200))
    assert (one.cache_write, one.cache_write_1h, one.total) == (100, 200, 306)
    # No split (an older API): all at the 5 min price.
    assert (usage(300, None).cache_write, usage(300, None).cache_write_1h) == (300, 0)
    # A split short of the total: the rest at the 5 min price; beyond it: the split counts.
    assert (usage(300, split(0, 200)).cache_write, usage(300, split(0, 200)).cache_write_1h) == (
        100,
        200,
    )
    assert usage(100, split(50, 200)).as_dict()["cache_write_1h"] == 200
    assert usage(100, split(50, 200)).cache_write == 50
