"""`agentnode proxy` with no config: the providers whose keys are in the environment, at the
shipped price table's prices; `agentnode proxy prices [--update FILE]`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest

from agentnode.inference.config import parse_config
from agentnode.inference.mock import MockUpstream
from agentnode.inference.prices import load_table
from agentnode.inference.store import Store

AGENTNODE = [sys.executable, "-m", "agentnode"]


@pytest.fixture
def mocks() -> Iterator[dict[str, MockUpstream]]:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    ms = {k: MockUpstream(k) for k in ("openai", "anthropic")}
    for m in ms.values():
        asyncio.run_coroutine_threadsafe(m.start(), loop).result(10)
    yield ms
    for m in ms.values():
        asyncio.run_coroutine_threadsafe(m.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_env_keys_alone_serve_the_providers_at_table_prices(
    tmp_path: Path, mocks: dict[str, MockUpstream]
) -> None:
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env |= {
        "OPENAI_API_KEY": "sk-env-openai",
        "OPENAI_BASE_URL": mocks["openai"].base_url,
        "ANTHROPIC_API_KEY": "sk-env-anthropic",
        "ANTHROPIC_BASE_URL": mocks["anthropic"].base_url,
    }
    state = tmp_path / "state"
    p = subprocess.Popen(
        [*AGENTNODE, "proxy", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and "listening" in p.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        oa = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
        an = anthropic.Anthropic(base_url=url, api_key="anything", max_retries=0)
        names = {m.id for m in oa.models.list()}
        assert {"gpt-4o", "gpt-4o-mini"} <= names and "claude-sonnet-4-5" not in names
        assert "claude-sonnet-4-5" in {m.id for m in an.models.list()}
        oa.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        an.messages.create(
            model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        # The providers' keys from the environment, not the client's, go upstream.
        assert mocks["openai"].requests[-1]["headers"]["Authorization"] == "Bearer sk-env-openai"
        assert mocks["anthropic"].requests[-1]["headers"]["x-api-key"] == "sk-env-anthropic"
        oa.close()
        an.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)
        assert p.stdout is not None
        p.stdout.close()

    async def rows() -> list[tuple[str, Decimal]]:
        store = await Store.open(state)
        try:
            return [(r.model, Decimal(r.cost)) for r in await store.rows()]
        finally:
            await store.close()

    table = load_table().models
    gpt, claude = table["gpt-4o-mini"], table["claude-sonnet-4-5"]
    # The mocks' usage: OpenAI 400 fresh + 600 cached in, 200 out + 100 reasoning; Anthropic
    # 100 in, 5000 read, 2000 written, 250 out.
    d = Decimal
    want_gpt = (
        400 * d(gpt["input"])
        + 600 * d(gpt["cached_input"])
        + 200 * d(gpt["output"])
        + 100 * d(gpt["reasoning"])
    ) / 1_000_000
    want_claude = (
        100 * d(claude["input"])
        + 5000 * d(claude["cached_input"])
        + 2000 * d(claude["cache_write"])
        + 250 * d(claude["output"])
    ) / 1_000_000
    assert sorted(asyncio.run(rows())) == [
        ("claude-sonnet-4-5", want_claude),
        ("gpt-4o-mini", want_gpt),
    ]
    assert want_gpt > 0 and want_claude > 0


def test_a_configured_price_wins_over_the_table(tmp_path: Path) -> None:
    dep = {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "models": ["gpt-4o", "mine"]}
    raw = {
        "state_dir": str(tmp_path),
        "deployments": {"t": dep, "c": dep | {"price": {"input": 1}}},
    }
    cfg = parse_config(raw)
    t, c = cfg.deployments["t"], cfg.deployments["c"]
    assert t.price_of("gpt-4o").input == Decimal(load_table().models["gpt-4o"]["input"]) > 0
    assert t.price_of("mine").input == 0  # not in the table, no price configured
    assert c.price_of("gpt-4o").input == Decimal(1)


def test_prices_show_and_update(tmp_path: Path) -> None:
    out = subprocess.run(
        [*AGENTNODE, "proxy", "prices", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "LiteLLM" in out and "claude-sonnet-4-5" in out and "gpt-4o-mini" in out
    newer = {
        "gpt-new": {
            "litellm_provider": "openai",
            "mode": "chat",
            "input_cost_per_token": 2e-06,
            "output_cost_per_token": 8e-06,
            "cache_read_input_token_cost": 5e-07,
        },
        "embed": {"litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 1e-8},
    }
    f = tmp_path / "litellm.json"
    f.write_text(json.dumps(newer))
    r = subprocess.run(
        [*AGENTNODE, "proxy", "prices", "--update", str(f), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 models written" in r.stdout
    t = load_table(tmp_path)
    assert t.models == {
        "gpt-new": {
            "kind": "openai",
            "input": "2",
            "output": "8",
            "cached_input": "0.5",
            "cache_write": "2",
            "reasoning": "8",
        }
    }
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    r = subprocess.run(
        [*AGENTNODE, "proxy", "prices", "--update", str(bad), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "cannot read price file" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
