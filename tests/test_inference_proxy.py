"""The inference proxy driven by the official openai and anthropic SDKs against loopback mocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam, TextBlockParam
from openai.types.chat import ChatCompletionMessageParam

from agentnode.inference.mock import Fault
from agentnode.inference.spend import SPEND_HEADER
from agentnode.inference.store import LedgerRow, Store
from support.proxy_env import ProxyEnv

# The mocks' default usage priced with tests/support/proxy_env.py's prices, by hand:
# OpenAI: 1000 prompt (600 cached) + 300 completion (100 reasoning)
#   = 400*2.5 + 600*1.25 + 200*10 + 100*12 = 4950 micro-USD.
GPT_COST = Decimal("0.00495")
# Anthropic: 100 fresh input + 5000 cache read + 2000 cache write + 250 output
#   = 100*3 + 5000*0.3 + 2000*3.75 + 250*15 = 13050 micro-USD.
CLAUDE_COST = Decimal("0.01305")
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CLAUDE_MSG: list[MessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture
def env(make_env: Callable[..., ProxyEnv]) -> ProxyEnv:
    return make_env()


def test_openai_chat_not_streamed_is_priced_per_bucket(env: ProxyEnv) -> None:
    r = env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    assert r.choices[0].message.content == "Hello"
    [row] = env.rows()
    assert (row.tenant, row.model, row.deployment, row.status) == ("acme", "gpt-x", "gpt-a", 200)
    assert (row.input, row.cached_input, row.output, row.reasoning) == (400, 600, 200, 100)
    assert Decimal(row.cost) == GPT_COST


def test_openai_stream_is_priced_and_usage_chunk_hidden_unless_asked(env: ProxyEnv) -> None:
    client = env.openai()
    chunks = list(client.chat.completions.create(model="gpt-x", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "t1t2t3"
    assert all(c.usage is None and c.choices for c in chunks)
    sent = env.mocks["a"].requests[-1]["json"]
    assert sent["stream_options"] == {"include_usage": True}
    asked = list(
        client.chat.completions.create(
            model="gpt-x",
            messages=MSG,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].usage is not None and asked[-1].usage.prompt_tokens == 1000
    rows = env.rows()
    assert [Decimal(r.cost) for r in rows] == [GPT_COST, GPT_COST]
    assert all(r.stream for r in rows)


def test_bodies_pass_through_byte_for_byte_unless_patched(env: ProxyEnv) -> None:
    # Odd spacing, key order and an unknown field: the upstream gets the client's own bytes.
    body = b'{ "messages": [{"role":"user","content":"hi"}],  "model":"gpt-x", "x_new": 1 }'
    r = httpx.post(env.url + "/v1/chat/completions", content=body, headers={"x-api-key": "sk-acme"})
    assert r.status_code == 200 and env.mocks["a"].requests[-1]["body"] == body
    # A route's model, or a stream without include_usage, must be rewritten.
    env.openai().chat.completions.create(model="smart-gpt", messages=MSG)
    assert env.mocks["a"].requests[-1]["json"]["model"] == "gpt-x"
    # A stream that did not ask for usage gets the request for it added, the rest untouched.
    body = b' \n{ "model":"gpt-x", "stream": true,"messages": [{"role":"user","content":"hi"}] }'
    r = httpx.post(env.url + "/v1/chat/completions", content=body, headers={"x-api-key": "sk-acme"})
    assert r.status_code == 200 and b'"prompt_tokens"' not in r.content  # usage chunk hidden
    sent = env.mocks["a"].requests[-1]["body"]
    assert sent == body.replace(b"{", b'{"stream_options":{"include_usage":true},', 1)
    # With stream_options present (here without include_usage), the body is re-serialised.
    opts = {"model": "gpt-x", "stream": True, "messages": MSG, "stream_options": {"x": 1}}
    r = httpx.post(env.url + "/v1/chat/completions", json=opts, headers={"x-api-key": "sk-acme"})
    assert r.status_code == 200
    assert env.mocks["a"].requests[-1]["json"]["stream_options"] == {"x": 1, "include_usage": True}


def test_finished_streams_keep_their_upstream_connection(env: ProxyEnv) -> None:
    # The HTTP framing's end trails the last event: the proxy must wait for it, not hang up.
    for m in ("a", "c"):
        env.mocks[m].end_delay = 0.05
    client = env.openai()
    for _ in range(3):
        list(client.chat.completions.create(model="gpt-x", messages=MSG, stream=True))
        time.sleep(0.2)  # until the framing's end is in and the connection back in the pool
    a = env.anthropic()
    for _ in range(3):
        with a.messages.stream(model="claude-x", max_tokens=8, messages=CLAUDE_MSG) as s:
            s.get_final_message()
        time.sleep(0.2)
    for m in ("a", "c"):
        peers = {r["peer"] for r in env.mocks[m].requests}
        assert len(peers) == 1, f"mock {m} saw {len(peers)} connections for 3 sequential streams"


def test_ledger_rows_survive_shutdown(tmp_path: Path, make_env: Callable[..., ProxyEnv]) -> None:
    env = make_env()
    for _ in range(5):
        env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    env.close()  # no read first: shutdown itself must write what was still queued

    async def reopen() -> list[LedgerRow]:
        store = await Store.open(env.config.state_dir)
        try:
            return await store.rows()
        finally:
            await store.close()

    rows = asyncio.run(reopen())
    assert len(rows) == 5 and all(Decimal(r.cost) == GPT_COST for r in rows)


def test_the_ledger_memtable_stays_small(tmp_path: Path) -> None:
    """Rows reach table files a megabyte or so at a time while the proxy runs, instead of piling
    up in RocksDB's memory (its default memtable holds ~200k rows: tens of MiB of proxy RSS),
    and every row reads back."""
    n = 12_000  # ~3.5 MB of rows
    ledger = tmp_path / "state" / "ledger"

    async def fill() -> tuple[bool, int]:
        store = await Store.open(tmp_path / "state")
        try:
            for i in range(n):
                store.record(
                    LedgerRow(
                        time=time.time(),
                        tenant="acme",
                        task=f"task-{i}",
                        model="gpt-x",
                        deployment="gpt",
                        endpoint="chat",
                        status=200,
                        input=9,
                        cached_input=0,
                        cache_write=0,
                        output=12,
                        reasoning=0,
                        cost="0.00001",
                        latency_ms=1.5,
                        cache_hit=False,
                        stream=False,
                    )
                )
                if i % 1000 == 999:
                    await store.flush()
            deadline = time.monotonic() + 5  # RocksDB flushes a full memtable in the background
            while not list(ledger.glob("*.sst")) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return bool(list(ledger.glob("*.sst"))), len(await store.rows())
        finally:
            await store.close()

    assert asyncio.run(fill()) == (True, n)


def test_anthropic_messages_cache_buckets_and_cache_control_untouched(env: ProxyEnv) -> None:
    client = env.anthropic()
    system: list[TextBlockParam] = [
        {"type": "text", "text": "long doc", "cache_control": {"type": "ephemeral"}}
    ]
    r = client.messages.create(model="claude-x", max_tokens=64, system=system, messages=CLAUDE_MSG)
    assert r.content[0].text == "Hello"  # type: ignore[union-attr]
    assert env.mocks["c"].requests[-1]["json"]["system"] == system
    with client.messages.stream(model="claude-x", max_tokens=64, messages=CLAUDE_MSG) as s:
        assert "".join(s.text_stream) == "t0t1t2t3"
        final = s.get_final_message()
    assert final.usage.output_tokens == 250
    rows = env.rows()
    assert [(r.input, r.cached_input, r.cache_write, r.output) for r in rows] == [
        (100, 5000, 2000, 250)
    ] * 2
    assert [Decimal(r.cost) for r in rows] == [CLAUDE_COST, CLAUDE_COST]


def test_other_endpoints_pass_through(env: ProxyEnv) -> None:
    client = env.openai()
    assert client.completions.create(model="gpt-x", prompt="hi").choices[0].text == "Hello"
    e = client.embeddings.create(model="gpt-x", input="hi")
    # The SDK asks for base64 (float32), as it does of OpenAI's API.
    assert e.data[0].embedding == pytest.approx([0.1, 0.2, 0.3])
    r = client.responses.create(model="gpt-x", input="hi")
    assert r.output_text == "Hello"
    rows = env.rows()
    assert [r.endpoint for r in rows] == ["completions", "embeddings", "responses"]
    assert Decimal(rows[1].cost) == Decimal(8 * 2.5) / 1_000_000
    assert rows[2].input == 1000 and rows[2].output == 300


def test_models_list_in_each_sdks_format(env: ProxyEnv) -> None:
    # Each format lists what its endpoints serve: OpenAI's never reach Anthropic deployments.
    openai_ids = [m.id for m in env.openai().models.list()]
    assert openai_ids == ["gpt-x", "gpt-y", "smart-gpt"]
    with pytest.raises(openai.NotFoundError, match="model 'claude-x' is not served here"):
        env.openai().models.retrieve("claude-x")
    client = env.anthropic()
    models = list(client.models.list())
    # Only what /v1/messages can serve: Anthropic deployments' models and routes over them.
    assert [m.id for m in models] == ["claude-x", "claude-y", "smart-claude"]
    assert all(m.type == "model" and m.display_name == m.id for m in models)
    assert models[0].created_at.year == 1970
    # The SDK follows after_id through pages; before_id pages backwards.
    assert [m.id for m in client.models.list(limit=2)] == ["claude-x", "claude-y", "smart-claude"]
    page = client.models.list(limit=2)
    assert (page.has_more, page.first_id, page.last_id) == (True, "claude-x", "claude-y")
    back = client.models.list(before_id="smart-claude", limit=1)
    assert [m.id for m in back.data] == ["claude-y"] and back.has_more
    with pytest.raises(anthropic.BadRequestError, match="limit='0' must be an integer"):
        client.models.list(limit=0)
    with pytest.raises(anthropic.BadRequestError, match="after_id='gpt-x' is not a model"):
        client.models.list(after_id="gpt-x")
    # One model, in each SDK's own shape.
    assert client.models.retrieve("smart-claude").display_name == "smart-claude"
    with pytest.raises(anthropic.NotFoundError, match="model 'gpt-x' is not served here"):
        client.models.retrieve("gpt-x")
    assert env.openai().models.retrieve("gpt-x").owned_by == "agentnode"
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served here"):
        env.openai().models.retrieve("nope")


@pytest.mark.parametrize(
    "fault",
    [Fault(status=500), Fault(status=429, retry_after=60), Fault(hang=3.0), Fault(garbage=True)],
    ids=["500", "429", "timeout", "garbage"],
)
def test_fallback_to_next_deployment(env: ProxyEnv, fault: Fault) -> None:
    env.mocks["a"].faults.append(fault)
    r = env.openai().chat.completions.create(model="smart-gpt", messages=MSG)
    assert r.model == "gpt-y"
    assert len(env.mocks["a"].requests) == 1 and len(env.mocks["b"].requests) == 1
    assert env.rows()[-1].deployment == "gpt-b"


def test_anthropic_fallback_on_overload_in_stream(env: ProxyEnv) -> None:
    env.mocks["c"].faults.append(Fault(status=529))
    with env.anthropic().messages.stream(
        model="smart-claude", max_tokens=8, messages=CLAUDE_MSG
    ) as s:
        assert "".join(s.text_stream) == "t0t1t2t3"
    assert len(env.mocks["d"].requests) == 1


def test_no_fallback_after_first_byte_gives_sse_error(env: ProxyEnv) -> None:
    env.mocks["a"].faults.append(Fault(die_after_first=True))
    stream = env.openai().chat.completions.create(model="smart-gpt", messages=MSG, stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        list(stream)
    assert env.mocks["b"].requests == []
    env.mocks["c"].faults.append(Fault(die_after_first=True))
    with (
        pytest.raises(anthropic.APIStatusError, match="mid-stream"),
        env.anthropic().messages.stream(
            model="smart-claude", max_tokens=8, messages=CLAUDE_MSG
        ) as s,
    ):
        list(s.text_stream)
    assert env.mocks["d"].requests == []
    assert [r.status for r in env.rows()] == [502, 502]


def test_retry_after_is_honoured(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-a"]["retries"] = 1

    env = make_env(cfg)
    env.mocks["a"].faults.append(Fault(status=429, retry_after=1))
    t0 = time.monotonic()
    env.openai().chat.completions.create(model="smart-gpt", messages=MSG)
    assert time.monotonic() - t0 >= 1.0
    assert len(env.mocks["a"].requests) == 2 and env.mocks["b"].requests == []


def test_long_retry_after_reaches_the_client_when_nothing_is_left(env: ProxyEnv) -> None:
    env.mocks["a"].faults.append(Fault(status=429, retry_after=60))
    with pytest.raises(openai.RateLimitError, match="gpt-a: HTTP 429") as e:
        env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    assert e.value.response.headers["retry-after"] == "60"
    assert env.mocks["b"].requests == []


def test_retries_back_off_then_give_502_naming_the_failures(
    make_env: Callable[..., ProxyEnv],
) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-a"]["retries"] = 2
        c["breaker_failures"] = 10

    env = make_env(cfg)
    env.mocks["a"].faults.extend([Fault(status=503), Fault(status=500), Fault(status=502)])
    with pytest.raises(openai.InternalServerError, match=r"every upstream failed: gpt-a: HTTP 503"):
        env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    assert len(env.mocks["a"].requests) == 3


def test_circuit_breaker_opens_and_recovers(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["breaker_failures"] = 2
        c["breaker_cooldown"] = 3.0  # long enough that a loaded CI box cannot outlast it

    env = make_env(cfg)
    client = env.openai()
    env.mocks["a"].faults.extend([Fault(status=500), Fault(status=500)])
    for _ in range(2):
        client.chat.completions.create(model="smart-gpt", messages=MSG)
    # Open: a is skipped without being called.
    client.chat.completions.create(model="smart-gpt", messages=MSG)
    assert len(env.mocks["a"].requests) == 2 and len(env.mocks["b"].requests) == 3
    time.sleep(3.1)
    r = client.chat.completions.create(model="smart-gpt", messages=MSG)
    assert r.model == "gpt-x" and len(env.mocks["a"].requests) == 3


def test_first_chunk_reaches_the_client_before_the_upstream_sends_the_next(
    env: ProxyEnv,
) -> None:
    # The upstream pauses 1 s after its first token: the client must not wait for the second.
    for m in ("a", "c"):
        env.mocks[m].chunks, env.mocks[m].chunk_delay = 3, 1.0
    for path, model, first in (
        ("/v1/chat/completions", "gpt-x", b'"delta"'),
        ("/v1/messages", "claude-x", b"content_block_delta"),
    ):
        body = {"model": model, "max_tokens": 8, "messages": MSG, "stream": True}
        t0 = time.monotonic()
        with httpx.stream("POST", env.url + path, json=body, headers={"x-api-key": "sk-acme"}) as r:
            got = b""
            for data in r.iter_raw():
                got += data
                if first in got:
                    break
            assert first in got
            assert time.monotonic() - t0 < 0.5, f"{path}: first token waited for the next"


def test_client_disconnect_cancels_upstream_within_50ms(env: ProxyEnv) -> None:
    for m in ("a", "c"):
        env.mocks[m].chunks, env.mocks[m].chunk_delay = 64, 0.02
    stream = env.openai().chat.completions.create(model="gpt-x", messages=MSG, stream=True)
    next(iter(stream))
    t0 = time.monotonic()
    stream.close()
    deadline = time.monotonic() + 2
    while not env.mocks["a"].disconnects and time.monotonic() < deadline:
        time.sleep(0.002)
    assert env.mocks["a"].disconnects, "upstream never saw the disconnect"
    assert env.mocks["a"].disconnects[0] - t0 < 0.05
    # Anthropic's stream, abandoned by a raw client after its first event.
    body = {"model": "claude-x", "max_tokens": 8, "messages": MSG, "stream": True}
    with httpx.stream(
        "POST", env.url + "/v1/messages", json=body, headers={"x-api-key": "sk-acme"}
    ) as r:
        next(r.iter_raw())
        t0 = time.monotonic()
    while not env.mocks["c"].disconnects and time.monotonic() < deadline + 2:
        time.sleep(0.002)
    assert env.mocks["c"].disconnects and env.mocks["c"].disconnects[0] - t0 < 0.05
    # Both requests are in the ledger; the Anthropic one is billed its input from message_start.
    rows = env.rows()
    assert [r.status for r in rows] == [499, 499]
    assert (rows[1].input, rows[1].cached_input, rows[1].cache_write) == (100, 5000, 2000)


def _count(calls: int, fn: Callable[[], object]) -> tuple[int, list[str]]:
    ok, refused = 0, []
    for _ in range(calls):
        try:
            fn()
            ok += 1
        except openai.RateLimitError as e:
            refused.append(str(e))
    return ok, refused


def test_rate_limits_deployment_tenant_task(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-a"]["rpm"] = 20
        c["tenants"]["globex"]["rpm"] = 10
        c["tenants"]["acme"]["task_rpm"] = 5

    env = make_env(cfg)
    acme, globex = env.openai(), env.openai("sk-globex")
    ok, refused = _count(30, lambda: acme.chat.completions.create(model="gpt-x", messages=MSG))
    assert ok == 20 and "deployment gpt-a" in refused[0]
    ok, refused = _count(
        15,
        lambda: globex.chat.completions.create(model="gpt-y", messages=MSG),
    )
    assert ok == 10 and "tenant globex rpm limit is 10 per minute" in refused[0]
    task = env.openai(default_headers={"x-agentnode-task": "t1"})
    ok, refused = _count(8, lambda: task.chat.completions.create(model="gpt-y", messages=MSG))
    assert ok == 5 and "task t1 rpm" in refused[0]


def test_tenant_tpm_limit_uses_real_usage(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-b"]["tpm"] = 13_000  # ten calls of the mock's 1300 tokens

    env = make_env(cfg)
    c = env.openai()
    ok, refused = _count(14, lambda: c.chat.completions.create(model="gpt-y", messages=MSG))
    assert ok == 10 and "deployment gpt-b" in refused[0]


def test_budgets_per_tenant_and_task(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["tenants"]["globex"]["budget"] = 0.01  # two calls of 0.00495 stay under it
        c["tenants"]["acme"]["task_budget"] = 0.005

    env = make_env(cfg)
    globex = env.openai("sk-globex")
    for _ in range(3):
        globex.chat.completions.create(model="gpt-x", messages=MSG)
    with pytest.raises(openai.APIStatusError, match="budget exceeded for tenant globex") as e:
        globex.chat.completions.create(model="gpt-x", messages=MSG)
    assert e.value.status_code == 402
    task = env.anthropic(default_headers={"x-agentnode-task": "job-7"})
    task.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    with pytest.raises(anthropic.APIStatusError, match="budget exceeded for task job-7"):
        task.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    # Another task of the same tenant is unaffected.
    env.anthropic().messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)


def wait_cached(env: ProxyEnv, entries: int) -> None:
    """Waits until the proxy's cache holds `entries` entries (written after a stream ends)."""
    store = env.proxy.store
    deadline = time.monotonic() + 10
    while env.run(store._run(lambda: len(list(store._cache.items())))) < entries:
        assert time.monotonic() < deadline, f"the cache never reached {entries} entries"
        time.sleep(0.01)


