"""What agent end-to-end tests share: a scripted mock upstream in the test's netns and a daemon
there that serves the inference proxy in front of it, priced so costs are exact."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agentnode.errors import AgentnodeError
from support.egress_world import HOST4, World
from support.node_daemon import Daemon, daemon

HERE = Path(__file__).parent
REPO = HERE.parents[1]
#: Where agent runtimes are installed once and reused by later runs (outside the repo).
CACHE = Path(os.environ.get("AGENTNODE_TEST_CACHE", "/var/cache/agentnode-test")) / "agents"
# 1000 prompt (600 cached) + 300 completion (100 reasoning) per mock answer
#   = 400*2.5 + 600*1.25 + 200*10 + 100*12 = 4950 micro-USD.
CALL_COST = Decimal("0.00495")
# Anthropic's: 100 input + 5000 cache reads + 2000 cache writes (unpriced) + 250 output
#   = 100*2.5 + 5000*1.25 + 250*10 = 9000 micro-USD.
ANTHROPIC_CALL_COST = Decimal("0.009")
PRICE = "price = { input = 2.5, cached_input = 1.25, output = 10, reasoning = 12 }"


class ScriptedMock:
    """`agent_mock.py` in the world's task netns. `requests` is exact whenever read: the mock
    writes each request's line to a file before it answers, and each read takes what is new."""

    def __init__(
        self, world: World, script: list[Any], kind: str = "openai", *, embedding_size: int = 3
    ) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
        self._out = tempfile.TemporaryFile("w+b")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{world.task}", sys.executable,
             str(HERE / "agent_mock.py"), kind, json.dumps(script), str(embedding_size)],
            stdout=self._out, env=env,
        )  # fmt: skip
        self._seen: list[dict[str, Any]] = []
        self._read = 0
        deadline = time.monotonic() + 30
        while not (first := self._lines()):
            assert self.proc.poll() is None and time.monotonic() < deadline, "mock did not start"
            time.sleep(0.01)
        self.base_url = first[0].decode().strip()

    def _lines(self) -> list[bytes]:
        """Complete lines written since the last call."""
        data = os.pread(self._out.fileno(), 1 << 20, self._read)
        complete = data[: data.rfind(b"\n") + 1]
        self._read += len(complete)
        return complete.splitlines()

    @property
    def requests(self) -> list[dict[str, Any]]:
        self._seen += [json.loads(line) for line in self._lines()]
        return self._seen

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._out.close()


def subnet() -> str:
    return f"10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"


@contextlib.contextmanager
def agent_node(
    world: World,
    root: Path,
    script: list[Any],
    *,
    extra: str = "",
    kind: str = "openai",
    models: tuple[str, ...] | None = None,
    embedding_size: int = 3,
) -> Iterator[tuple[Daemon, ScriptedMock]]:
    """A daemon in the world's task netns whose proxy serves `models` from the mock (default
    `gpt-test`, or `claude-test` when the mock speaks Anthropic's format: `kind="anthropic"`)."""
    mock = ScriptedMock(world, script, kind, embedding_size=embedding_size)
    if models is None:
        models = ("gpt-test",) if kind == "openai" else ("claude-test",)
    port = random.randint(20000, 30000)
    try:
        config = (
            f'[network]\nsubnet = "{subnet()}"\ndns_upstream = "{HOST4}:53"\n'
            "[retry]\nbase = 0.1\n"
            f'[inference]\nlisten = "127.0.0.1:{port}"\n'
            f'[inference.deployments.mock]\nkind = "{kind}"\nbase_url = "{mock.base_url}"\n'
            f"models = {json.dumps(list(models))}\n{PRICE}\n{extra}"
        )
        with daemon(root, config, ("nsenter", f"--net=/run/netns/{world.task}")) as d:
            d.inference_port = port  # type: ignore[attr-defined]
            yield d, mock
    finally:
        mock.close()


def audit(d: Daemon) -> list[dict[str, Any]]:
    """The egress denials in the daemon's audit log."""
    path = d.data / "audit" / "audit.log"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r.get("kind") == "egress_denied"]


def ledger(world: World, d: Daemon, key: str) -> list[dict[str, Any]]:
    """The proxy's usage rows per tenant and task, read with a tenant's API key `key`."""
    url = f"http://127.0.0.1:{d.inference_port}/v1/usage?group_by=tenant,task"  # type: ignore[attr-defined]
    code = (
        "import json, sys, urllib.request\n"
        f"r = urllib.request.Request({url!r}, headers={{'Authorization': 'Bearer {key}'}})\n"
        "print(json.dumps(json.load(urllib.request.urlopen(r))['data']))"
    )
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{world.task}", sys.executable, "-c", code],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def installed_agent(runtime: Any, title: str) -> Path:
    """CACHE with `runtime` (the agents module: `status`, `install`) installed in it, installing
    it the first time; a runtime that cannot be installed skips the test, or fails it in CI."""
    if runtime.status(CACHE) is None:
        try:
            runtime.install(CACHE)
        except AgentnodeError as e:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{title} is missing and could not be installed: {e}")
            pytest.skip(f"{title} is not installed and could not be: {e}")
    return CACHE


def ap_client_python() -> Path:
    """The interpreter of a venv (next to CACHE, reused by later runs) holding the Agent
    Protocol's own client, `agent-protocol-client` (it needs pydantic 1: not in ours); a client
    that cannot be installed skips the test, or fails it in CI."""
    venv = CACHE.parent / "ap-client"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import agent_protocol_client"]
    if not python.exists() or subprocess.run(probe, capture_output=True, check=False).returncode:
        base = Path(sys.base_prefix) / "bin" / "python3"
        for argv in ([str(base), "-m", "venv", "--clear", str(venv)],
                     [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      "agent-protocol-client==1.1.0"]):  # fmt: skip
            run = subprocess.run(argv, capture_output=True, text=True, check=False)
            if run.returncode != 0:
                if os.environ.get("CI") == "true":
                    pytest.fail(f"agent-protocol-client could not be installed: {run.stderr}")
                pytest.skip(f"agent-protocol-client could not be installed: {run.stderr}")
    return python
