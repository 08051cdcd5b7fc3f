"""Agents: what the node adds to an agent's step, for a LangGraph agent and for the reference
runtime, and how many agents it starts a second.

A LangGraph agent as a node task (`langgraph_task`, as root: a real `agentnode run` on a scratch
data dir): a real LangGraph agent (langchain-openai's ChatOpenAI, a prebuilt ToolNode) run
unmodified as a task of kind `langgraph`, its model calls through the node's proxy to the
scripted mock upstream, its checkpoints by `AgentnodeCheckpointer()` over the task's memory
socket. One run is an LLM call with a tool call, the tool, an LLM call with the answer: three
agent steps (LangGraph counts a fourth super-step, the input's), each checkpointed with
`durability="sync"`. Peer: the same program with `InMemorySaver`, the SDK calling the mock
directly, as a process beside the node; the mock is in neither. Both timed inside after three
warming runs. Goal (issue 26): ours <= 1.1x the peer per agent step (`--only langgraph_task`).

The checkpointer's share of it (`langgraph_step`, no root needed, `--only langgraph`): the same
graph in this process, against the mock here, with `AgentnodeCheckpointer` over the memory
socket of `agentnode memory serve --socket` in its own process (as a task reaches its node's
daemon: another process, over a unix socket; the same operations and RocksDB writes to the log
without fsync, not the daemon's other work); `langgraph_step_http`: the same saver over that
process's HTTP API on loopback, the door tasks used before. Peer: `InMemorySaver`. The proxy's
own cost is bench/proxy.py's.

The reference runtime's step (as root): the runtime as a task, each step a model call through
the node's proxy to the mock, `list_files` through the node's MCP endpoint (its default;
`runtime_step_api`: through the HTTP tool API), the step's checkpoints (over the memory socket)
and its budget check (a budget it never reaches), against the same loop with the `openai` SDK
calling the mock directly, the request made as the runtime makes it, and `os.listdir`, in a
process of its own (`_DIRECT`). Goal: <= 3 ms added per step (`--only runtime_step` runs this
part alone). Both are timed warm: each makes one model call and one tool call before its loop.

The box these run on is shared, so each of those lines also has a CPU figure (`_cpu`): CPU
seconds per step of every process doing the step's work while it runs (for `langgraph_step`:
the LangGraph run's process, which serves the mock too, and the memory server's, from its
threads' schedstat; for the tasks: the task, the daemon and this process, which serves the
mock; for their peers, the peer's process and this one).

Agents per second (as root): N reference-runtime tasks submitted at once, each a one-step run
(`python -m agentnode.runtime TEXT --model m`: the model answers at once), from the first
submit to the last one's end; against the same number of one-call agents without the node
(`python -c` importing the `openai` SDK and asking the mock once), as many at a time as the node
runs (`agents_per_s_api`: the runtime with tools over the HTTP API; a one-step agent calls no
tool, and the runtime opens its MCP session at its first call, so both doors start alike).
The node starts these as forks of its pre-imported interpreter (docs/agents.md), which the
step rounds before have started. Goal (issue 26): >= 50 agents/s on 2 cores.
The agent tasks ask for what a user running many agents would: the node's defaults for an
agent, a 1-CPU limit and a 0.1-CPU reservation (docs/node.md, "CPU: what a task reserves"),
so the node runs as many at once as 0.1-CPU reservations fit in its allocatable CPUs (17 on
2 cores); the peer runs that many at a time. (Until 2026-12-06 the bench asked for `cpus=0.5`,
then both the limit and the reservation: 3 agents at a time, an admission bound of ~15/s
while the CPUs were half idle.) `agents_cpu` is the CPU per agent beside the rate: for the
node, its daemon (with the children it reaped), its fork server and its tasks' cgroups; for
the peer, the bare agents; for both, this process (the mock and the client). Kernel workers
(network namespace teardown) are in neither. `--only agents_per_s` runs that part alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
from agentnode.node.restore import node_id
from agentnode.sdk import Memory
from support.node_daemon import FINAL, Daemon, daemon

TOKEN = "bench-token-0123456789"
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


def langgraph_input() -> dict[str, Any]:
    """A LangGraph run's input: a question the model answers with one call of `add`."""
    return {"messages": [HumanMessage("add 2 and 3")]}