def test_cache_hits_replay_streams_and_cost_zero(env: ProxyEnv) -> None:
    c = env.openai(default_headers={"x-agentnode-cache": "on"})
    first = c.chat.completions.with_raw_response.create(model="gpt-x", messages=MSG)
    hit = c.chat.completions.with_raw_response.create(model="gpt-x", messages=MSG)
    assert "x-agentnode-cache" not in first.headers and hit.headers["x-agentnode-cache"] == "hit"
    assert hit.parse().choices[0].message.content == "Hello"
    streamed = []
    for _ in range(2):
        streamed.append(list(c.chat.completions.create(model="gpt-x", messages=MSG, stream=True)))
        # A stream's cache entry is written just after its last event reached the client.
        wait_cached(env, 2)
    assert streamed[0] == streamed[1] and len(streamed[1]) == 4
    a = env.anthropic(default_headers={"x-agentnode-cache": "on"})
    for _ in range(2):
        with a.messages.stream(model="claude-x", max_tokens=8, messages=CLAUDE_MSG) as s:
            assert "".join(s.text_stream) == "t0t1t2t3"
        wait_cached(env, 3)
    assert len(env.mocks["a"].requests) == 2 and len(env.mocks["c"].requests) == 1
    rows = env.rows()
    assert [r.cache_hit for r in rows] == [False, True, False, True, False, True]
    assert all(Decimal(r.cost) == 0 for r in rows if r.cache_hit)
    # Without the header nothing is cached; another tenant never sees this tenant's entries.
    env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    other = env.openai("sk-globex", default_headers={"x-agentnode-cache": "on"})
    r = other.chat.completions.with_raw_response.create(model="gpt-x", messages=MSG)
    assert "x-agentnode-cache" not in r.headers
    assert len(env.mocks["a"].requests) == 4


