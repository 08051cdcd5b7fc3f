"""`agentnode demo`: the whole stack offline in under a minute, for a newcomer.

A node on a scratch data dir, its inference proxy in front of a scripted mock model, and the
reference runtime as an agent task: the model has it write a file with `run_code`, fetch an
address the task's egress policy denies, then answer. The task's timeline and cost follow.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentnode.errors import AgentnodeError, UsageError
from agentnode.inference.mock import MockUpstream, ToolCall, Turn
from agentnode.node.client import NodeClient
from agentnode.node.commands import exit_status
from agentnode.runtime.cli import this_python

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser"]

MODEL = "demo-model"
#: An address from TEST-NET-3 (RFC 5737: documentation only, never routed): the task's policy
#: denies it before any packet leaves.
DENIED = "203.0.113.7"
WRITE = (
    "from pathlib import Path\n"
    "Path('/workspace/hello.txt').write_text('hello from an agent task\\n')\n"
    "print(Path('/workspace/hello.txt').read_text(), end='')"
)
SCRIPT = (
    Turn(tool_calls=(ToolCall("run_code", {"code": WRITE}),)),
    Turn(tool_calls=(ToolCall("http_fetch", {"url": f"http://{DENIED}/"}),)),
    Turn(text="I wrote /workspace/hello.txt; the node did not let me reach " + DENIED + "."),
)


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `demo` to the CLI."""
    p = sub.add_parser("demo", description=__doc__)
    p.add_argument("--keep", action="store_true", help="keep the scratch data dir")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UsageError("demo starts a node, which needs root (run: sudo agentnode demo)")
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="agentnode-demo-"))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    mock = MockUpstream("openai", script=deque(SCRIPT))
    asyncio.run_coroutine_threadsafe(mock.start(), loop).result(30)
    node: subprocess.Popen[bytes] | None = None
    try:
        node, client = _start_node(root, mock)
        print(f"demo: a node on {root}, its proxy in front of a scripted mock model", flush=True)
        code = _run_agent(client, root / "api.sock")
        print(f"demo: done in {time.monotonic() - started:.1f} s", flush=True)
        return code
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        asyncio.run_coroutine_threadsafe(mock.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        if args.keep:
            print(f"demo: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _start_node(root: Path, mock: MockUpstream) -> tuple[subprocess.Popen[bytes], NodeClient]:
    config = root / "agentnode.toml"
    config.write_text(
        f'[network]\nsubnet = "10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"\n'
        f'[inference]\nlisten = "127.0.0.1:{random.randint(20000, 30000)}"\n'
        f'[inference.deployments.mock]\nkind = "openai"\nbase_url = "{mock.base_url}"\n'
        f'models = ["{MODEL}"]\nprice = {{ input = 2.5, cached_input = 1.25, output = 10 }}\n'
    )
    sock = root / "api.sock"
    with open(root / "node.log", "wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "agentnode", "run", "--config", str(config),
             "--data-dir", str(root / "data"), "--socket", str(sock)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = NodeClient(sock)
    deadline = time.monotonic() + 30
    while True:
        if node.poll() is not None:
            tail = (root / "node.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise AgentnodeError(f"the demo node exited {node.returncode}: {' '.join(tail)}")
        try:
            client.call("GET", "/v1/node")
            return node, client
        except AgentnodeError:
            if time.monotonic() > deadline:
                raise AgentnodeError("the demo node did not answer within 30 s") from None
            time.sleep(0.1)


def _run_agent(client: NodeClient, sock: Path) -> int:
    from agentnode.audit.text import spend, summary

    binds, env = this_python()
    text = "Write hello.txt in your workspace with run_code, then fetch http://" + DENIED
    task = client.call("POST", "/v1/tasks", {
        "tenant": "demo", "command": [sys.executable, "-m", "agentnode.runtime", "--tools",
                                      "run_code,http_fetch", "--", text],
        "agent": {"kind": "python", "model": MODEL}, "memory": "512M", "user": "0",
        "ro": binds, "env": env,
    })  # fmt: skip
    print(f"demo: agent task {task['id']}: {text}\n", flush=True)
    for chunk in NodeClient(sock, timeout=None).stream(f"/v1/tasks/{task['id']}/logs?follow=1"):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    while (done := client.call("GET", f"/v1/tasks/{task['id']}"))["state"] not in (
        "succeeded", "failed", "timed_out", "cancelled", "lost"):  # fmt: skip
        time.sleep(0.05)
    # The audit index may trail the task's end by a group commit.
    time.sleep(0.5)
    entries: list[dict[str, Any]] = client.call("GET", f"/v1/tasks/{task['id']}/timeline")
    print(f"\ndemo: the task {done['state']}; its timeline:", flush=True)
    for entry in entries:
        print("  " + summary(entry))
    calls, cost = spend(entries)
    print(f"\ndemo: {calls} model calls, ${cost} (at the demo's prices)", flush=True)
    return exit_status(done)
