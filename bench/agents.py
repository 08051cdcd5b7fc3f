"""Agents: what the node's checkpointer adds to a LangGraph agent step, against LangGraph's own
in-memory saver in the same run.

One run of a real LangGraph agent (langchain-openai's ChatOpenAI against the scripted mock
upstream on loopback, a prebuilt ToolNode): LLM call with a tool call, the tool, LLM call with
the answer — three super-steps, each checkpointed with `durability="sync"`. Ours:
`AgentnodeCheckpointer` over the memory API on loopback (RocksDB's log, no fsync); peer:
`InMemorySaver`. Goal (issue 26): ours <= 1.1x the peer per agent step. The proxy's own cost is
bench/proxy.py's.

The reference runtime's step (as root: a real `agentnode run` on a scratch data dir): the
runtime as a task, each step a model call through the node's proxy to the mock, `list_files`
through the node's MCP endpoint (its default; `runtime_step_api`: through the HTTP tool API),
the step's checkpoints and its budget check (a budget it never reaches), against the same loop
with the `openai` SDK calling the mock directly and `os.listdir` in the benchmark's process. Goal: <= 3 ms added per step. The timed loop
includes the task's first model call, which in a fresh agent costs ~30 ms of the SDK's lazy
set-up (imports, platform headers, response models) that the peer, warm, does not pay.

The box these run on is shared, so each of those lines also has a CPU figure (`_cpu`): CPU
seconds per step of every process doing the step's work while it runs (the LangGraph run's
process, which serves the memory API and the mock too; for the runtime: the task, the daemon
and this process, which serves the mock), against the peer's process.

Agents per second (as root): N reference-runtime tasks submitted at once, each a one-step run
(`python -m agentnode.runtime TEXT --model m`: the model answers at once), from the first
submit to the last one's end; against the same number of one-call agents without the node
(`python -c` importing the `openai` SDK and asking the mock once), as many at a time as the node
runs (`agents_per_s_api`: the runtime with tools over the HTTP API, which spares it the `mcp`
SDK's import). The node starts these as forks of its pre-imported interpreter (docs/agents.md),
which the step rounds before have started. Goal (issue 26): >= 50 agents/s on 2 cores.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import SecretStr

from _harness import Bench

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from agentnode.inference.mock import MockUpstream, ToolCall, Turn
from agentnode.integrations.langgraph import AgentnodeCheckpointer
from agentnode.node.client import NodeClient
from agentnode.node.paths import DEFAULT_DATA_DIR
from agentnode.sdk import Memory
from agentnode.storage.api import make_app
from agentnode.storage.episodic import EpisodicStore
from agentnode.storage.objects import ObjectStore
from agentnode.storage.tenancy import StaticTokens
from support.node_daemon import FINAL, Daemon, daemon

TOKEN = "bench-token"
_THREADS = itertools.count()


@tool
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


def graph(llm: Any, saver: BaseCheckpointSaver[Any]) -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [llm.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode([add]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=saver)


REPO = Path(__file__).resolve().parents[1]
#: Timed inside the task: the loop alone, not the interpreter's start and imports; its CPU
#: and its span on the monotonic clock (which a task shares with the host). With a budget (one
#: it never reaches), as a metered agent runs: each step checks the task's spend first.
_IN_TASK = (
    "import sys, time\n"
    "from decimal import Decimal\n"
    "from agentnode.runtime import Agent, Limits\n"
    "agent = Agent(model='m', tools=['list_files'], tools_via=sys.argv[1],\n"
    "              limits=Limits(max_steps=1000, budget=Decimal(1000)))\n"
    "m0, c0, t0 = time.monotonic(), time.process_time(), time.perf_counter()\n"
    "agent.run('look')\n"
    "print('SPAN', m0, time.monotonic(), time.process_time() - c0)\n"
    "print('ELAPSED', time.perf_counter() - t0)\n"
)
#: The peer of an agent task: the same one-call agent, without the node.
_BARE_AGENT = (
    "import sys\n"
    "from openai import OpenAI\n"
    "m = OpenAI(base_url=sys.argv[1], api_key='k', max_retries=0).chat.completions.create(\n"
    "    model='m', messages=[{'role': 'user', 'content': 'say done'}])\n"
    "print(m.choices[0].message.content)\n"
)
#: Agent tasks at once, and what each asks for (so that many fit on 2 cores at once).
_AT_ONCE, _CPUS, _MEMORY = 4, 0.5, "256M"


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuClock:
    """Samples the CPU of some processes every few ms, to tell what they used in a span of
    the monotonic clock measured elsewhere (inside a task)."""

    def __init__(self, *pids: int) -> None:
        self._pids = pids
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._samples.append((time.monotonic(), sum(_cpu_s(p) for p in self._pids)))

    def used(self, start: float, end: float) -> float:
        """CPU seconds the processes used between two monotonic times (nearest samples)."""

        def at(t: float) -> float:
            return min(self._samples, key=lambda s: abs(s[0] - t))[1]

        return at(end) - at(start)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _script(steps: int) -> deque[Turn]:
    call = Turn(tool_calls=(ToolCall("list_files", {}),))
    return deque([*([call] * (steps - 1)), Turn(text="done")])


def _direct(mock: MockUpstream, steps: int, workspace: Path) -> tuple[float, float]:
    """The same loop with nothing of the node: the SDK to the mock, the tool in-process.
    Seconds and CPU seconds (of this process, the mock's too) per step."""
    from openai import OpenAI

    llm = OpenAI(base_url=mock.base_url, api_key="k", max_retries=0)
    tools: Any = [{"type": "function", "function": {"name": "list_files", "parameters": {
        "type": "object", "properties": {}}}}]  # fmt: skip
    mock.script = _script(steps)
    messages: Any = [{"role": "user", "content": "look"}]
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        m = llm.chat.completions.create(model="m", messages=messages, tools=tools)
        msg = m.choices[0].message
        messages.append({"role": "assistant", "content": msg.content, "tool_calls": [
            c.model_dump(include={"id", "type", "function"}) for c in msg.tool_calls or ()]})  # fmt: skip
        if not msg.tool_calls:
            return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
        for c in msg.tool_calls:
            entries = sorted(os.listdir(workspace))
            messages.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps(entries)})