def test_malformed_requests_get_400_in_provider_format(env: ProxyEnv) -> None:
    with pytest.raises(openai.BadRequestError, match="'messages' must be a list"):
        env.openai().chat.completions.create(model="gpt-x", messages="hi")  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError, match="'max_tokens' is required"):
        env.anthropic().messages.create(
            model="claude-x",
            messages=CLAUDE_MSG,
            max_tokens=8,
            extra_body={"max_tokens": "lots"},
        )
    r = httpx.post(env.url + "/v1/messages", content=b"{not json", headers={"x-api-key": "sk-acme"})
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "request body is not valid JSON"},
    }
    r = httpx.post(
        env.url + "/v1/chat/completions",
        content='{"model": "gpt-x", "messages": []}'.encode("utf-16"),
        headers={"x-api-key": "sk-acme"},
    )
    assert r.status_code == 400 and r.json()["error"]["message"] == "request body is not valid JSON"
    r = httpx.post(
        env.url + "/v1/chat/completions", content=b"[]", headers={"x-api-key": "sk-acme"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served here"):
        env.openai().chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        env.openai("sk-wrong").chat.completions.create(model="gpt-x", messages=MSG)
    r = httpx.post(env.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401, "authentication comes before body validation"
    assert env.mocks["a"].requests == [] and env.mocks["c"].requests == []


def test_every_refusal_is_json_in_the_callers_format(env: ProxyEnv) -> None:
    """Deep nesting, an unknown path, a wrong method and an oversized body: each a JSON error
    the caller's SDK understands, never a 500 or aiohttp's plain text."""
    key = {"x-api-key": "sk-acme"}
    deep = b'{"model": "gpt-x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/v1/messages"):
        r = httpx.post(env.url + path, content=deep, headers=key)
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.text
    cases = [
        ("GET", "/v1/nothing", b"", 404, "not_found"),
        ("GET", "/v1/chat/completions", b"", 405, "method_not_allowed"),
        ("PUT", "/v1/usage", b"", 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", b"x" * ((64 << 20) + 1), 413, "request_too_large"),
    ]
    for method, path, body, status, code in cases:
        for fmt_headers in ({}, {"anthropic-version": "2023-06-01"}):
            if fmt_headers and path == "/v1/chat/completions" and method == "POST":
                path = "/v1/messages"  # an endpoint answers in its own format
            r = httpx.request(method, env.url + path, content=body, headers=key | fmt_headers,
                              timeout=60)  # fmt: skip
            assert r.status_code == status, (method, path, r.text)
            assert r.headers["Content-Type"].startswith("application/json"), r.text
            err = r.json()
            if fmt_headers:
                assert err["type"] == "error" and err["error"]["message"], err
            else:
                assert err["error"]["code"] == code, err
    with pytest.raises(openai.NotFoundError):
        env.openai().post("/nothing", cast_to=httpx.Response)
    with pytest.raises(anthropic.NotFoundError):
        env.anthropic().post("/v1/nothing", cast_to=httpx.Response)


def test_upstream_garbage_is_502_with_clear_message(env: ProxyEnv) -> None:
    env.mocks["a"].faults.append(Fault(garbage=True))
    with pytest.raises(openai.APIStatusError, match="gpt-a returned a body that is not JSON") as e:
        env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    assert e.value.status_code == 502
    env.mocks["c"].faults.append(Fault(garbage=True))
    with pytest.raises(anthropic.APIStatusError, match="claude-a sent a stream that is not SSE"):
        env.anthropic().messages.create(
            model="claude-x", max_tokens=8, messages=CLAUDE_MSG, stream=True
        )


def test_weighted_balancing(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-b"]["models"] = ["gpt-y", "gpt-x"]
        c["deployments"]["gpt-a"]["weight"] = 3

    env = make_env(cfg)
    c = env.openai()
    for _ in range(200):
        c.chat.completions.create(model="gpt-x", messages=MSG)
    share = len(env.mocks["a"].requests) / 200
    assert 0.65 <= share <= 0.85


def test_route_header_usage_and_metrics(env: ProxyEnv) -> None:
    c = env.openai(default_headers={"x-agentnode-route": "smart-gpt", "x-agentnode-task": "t9"})
    c.chat.completions.create(model="whatever", messages=MSG)
    env.anthropic().messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    env.openai("sk-globex").chat.completions.create(model="gpt-y", messages=MSG)
    env.rows()
    r = httpx.get(
        env.url + "/v1/usage?group_by=tenant,task,model,day", headers={"x-api-key": "sk-acme"}
    )
    data = r.json()["data"]
    assert {(d["tenant"], d["task"], d["model"]) for d in data} == {
        ("acme", "t9", "gpt-x"),
        ("acme", None, "claude-x"),
    }
    assert sum(Decimal(d["cost"]) for d in data) == GPT_COST + CLAUDE_COST
    assert all(d["day"] == time.strftime("%Y-%m-%d", time.gmtime()) for d in data)
    # One task's own usage, as a budgeted agent asks it each step; never another tenant's.
    for key, task, tasks in (("sk-acme", "t9", {"t9"}), ("sk-acme", "t0", set()),
                             ("sk-globex", "t9", set())):  # fmt: skip
        r = httpx.get(env.url + f"/v1/usage?group_by=task&task={task}", headers={"x-api-key": key})
        assert {d["task"] for d in r.json()["data"]} == tasks, (key, task)
    r = httpx.get(env.url + "/v1/usage?group_by=bogus", headers={"x-api-key": "sk-acme"})
    assert r.status_code == 400 and "cannot group by 'bogus'" in r.text
    metrics = httpx.get(env.url + "/metrics").text
    assert 'agentnode_inference_requests_total{endpoint="chat",status="200"} 2.0' in metrics
    assert 'agentnode_inference_cost_usd_total{tenant="globex"} 0.00495' in metrics
    assert 'agentnode_inference_tokens_total{bucket="input",tenant="acme"} 500.0' in metrics
    assert (
        'agentnode_inference_upstream_attempts_total{deployment="gpt-a",outcome="ok"} 1.0'
        in metrics
    )
    assert 'agentnode_inference_latency_seconds_count{endpoint="chat"} 2.0' in metrics
    assert 'agentnode_inference_latency_seconds_bucket{endpoint="chat",le="+Inf"} 2.0' in metrics


def _told(body: bytes) -> list[Decimal]:
    """The spend comments of a stream's body, in order."""
    marker = b": " + SPEND_HEADER.encode() + b" "
    return [Decimal(line[len(marker) :].decode()) for line in body.split(b"\n")
            if line.startswith(marker)]  # fmt: skip


def test_each_answer_tells_its_task_its_spend_so_far(env: ProxyEnv) -> None:
    """A call billed to a task tells that task's spend with this call in it: the header of a
    whole answer, a comment just before a stream's last event (both formats). It is the
    task's own figure (never its tenant's, nor a same-named task's of another tenant), and a
    call billed to no task is told nothing."""
    t1 = {"x-api-key": "sk-acme", "x-agentnode-task": "t1"}
    chat = {"model": "gpt-x", "messages": MSG}
    claude = {"model": "claude-x", "max_tokens": 8, "messages": CLAUDE_MSG}
    spent = Decimal(0)
    for _ in range(2):
        r = httpx.post(env.url + "/v1/chat/completions", json=chat, headers=t1)
        spent += GPT_COST
        assert r.status_code == 200 and Decimal(r.headers[SPEND_HEADER]) == spent
    r = httpx.post(env.url + "/v1/chat/completions", json=chat | {"stream": True}, headers=t1)
    spent += GPT_COST
    assert SPEND_HEADER not in r.headers and _told(r.content) == [spent]
    events = r.content.split(b"\n\n")
    assert events[-3].startswith(b": " + SPEND_HEADER.encode()) and events[-2] == b"data: [DONE]"
    r = httpx.post(env.url + "/v1/messages", json=claude, headers=t1)
    spent += CLAUDE_COST
    assert Decimal(r.headers[SPEND_HEADER]) == spent
    r = httpx.post(env.url + "/v1/messages", json=claude | {"stream": True}, headers=t1)
    spent += CLAUDE_COST
    assert _told(r.content) == [spent]
    assert r.content.split(b"\n\n")[-2].startswith(b"event: message_stop")
    # Exactly the ledger's figure for the task.
    rows = env.rows()
    assert sum(Decimal(row.cost) for row in rows if row.task == "t1") == spent
    # Another tenant's task of the same name, a second task, and no task at all.
    other = {"x-api-key": "sk-globex", "x-agentnode-task": "t1"}
    r = httpx.post(env.url + "/v1/chat/completions", json=chat, headers=other)
    assert Decimal(r.headers[SPEND_HEADER]) == GPT_COST
    r = httpx.post(env.url + "/v1/chat/completions", json=chat | {"stream": True}, headers=other)
    assert _told(r.content) == [2 * GPT_COST]
    t2 = {"x-api-key": "sk-acme", "x-agentnode-task": "t2"}
    r = httpx.post(env.url + "/v1/chat/completions", json=chat, headers=t2)
    assert Decimal(r.headers[SPEND_HEADER]) == GPT_COST
    for stream in (False, True):
        r = httpx.post(env.url + "/v1/chat/completions", json=chat | {"stream": stream},
                       headers={"x-api-key": "sk-acme"})  # fmt: skip
        assert r.status_code == 200 and SPEND_HEADER not in r.headers
        assert _told(r.content) == []


@pytest.mark.parametrize("stream", [False, True])
def test_the_runtime_reads_the_spend_it_is_told_through_both_sdks(
    env: ProxyEnv, stream: bool
) -> None:
    """The runtime's transport (`SpendTap`) gives the SDKs their answers unchanged and notes
    the spend told with each, streamed or not; an answer that tells none leaves it None."""
    from agentnode.runtime.spend import SpendTap

    tap = SpendTap()
    task = {"x-agentnode-task": "job-1"}
    gpt = env.openai(http_client=openai.DefaultHttpxClient(transport=tap), default_headers=task)
    claude = env.anthropic(
        http_client=anthropic.DefaultHttpxClient(transport=tap), default_headers=task
    )
    spent = Decimal(0)
    for _ in range(2):
        if stream:
            with gpt.chat.completions.stream(model="gpt-x", messages=MSG) as s:
                assert s.get_final_completion().choices[0].message.content == "t1t2t3"
        else:
            r = gpt.chat.completions.create(model="gpt-x", messages=MSG)
            assert r.choices[0].message.content == "Hello"
        spent += GPT_COST
        assert tap.spent == spent
        if stream:
            with claude.messages.stream(model="claude-x", max_tokens=8, messages=CLAUDE_MSG) as m:
                assert m.get_final_message().content
        else:
            assert claude.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
        spent += CLAUDE_COST
        assert tap.spent == spent
    untold = env.openai(http_client=openai.DefaultHttpxClient(transport=tap))  # no task
    answer = untold.chat.completions.create(model="gpt-x", messages=MSG, stream=stream)
    if stream:
        list(answer)
    assert tap.spent is None
