"""A running inference proxy in front of mock upstreams, for tests driving it with real SDKs.

The proxy and the mocks run on an event loop in a background thread, so tests use the official
synchronous `openai` and `anthropic` clients exactly as agent code would.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import openai
import pytest
from aiohttp import web

from agentnode.inference.config import parse_config
from agentnode.inference.mock import MockUpstream
from agentnode.inference.proxy import Proxy
from agentnode.inference.server import PROXY, create_app
from agentnode.inference.store import LedgerRow

T = TypeVar("T")

PRICE_GPT = {"input": 2.5, "cached_input": 1.25, "output": 10, "reasoning": 12}
PRICE_CLAUDE = {"input": 3, "cached_input": 0.3, "cache_write": 3.75, "output": 15}


def base_config(mocks: dict[str, MockUpstream], state_dir: Path) -> dict[str, Any]:
    def dep(m: MockUpstream, models: list[str], price: dict[str, float]) -> dict[str, Any]:
        return {
            "kind": m.kind,
            "base_url": m.base_url,
            "models": models,
            "price": price,
            "retries": 0,
            "first_byte_timeout": 2.0,
            "timeout": 2.0,
        }

    return {
        "state_dir": str(state_dir),
        "backoff_base": 0.01,
        "deployments": {
            "gpt-a": dep(mocks["a"], ["gpt-x"], PRICE_GPT),
            "gpt-b": dep(mocks["b"], ["gpt-y"], PRICE_GPT),
            "claude-a": dep(mocks["c"], ["claude-x"], PRICE_CLAUDE),
            "claude-b": dep(mocks["d"], ["claude-y"], PRICE_CLAUDE),
        },
        "routes": {
            "smart-gpt": {"models": ["gpt-x", "gpt-y"]},
            "smart-claude": {"models": ["claude-x", "claude-y"]},
        },
        "tenants": {
            "acme": {"api_keys": ["sk-acme"]},
            "globex": {"api_keys": ["sk-globex"]},
        },
    }


class ProxyEnv:
    """Mocks a, b (OpenAI) and c, d (Anthropic) and the proxy; close() tears all down."""

    def __init__(
        self, state_dir: Path, configure: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self._clients: list[openai.OpenAI | anthropic.Anthropic] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.mocks = {
            "a": MockUpstream("openai", name="a"),
            "b": MockUpstream("openai", name="b"),
            "c": MockUpstream("anthropic", name="c"),
            "d": MockUpstream("anthropic", name="d"),
        }
        for m in self.mocks.values():
            self.run(m.start())
        raw = base_config(self.mocks, state_dir)
        if configure is not None:
            configure(raw)
        self.config = parse_config(copy.deepcopy(raw))
        self._runner = web.AppRunner(
            create_app(self.config), handler_cancellation=True, access_log=None, shutdown_timeout=5
        )
        self.run(self._runner.setup())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.run(web.SockSite(self._runner, sock).start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    @property
    def proxy(self) -> Proxy:
        return self._runner.app[PROXY]

    def openai(self, key: str = "sk-acme", **kw: Any) -> openai.OpenAI:
        c = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)
        self._clients.append(c)
        return c

    def anthropic(self, key: str = "sk-acme", **kw: Any) -> anthropic.Anthropic:
        c = anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, **kw)
        self._clients.append(c)
        return c

    def rows(self) -> list[LedgerRow]:
        return self.run(self.proxy.store.rows())

    def close(self) -> None:
        """Stops the proxy (writing what it still holds) and the mocks; a second call is a no-op."""
        if self.loop.is_closed():
            return
        for c in self._clients:
            c.close()
        try:
            self.run(self._runner.cleanup())
            for m in self.mocks.values():
                self.run(m.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


#: Changes the proxy config (a dict) before the proxy starts.
Configure = Callable[[dict[str, Any]], None]


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., ProxyEnv]]:
    """Makes proxy environments (each in its own state dir) and closes them after the test."""
    envs: list[ProxyEnv] = []

    def make(configure: Configure | None = None) -> ProxyEnv:
        env = ProxyEnv(tmp_path / f"state{len(envs)}", configure)
        envs.append(env)
        return env

    yield make
    for e in envs:
        e.close()