def _runtime_steps(
    d: Daemon, mock: MockUpstream, steps: int, door: str, cpu: _CpuClock
) -> tuple[float, float]:
    """Seconds per step of the runtime as a task of `d`, reaching tools through `door`, and
    CPU seconds per step of the task, the daemon and this process (the mock)."""
    mock.script = _script(steps)
    task = d.submit(
        [sys.executable, "-c", _IN_TASK, door], memory="512M", cpus=1, user="0",
        ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")}, agent={"kind": "python"},
    )  # fmt: skip
    done = d.wait(task["id"], timeout=120, poll=0.5)  # timed inside: polls only load the node
    out = d.log(task["id"])
    if done["state"] != "succeeded":
        raise RuntimeError(f"runtime task {done['state']} ({done['reason']}): {out[-2000:]}")
    start, end, task_cpu = (float(x) for x in out.split("SPAN")[-1].split()[:3])
    return float(out.split("ELAPSED")[-1]) / steps, (task_cpu + cpu.used(start, end)) / steps


class _Ends:
    """The tasks that reached a final state, as the node's event stream (`GET /v1/events`)
    tells them: waiting on it costs the node one write per batch of transitions, where
    polling each task every 20 ms cost it ~4 ms of CPU per agent (measured)."""

    def __init__(self, d: Daemon) -> None:
        self.ended: dict[str, str] = {}
        self._changed = threading.Condition()
        # No timeout: the stream is quiet between rounds (the bare agents' take a minute).
        self._stream = NodeClient(d.socket, timeout=None).stream("/v1/events")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffered = b""
        for chunk in self._stream:
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: ")]
            with self._changed:
                for e in events:
                    if e["state"] in FINAL:
                        self.ended[e["id"]] = e["state"]
                self._changed.notify_all()

    def wait(self, d: Daemon, ids: list[str], *, timeout: float) -> None:
        """Returns once every task of `ids` has ended; asks the node about those not heard of
        every 0.5 s (an end before the stream was open is in no event)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                self._changed.wait_for(lambda: all(i in self.ended for i in ids), timeout=0.5)
                missing = [i for i in ids if i not in self.ended]
            if not missing:
                return
            for i in missing:
                task = d.task(i)
                if task["state"] in FINAL:
                    with self._changed:
                        self.ended[i] = task["state"]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(missing)} agent tasks still running after {timeout} s")


def _agents_per_s(d: Daemon, ends: _Ends, mock: MockUpstream, n: int, door: str) -> float:
    """Reference-runtime tasks (tools through `door`) started and ended per second, n
    submitted at once."""
    mock.script = deque(Turn(text="done") for _ in range(n))
    t0 = time.perf_counter()
    ids = [d.submit(
        [sys.executable, "-m", "agentnode.runtime", "say done", "--model", "m", "--tools-via",
         door], memory=_MEMORY, cpus=_CPUS, user="0", ro=[str(REPO)],
        env={"PYTHONPATH": str(REPO / "python")}, agent={"kind": "python"},
    )["id"] for _ in range(n)]  # fmt: skip
    ends.wait(d, ids, timeout=600)
    elapsed = time.perf_counter() - t0
    for task_id in ids:
        if ends.ended[task_id] != "succeeded":
            raise RuntimeError(f"agent task {ends.ended[task_id]}: {d.log(task_id)[-2000:]}")
    return n / elapsed


def _bare_agents_per_s(mock: MockUpstream, n: int) -> float:
    """One-call agents without the node ended per second, _AT_ONCE at a time."""
    mock.script = deque(Turn(text="done") for _ in range(n))
    t0 = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for _ in range(n):
        if len(running) == _AT_ONCE:
            running.pop(0).wait()
        running.append(subprocess.Popen([sys.executable, "-c", _BARE_AGENT, mock.base_url],
                                        stdout=subprocess.DEVNULL))  # fmt: skip
    if any(p.wait() for p in running):
        raise RuntimeError("a bare agent failed")
    return n / (time.perf_counter() - t0)


def on_a_node(bench: Bench, mock: MockUpstream) -> None:
    """The reference runtime's per-step time as a node task against the direct loop's, with
    tools over MCP and over the HTTP API; then agents started and finished per second."""
    steps = 20 if bench.quick else 50
    DEFAULT_DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="agentnode-bench-agents-", dir=DEFAULT_DATA_DIR.parent))
    port = random.randint(20000, 30000)
    # Its own bridge: another node on this host (a test, a bench) may use the default one.
    config = (
        f'[network]\nbridge = "agentnodeb{random.randint(0, 99999)}"\n'
        f'subnet = "10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"\n'
        f'[inference]\nlisten = "127.0.0.1:{port}"\n'
        f'[inference.deployments.mock]\nkind = "openai"\nbase_url = "{mock.base_url}"\n'
        'models = ["m"]\nprice = { input = 2.5, output = 10 }\n'
    )
    times: dict[str, list[tuple[float, float]]] = {"mcp": [], "api": [], "direct": []}
    rates: dict[str, list[float]] = {"mcp": [], "api": [], "bare": []}
    try:
        with daemon(root / "node", config) as d:
            cpu = _CpuClock(d.pid, os.getpid())
            for r in range(4 if bench.quick else 8):
                rounds: list[tuple[str, Callable[[], tuple[float, float]]]] = [
                    ("mcp", lambda: _runtime_steps(d, mock, steps, "mcp", cpu)),
                    ("api", lambda: _runtime_steps(d, mock, steps, "api", cpu)),
                    ("direct", lambda: _direct(mock, steps, root)),
                ]
                for name, measure in rounds if r % 2 else reversed(rounds):
                    elapsed = measure()
                    if r:  # the first round warms all three
                        times[name].append(elapsed)
            cpu.close()
            n = 8 if bench.quick else 24
            ends = _Ends(d)
            for _ in range(2 if bench.quick else 3):
                rates["mcp"].append(_agents_per_s(d, ends, mock, n, "mcp"))
                rates["api"].append(_agents_per_s(d, ends, mock, n, "api"))
                rates["bare"].append(_bare_agents_per_s(mock, n))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peer = "openai SDK to the mock + the tool in-process"
    for i, unit in ((0, "ms/step"), (1, "ms CPU/step")):
        direct = statistics.median(t[i] for t in times["direct"]) * 1000
        for name, door in (("runtime_step", "mcp"), ("runtime_step_api", "api")):
            ours = statistics.median(t[i] for t in times[door]) * 1000
            bench.record(name + ("_cpu" if i else ""), ours, direct, unit, peer_name=peer)
    bare = statistics.median(rates["bare"])
    for name, door in (("agents_per_s", "mcp"), ("agents_per_s_api", "api")):
        bench.record(name, statistics.median(rates[door]), bare, "agents/s",
                     peer_name=f"python -c: openai SDK, one call to the mock, {_AT_ONCE} at a time",
                     higher_is_better=True)  # fmt: skip


def main() -> None:
    bench = Bench.from_args("agents")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        episodic = EpisodicStore(Path(tmp) / "episodic")
        objects = ObjectStore(Path(tmp) / "objects")
        app = make_app(episodic=episodic, objects=objects, auth=StaticTokens({TOKEN: "bench"}))
        runner = web.AppRunner(app, access_log=None)

        async def start() -> MockUpstream:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return await MockUpstream("openai").start()

        mock = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        llm = ChatOpenAI(model="m", base_url=mock.base_url, api_key=SecretStr("k"), max_retries=0)
        llm_tools = llm.bind_tools([add])
        turns = [Turn(tool_calls=(ToolCall("add", {"a": 2, "b": 3}),)), Turn(text="5")]

        def run(saver: BaseCheckpointSaver[Any]) -> tuple[float, float]:
            mock.script = deque(turns)
            config: RunnableConfig = {"configurable": {"thread_id": f"t{next(_THREADS)}"}}
            t0, c0 = time.perf_counter(), time.process_time()
            graph(llm_tools, saver).invoke(
                {"messages": [HumanMessage("add 2 and 3")]}, config, durability="sync"
            )
            # Per agent step (model, tool, model); LangGraph counts a fourth super-step, the
            # input's, and makes five checkpoints.
            return (time.perf_counter() - t0) / 3, (time.process_time() - c0) / 3

        with Memory(url, TOKEN) as memory:
            ours_saver, peer_saver = AgentnodeCheckpointer(memory, task="bench"), InMemorySaver()
            for _ in range(3):  # warm both: connections, imports, JIT-less caches
                run(ours_saver), run(peer_saver)
            ours: list[tuple[float, float]] = []
            peer: list[tuple[float, float]] = []
            for r in range(10 if bench.quick else 40):
                pair = [(ours, ours_saver), (peer, peer_saver)]
                for times, saver in pair if r % 2 == 0 else reversed(pair):
                    times.append(run(saver))
        if os.geteuid() == 0:
            on_a_node(bench, mock)
        for i, name, unit in ((0, "langgraph_step", "ms/step"),
                              (1, "langgraph_step_cpu", "ms CPU/step")):  # fmt: skip
            bench.record(name, statistics.median(t[i] for t in ours) * 1000,
                         statistics.median(t[i] for t in peer) * 1000, unit,
                         peer_name="LangGraph InMemorySaver")  # fmt: skip
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        asyncio.run_coroutine_threadsafe(mock.close(), loop).result(30)
        episodic.close()
        objects.close()
    loop.call_soon_threadsafe(loop.stop)
    bench.save()


if __name__ == "__main__":
    main()