#: The mock's answers to one LangGraph run: a call of `add`, then the answer.
LANGGRAPH_TURNS = (Turn(tool_calls=(ToolCall("add", {"a": 2, "b": 3}),)), Turn(text="5"))

REPO = Path(__file__).resolve().parents[1]
#: Timed inside the task: the loop alone, not the interpreter's start and imports; its CPU
#: and its span on the monotonic clock (which a task shares with the host). With a budget (one
#: it never reaches), as a metered agent runs: each step checks the task's spend first. One
#: model call and one tool call before it warm the task as the peer's first round warms it:
#: in a fresh agent each costs ~5 ms more than the next (the first touch of the SDKs' pages
#: the agent shares with the fork server copies them), a start cost, which agents/s counts.
_IN_TASK = (
    "import sys, time\n"
    "from decimal import Decimal\n"
    "from agentnode.runtime import Agent, Limits\n"
    "agent = Agent(model='m', tools=['list_files'], tools_via=sys.argv[1],\n"
    "              limits=Limits(max_steps=1000, budget=Decimal(1000)))\n"
    "agent.format.ask([{'role': 'user', 'content': 'warm'}], agent.schemas)\n"
    "agent.tools.call('list_files', {}, key='warm')\n"
    "m0, c0, t0 = time.monotonic(), time.process_time(), time.perf_counter()\n"
    "agent.run('look')\n"
    "print('SPAN', m0, time.monotonic(), time.process_time() - c0)\n"
    "print('ELAPSED', time.perf_counter() - t0)\n"
)
#: The runtime's loop without the node: the `openai` SDK to the mock, the request made as the
#: runtime makes it (`formats._as_is`: the conversation past the SDK's transform), and
#: `os.listdir` for the tool; warmed by one call and one listing first, as `_IN_TASK` is.
_DIRECT = (
    "import json, os, sys, time\n"
    "from openai import OpenAI\n"
    "llm = OpenAI(base_url=sys.argv[1], api_key='k', max_retries=0)\n"
    "tools = [{'type': 'function', 'function': {'name': 'list_files',\n"
    "          'parameters': {'type': 'object', 'properties': {}}}}]\n"
    "def ask(messages):\n"
    "    return llm.chat.completions.create(model='m', messages=(), tools=tools,\n"
    "                                       extra_body={'messages': messages}).choices[0].message\n"
    "ask([{'role': 'user', 'content': 'warm'}]), os.listdir(sys.argv[2])\n"
    "messages = [{'role': 'user', 'content': 'look'}]\n"
    "m0, c0, t0 = time.monotonic(), time.process_time(), time.perf_counter()\n"
    "while True:\n"
    "    msg = ask(messages)\n"
    "    messages.append({'role': 'assistant', 'content': msg.content, 'tool_calls': [\n"
    "        c.model_dump(include={'id', 'type', 'function'}) for c in msg.tool_calls or ()]})\n"
    "    if not msg.tool_calls:\n"
    "        break\n"
    "    for c in msg.tool_calls:\n"
    "        entries = sorted(os.listdir(sys.argv[2]))\n"
    "        messages.append({'role': 'tool', 'tool_call_id': c.id, 'content': json.dumps(entries)})\n"
    "print('SPAN', m0, time.monotonic(), time.process_time() - c0)\n"
    "print('ELAPSED', time.perf_counter() - t0)\n"
)
#: A LangGraph agent, unmodified, as a node task of kind `langgraph` (`ChatOpenAI` finds the
#: node's proxy and the task's token in its environment, `AgentnodeCheckpointer()` the memory
#: socket) or, its peer, as a process beside the node's (`ChatOpenAI` to the mock,
#: `InMemorySaver`): both their own interpreter, the mock in neither. Timed inside after three
#: warming runs, as `_IN_TASK` is; `graph` and `add` are this module's.
_LANGGRAPH_AGENT = (
    "import sys, time\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from agents import add, graph, langgraph_input\n"
    "from langchain_openai import ChatOpenAI\n"
    "from agentnode.integrations.langgraph import AgentnodeCheckpointer\n"
    "from langgraph.checkpoint.memory import InMemorySaver\n"
    "llm = ChatOpenAI(model='m', max_retries=0).bind_tools([add])\n"
    "saver = AgentnodeCheckpointer() if sys.argv[3] == 'node' else InMemorySaver()\n"
    "runs = int(sys.argv[2])\n"
    "def run(i):\n"
    "    graph(llm, saver).invoke(langgraph_input(), {'configurable': {'thread_id': f't{i}'}},\n"
    "                             durability='sync')\n"
    "for i in range(3):\n"
    "    run(i)\n"
    "m0, c0, t0 = time.monotonic(), time.process_time(), time.perf_counter()\n"
    "for i in range(3, 3 + runs):\n"
    "    run(i)\n"
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
#: What an agent task asks for besides the node's defaults for agents (1-CPU limit, 0.1-CPU
#: reservation): less memory than the default 512M, which would not change how many run.
_MEMORY = "256M"


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

    def __enter__(self) -> _CpuClock:
        return self

    def __exit__(self, *exc: object) -> None:
        # Not running while a peer runs in this process: its samples would slow the peer.
        self._stop.set()
        self._thread.join()


def _timed(out: str, steps: int, cpu: _CpuClock) -> tuple[float, float]:
    """Seconds and CPU seconds per step of a loop timed inside an agent, from its output
    (`SPAN` and `ELAPSED`): its own CPU and what `cpu`'s processes used meanwhile."""
    start, end, own = (float(x) for x in out.split("SPAN")[-1].split()[:3])
    return float(out.split("ELAPSED")[-1]) / steps, (own + cpu.used(start, end)) / steps


def _script(steps: int, *, warm: bool = False) -> deque[Turn]:
    """`steps` model answers, each calling the tool but the last; after one answer to the
    task's warming call when `warm`."""
    call = Turn(tool_calls=(ToolCall("list_files", {}),))
    return deque([*([Turn(text="warm")] if warm else []), *([call] * (steps - 1)),
                  Turn(text="done")])  # fmt: skip


def _direct(mock: MockUpstream, steps: int, workspace: Path) -> tuple[float, float]:
    """The same loop with nothing of the node (`_DIRECT`, a process of its own, as the task
    is: the mock is in neither): seconds and CPU seconds per step, its own and this
    process's (the mock's)."""
    mock.script = _script(steps, warm=True)
    with _CpuClock(os.getpid()) as cpu:
        out = subprocess.run(
            [sys.executable, "-c", _DIRECT, mock.base_url, str(workspace)],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip
    return _timed(out, steps, cpu)


def _runtime_steps(d: Daemon, mock: MockUpstream, steps: int, door: str) -> tuple[float, float]:
    """Seconds per step of the runtime as a task of `d`, reaching tools through `door`, and
    CPU seconds per step of the task, the daemon and this process (the mock)."""
    mock.script = _script(steps, warm=True)
    with _CpuClock(d.pid, os.getpid()) as cpu:
        task = d.submit(
            [sys.executable, "-c", _IN_TASK, door], memory="512M", cpus=1, user="0",
            ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")}, agent={"kind": "python"},
        )  # fmt: skip
        done = d.wait(task["id"], timeout=120, poll=0.5)  # timed inside: polls only load the node
    out = d.log(task["id"])
    if done["state"] != "succeeded":
        raise RuntimeError(f"runtime task {done['state']} ({done['reason']}): {out[-2000:]}")
    return _timed(out, steps, cpu)


def _langgraph_agent(
    d: Daemon, mock: MockUpstream, runs: int, *, node: bool
) -> tuple[float, float]:
    """Seconds per agent step of a LangGraph agent (`_LANGGRAPH_AGENT`) as a task of `d` when
    `node` (kind `langgraph`: its model calls through the node's proxy, its checkpoints over
    the memory socket), else as a process beside it; and CPU seconds per step of the agent,
    this process (the mock) and with `node` the daemon."""
    mock.script = deque(LANGGRAPH_TURNS * (runs + 3))
    argv = [sys.executable, "-c", _LANGGRAPH_AGENT, str(REPO / "bench"), str(runs)]
    env = {"PYTHONPATH": str(REPO / "python")}
    with _CpuClock(*((d.pid,) if node else ()), os.getpid()) as cpu:
        if node:
            task = d.submit([*argv, "node"], memory="512M", cpus=1, user="0", ro=[str(REPO)],
                            env=env, agent={"kind": "langgraph"})  # fmt: skip
            done = d.wait(task["id"], timeout=300, poll=0.5)
            out = d.log(task["id"])
            if done["state"] != "succeeded":
                raise RuntimeError(
                    f"LangGraph task {done['state']} ({done['reason']}): {out[-2000:]}"
                )
        else:
            out = subprocess.run(
                [*argv, "memory"], capture_output=True, text=True, check=True, timeout=300,
                env={**env, "PATH": os.environ.get("PATH", ""), "OPENAI_API_KEY": "k",
                     "OPENAI_BASE_URL": mock.base_url},
            ).stdout  # fmt: skip
    return _timed(out, 3 * runs, cpu)  # a run's steps: model, tool, model


def _node_cpu_s(d: Daemon, forkserver: int | None) -> float:
    """CPU seconds the node has used for its tasks: its daemon's threads and the children it
    reaped (`ip`; task inits too, ~1 ms each, also in their cgroups), its fork server's own
    (not its reaped children: those are task processes), and its tasks' cgroups (the node's
    cgroup2 subtree keeps what its removed task cgroups used)."""
    with open(f"/proc/{d.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    daemon = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    unified = next(p for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
                   if (p / "cgroup.controllers").exists())  # fmt: skip
    stat = (unified / "agentnode" / f"k{node_id(d.data)}" / "cpu.stat").read_text()
    tasks = int(dict(line.split() for line in stat.splitlines())["usage_usec"]) / 1e6
    return daemon + (0.0 if forkserver is None else _cpu_s(forkserver)) + tasks


def _forkserver(d: Daemon) -> int | None:
    """The node's fork server's pid (None: not started)."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == d.pid and b"agents.forkserver" in (p / "cmdline").read_bytes():
                    return int(p.name)
            except OSError:
                continue
    return None


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
        every 5 s (an end before the stream was open is in no event). Not more often: each
        ask of a running task is ~1 ms of the node's work (its live accounting), which at
        0.5 s was ~2 ms a task in the agents/s rounds (measured, cProfile)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                self._changed.wait_for(lambda: all(i in self.ended for i in ids), timeout=5)
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


def _agents_per_s(
    d: Daemon, ends: _Ends, mock: MockUpstream, n: int, door: str
) -> tuple[float, float]:
    """Reference-runtime tasks (tools through `door`) started and ended per second, n
    submitted at once; and CPU seconds per agent (`_node_cpu_s` and this process)."""
    mock.script = deque(Turn(text="done") for _ in range(n))
    forkserver = _forkserver(d)
    c0, t0 = _node_cpu_s(d, forkserver) + time.process_time(), time.perf_counter()
    ids = [d.submit(
        [sys.executable, "-m", "agentnode.runtime", "say done", "--model", "m", "--tools-via",
         door], memory=_MEMORY, cpus=None, user="0", ro=[str(REPO)],
        env={"PYTHONPATH": str(REPO / "python")}, agent={"kind": "python"},
    )["id"] for _ in range(n)]  # fmt: skip
    ends.wait(d, ids, timeout=600)
    elapsed = time.perf_counter() - t0
    cpu = _node_cpu_s(d, forkserver) + time.process_time() - c0
    for task_id in ids:
        if ends.ended[task_id] != "succeeded":
            raise RuntimeError(f"agent task {ends.ended[task_id]}: {d.log(task_id)[-2000:]}")
    return n / elapsed, cpu / n


def _at_once(d: Daemon) -> int:
    """How many of the agent tasks `_agents_per_s` submits the node runs at once."""
    node = d.client.call("GET", "/v1/node")
    probe = d.submit(["true"], memory=_MEMORY, cpus=None, agent={"kind": "python"})
    d.wait(probe["id"], timeout=60)
    memory = int(_MEMORY[:-1]) << 20
    return min(int(node["allocatable_cpu_millis"]) // round(float(probe["cpu_request"]) * 1000),
               int(node["allocatable_memory_bytes"]) // memory)  # fmt: skip


def _bare_agents_per_s(mock: MockUpstream, n: int, at_once: int) -> tuple[float, float]:
    """One-call agents without the node ended per second, `at_once` at a time; and CPU
    seconds per agent (theirs and this process's)."""
    mock.script = deque(Turn(text="done") for _ in range(n))
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, t0 = own.ru_utime + own.ru_stime + time.process_time(), time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for _ in range(n):
        if len(running) == at_once:
            running.pop(0).wait()
        running.append(subprocess.Popen([sys.executable, "-c", _BARE_AGENT, mock.base_url],
                                        stdout=subprocess.DEVNULL))  # fmt: skip
    if any(p.wait() for p in running):
        raise RuntimeError("a bare agent failed")
    elapsed = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    return n / elapsed, (own.ru_utime + own.ru_stime + time.process_time() - c0) / n


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
    times: dict[str, list[tuple[float, float]]] = {
        "mcp": [], "api": [], "direct": [], "langgraph": [], "langgraph_direct": []
    }  # fmt: skip
    rates: dict[str, list[tuple[float, float]]] = {"mcp": [], "api": [], "bare": []}
    try:
        with daemon(root / "node", config) as d:
            for r in range(4 if bench.quick else 8) if bench.runs("runtime_step") else ():
                rounds: list[tuple[str, Callable[[], tuple[float, float]]]] = [
                    ("mcp", lambda: _runtime_steps(d, mock, steps, "mcp")),
                    ("api", lambda: _runtime_steps(d, mock, steps, "api")),
                    ("direct", lambda: _direct(mock, steps, root)),
                ]
                for name, measure in rounds if r % 2 else reversed(rounds):
                    elapsed = measure()
                    if r:  # the first round warms all three
                        times[name].append(elapsed)
            runs = 10 if bench.quick else 30
            for r in range(4 if bench.quick else 6) if bench.runs("langgraph_task") else ():
                pair: list[tuple[str, Callable[[], tuple[float, float]]]] = [
                    ("langgraph", lambda: _langgraph_agent(d, mock, runs, node=True)),
                    ("langgraph_direct", lambda: _langgraph_agent(d, mock, runs, node=False)),
                ]
                for name, measure in pair if r % 2 else reversed(pair):
                    times[name].append(measure())  # each warmed by its own first runs
            if bench.runs("agents_per_s"):
                n = 8 if bench.quick else 24
                ends = _Ends(d)
                at_once = _at_once(d)
                # Warms the node's fork server (the step rounds may not have run).
                _agents_per_s(d, ends, mock, 4, "mcp")
                for _ in range(2 if bench.quick else 3):
                    rates["mcp"].append(_agents_per_s(d, ends, mock, n, "mcp"))
                    rates["api"].append(_agents_per_s(d, ends, mock, n, "api"))
                    rates["bare"].append(_bare_agents_per_s(mock, n, at_once))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peer = "openai SDK to the mock + os.listdir, no node"
    for i, unit in ((0, "ms/step"), (1, "ms CPU/step")) if times["direct"] else ():
        direct = statistics.median(t[i] for t in times["direct"]) * 1000
        for name, door in (("runtime_step", "mcp"), ("runtime_step_api", "api")):
            ours = statistics.median(t[i] for t in times[door]) * 1000
            bench.record(name + ("_cpu" if i else ""), ours, direct, unit, peer_name=peer)
    for i, unit in ((0, "ms/step"), (1, "ms CPU/step")) if times["langgraph"] else ():
        direct = statistics.median(t[i] for t in times["langgraph_direct"]) * 1000
        ours = statistics.median(t[i] for t in times["langgraph"]) * 1000
        bench.record("langgraph_task" + ("_cpu" if i else ""), ours, direct, unit,
                     peer_name="LangGraph to the mock, InMemorySaver, no node")  # fmt: skip
    if not rates["bare"]:
        return
    bare = f"python -c: openai SDK, one call to the mock, {at_once} at a time"
    for name, door in (("agents_per_s", "mcp"), ("agents_per_s_api", "api")):
        bench.record(name, statistics.median(r[0] for r in rates[door]),
                     statistics.median(r[0] for r in rates["bare"]), "agents/s",
                     peer_name=bare, higher_is_better=True)  # fmt: skip
        bench.record(name.replace("per_s", "cpu"),
                     statistics.median(r[1] for r in rates[door]) * 1000,
                     statistics.median(r[1] for r in rates["bare"]) * 1000, "ms CPU/agent",
                     peer_name=bare)  # fmt: skip


def _server_cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has used, all its threads, to the ns (schedstat; /proc/PID/stat
    counts 10 ms ticks, coarser than a run)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError):
            total += int(stat.read_text().split()[0])
    return total / 1e9


@contextlib.contextmanager
def _memory_server(tmp: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`agentnode memory serve` in its own process on a scratch data dir, as a task finds the
    node's memory in the daemon: yields it, its HTTP URL and its memory socket."""
    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps({"bench": {"token": TOKEN}}))
    tenants.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentnode", "memory", "serve", "--data-dir", str(tmp / "memory"),
         "--tenants", str(tenants), "--listen", "127.0.0.1:0", "--socket", str(tmp / "m.sock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        proc.stdout.readline()  # the socket's line: it listens
        yield proc, url, tmp / "m.sock"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _langgraph(bench: Bench, mock: MockUpstream, tmp: Path) -> None:
    """A LangGraph agent's step with AgentnodeCheckpointer over the memory socket and over
    HTTP (a memory server in another process) against InMemorySaver."""
    llm = ChatOpenAI(model="m", base_url=mock.base_url, api_key=SecretStr("k"), max_retries=0)
    llm_tools = llm.bind_tools([add])

    def run(saver: BaseCheckpointSaver[Any], server: int | None) -> tuple[float, float]:
        mock.script = deque(LANGGRAPH_TURNS)
        config: RunnableConfig = {"configurable": {"thread_id": f"t{next(_THREADS)}"}}
        served = _server_cpu_s(server) if server is not None else 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        graph(llm_tools, saver).invoke(langgraph_input(), config, durability="sync")
        # Per agent step (model, tool, model); LangGraph counts a fourth super-step, the
        # input's, and makes five checkpoints.
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if server is not None:
            cpu += _server_cpu_s(server) - served
        return elapsed / 3, cpu / 3

    with (
        _memory_server(tmp) as (server, url, sock),
        Memory(url, TOKEN, socket=str(sock)) as over_socket,
        Memory(url, TOKEN) as over_http,
    ):
        savers: dict[str, tuple[BaseCheckpointSaver[Any], int | None]] = {
            "socket": (AgentnodeCheckpointer(over_socket, task="bench"), server.pid),
            "http": (AgentnodeCheckpointer(over_http, task="bench"), server.pid),
            "peer": (InMemorySaver(), None),
        }
        for _ in range(3):  # warm all: connections, imports, JIT-less caches
            for saver, pid in savers.values():
                run(saver, pid)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in savers}
        for r in range(10 if bench.quick else 40):
            order = list(savers.items())
            for name, (saver, pid) in order if r % 2 == 0 else reversed(order):
                times[name].append(run(saver, pid))
    for i, suffix, unit in ((0, "", "ms/step"), (1, "_cpu", "ms CPU/step")):
        peer = statistics.median(t[i] for t in times["peer"]) * 1000
        for name, door in (("langgraph_step", "socket"), ("langgraph_step_http", "http")):
            bench.record(name + suffix, statistics.median(t[i] for t in times[door]) * 1000,
                         peer, unit, peer_name="LangGraph InMemorySaver")  # fmt: skip


def main() -> None:
    bench = Bench.from_args(
        "agents", parts=("langgraph", "langgraph_task", "runtime_step", "agents_per_s")
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    mock = asyncio.run_coroutine_threadsafe(MockUpstream("openai").start(), loop).result(30)
    with tempfile.TemporaryDirectory() as tmp:
        if bench.runs("langgraph"):
            _langgraph(bench, mock, Path(tmp))
        if os.geteuid() == 0 and any(
            bench.runs(part) for part in ("langgraph_task", "runtime_step", "agents_per_s")
        ):
            on_a_node(bench, mock)
    asyncio.run_coroutine_threadsafe(mock.close(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    bench.save()


if __name__ == "__main__":
    main()
