"""Proxy configuration errors name the key; `agentnode proxy` serves and stops cleanly."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentnode.errors import ConfigError
from agentnode.inference import parse_config
from agentnode.inference.limits import Window
from agentnode.inference.pricing import Usage, anthropic_usage, cost, openai_usage
from conftest import run_cli

GOOD = {
    "deployments": {
        "gpt": {
            "kind": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "models": ["gpt-x"],
            "price": {"input": 1.5},
        }
    }
}


def _with(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    d: Any = raw
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("deployments.gpt.kind", "azure", "inference.deployments.gpt.kind = 'azure' is not one of"),
        ("deployments.gpt.base_url", "ftp://x", "inference.deployments.gpt.base_url"),
        ("deployments.gpt.price.output", -1, "inference.deployments.gpt.price.output must be"),
        (
            "deployments.gpt.price.bogus",
            1,
            "inference.deployments.gpt.price.bogus is not a known key",
        ),
        ("deployments.gpt.rpm", 0, "inference.deployments.gpt.rpm must be a positive integer"),
        (
            "deployments.gpt.api_key_env",
            "AGENTNODE_NO_SUCH_VAR",
            "AGENTNODE_NO_SUCH_VAR is not set",
        ),
        (
            "routes.smart",
            {"models": ["nope"]},
            "inference.routes.smart.models[0] = 'nope' is served by no",
        ),
        ("aliases.fast", 3, "inference.aliases.fast must be a model name"),
        ("tenants.t", {"api_keys": []}, "inference.tenants.t.api_keys is empty"),
        ("listen", "nowhere", "inference.listen = 'nowhere' is not HOST:PORT"),
        ("colour", "blue", "inference.colour is not a known key"),
    ],
)
def test_config_errors_name_the_key(path: str, value: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_with(path, value))
    assert needle in str(e.value)


def test_config_aliases_and_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTNODE_TEST_KEY", "sk-upstream")
    raw = _with("deployments.gpt.api_key_env", "AGENTNODE_TEST_KEY")
    raw["aliases"] = {"fast": "gpt-x"}
    cfg = parse_config(raw)
    assert cfg.deployments["gpt"].api_key == "sk-upstream"
    assert cfg.routes["fast"].models == ("gpt-x",)
    assert (cfg.host, cfg.port) == ("127.0.0.1", 4000)


def test_buckets_follow_each_provider_convention() -> None:
    o = openai_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 5},
        }
    )
    assert o == Usage(input=6, cached_input=4, output=2, reasoning=5)
    a = anthropic_usage(
        {
            "input_tokens": 3,
            "cache_read_input_tokens": 20,
            "cache_creation_input_tokens": 9,
            "output_tokens": 4,
        }
    )
    assert a == Usage(input=3, cached_input=20, cache_write=9, output=4)
    price = parse_config(GOOD).deployments["gpt"].price
    assert str(cost(Usage(input=1), price)) == "0.0000015"


def test_cli_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[inference.deployments.x]\nkind = "azure"\n')
    r = run_cli(["proxy", "--config", str(bad)])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "agentnode: error: inference.deployments.x.kind = 'azure' is not one of openai, anthropic"
    ]
    r = run_cli(["proxy", "--config", str(tmp_path / "missing.toml")])
    assert r.returncode == 1 and "cannot read config" in r.stderr


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[inference.deployments.gpt]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'models = ["gpt-x"]\n'
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "agentnode", "proxy", "--config", str(cfg)]
    argv += ["--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state")]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models")
                break
            except httpx.ConnectError:
                assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()  # type: ignore[union-attr]
                time.sleep(0.05)
        assert [m["id"] for m in r.json()["data"]] == ["gpt-x"]
        # The upstream at port 9 refuses: a clear 502 in OpenAI's format, not a crash.
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "gpt-x", "messages": []},
        )
        assert r.status_code == 502 and "cannot reach" in r.json()["error"]["message"]
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert f"listening on http://127.0.0.1:{port}" in out
    assert os.path.isdir(tmp_path / "state" / "ledger")


@given(st.lists(st.floats(min_value=0, max_value=300), min_size=1, max_size=200))
def test_window_admits_at_most_limit_in_any_60s(times: list[float]) -> None:
    w = Window("test rpm", 5)
    admitted = []
    for now in sorted(times):
        if w.wait_time(1, now) == 0:
            w.take(1, now)
            admitted.append(now)
        else:
            # The wait it reports is exactly when the oldest admitted entry leaves the window.
            oldest = next(u for u in admitted if now - u < 60)
            assert w.wait_time(1, now) == 60 - (now - oldest)
    for t in admitted:
        assert sum(0 <= t - u < 60 for u in admitted) <= 5


def test_window_corrects_token_estimates() -> None:
    w = Window("test tpm", 1000)
    entry = w.take(900, 0.0)
    assert w.wait_time(200, 1.0) == 59.0
    w.adjust(entry, 100)  # the call used far fewer tokens than estimated
    assert w.wait_time(200, 1.0) == 0
