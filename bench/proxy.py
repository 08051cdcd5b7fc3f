"""Inference proxy overhead: direct to a mock upstream vs through agentnode vs through LiteLLM.

One deterministic OpenAI-format mock on loopback (its own process); the agentnode proxy and the
LiteLLM proxy (`litellm[proxy]`) each in their own process, started before any timing. Rounds
interleave the three targets. Figures: added latency p50/p99 at concurrency 1, 16, 64 (ours =
agentnode minus direct, peer = LiteLLM minus direct), throughput at 64, streaming (64 chunks
20 ms apart) added time to first token and per-chunk gap, idle RSS and RSS growth under mixed
traffic with client disconnects, and CPU time per request of each proxy process at 64.

Prompt caching, in this process against a mock that bills by Anthropic's documented prompt
caching: the input cost of a 20-step agent conversation (4,000-token system prompt, tools, a
tool result a step) through agentnode with automatic breakpoints vs with them off, and LiteLLM
(the library, same mock) with `cache_control_injection_points` on the system message vs
without; the time the injection takes on a 4,000-token request; `usage()` over many ledger
rows (kept sums) vs scanning the rows as before.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from _harness import Bench, percentile
from agentnode.inference.call import patched
from agentnode.inference.config import parse_config
from agentnode.inference.mock import MockUpstream, PromptCache
from agentnode.inference.prompt_cache import anthropic_marks
from agentnode.inference.server import create_app
from agentnode.inference.store import LedgerRow, Store

MODEL = "gpt-4o-mini"
MASTER_KEY = "sk-agentnode-bench-master-key-0123456789"
MOCK = """
import asyncio, sys
from agentnode.inference.mock import MockUpstream
async def main():
    m = await MockUpstream("openai", chunks=64, chunk_delay=0.02).start()
    print(m.port, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def wait_up(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    def __init__(self, name: str, base: str, headers: dict[str, str], pid: int) -> None:
        self.name = name
        self.url = base + "/chat/completions"
        self.headers = headers
        self.pid = pid  # the server process behind `url`


async def one(session: aiohttp.ClientSession, t: Target) -> float:
    t0 = time.perf_counter()
    async with session.post(t.url, json=CHAT, headers=t.headers) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{t.name}: HTTP {r.status}: {await r.text()}")
    return time.perf_counter() - t0


async def burst(
    session: aiohttp.ClientSession, t: Target, concurrency: int, n: int
) -> tuple[list[float], float]:
    """n requests, `concurrency` at a time; returns latencies and requests per second."""
    lat: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            lat.append(await one(session, t))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, n / (time.perf_counter() - t0)


async def stream(session: aiohttp.ClientSession, t: Target) -> tuple[float, list[float]]:
    """Time to first chunk and the gaps between chunks."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    body = CHAT | {"stream": True}
    async with session.post(t.url, json=body, headers=t.headers) as r:
        buf = b""
        async for data in r.content.iter_any():
            buf += data
            while (i := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:i], buf[i + 2 :]
                if b'"delta"' in event:
                    arrivals.append(time.perf_counter())
    if len(arrivals) < 64:
        raise RuntimeError(f"{t.name}: stream had {len(arrivals)} chunks")
    return arrivals[0] - t0, [b - a for a, b in itertools.pairwise(arrivals)]


async def first_delta(session: aiohttp.ClientSession, t: Target) -> float:
    """Time to the first chunk of a stream that the client then abandons."""
    t0 = time.perf_counter()
    async with session.post(t.url, json=CHAT | {"stream": True}, headers=t.headers) as r:
        buf = b""
        async for data in r.content.iter_any():
            buf += data
            if b'"delta"' in buf:
                return time.perf_counter() - t0
    raise RuntimeError(f"{t.name}: the stream ended before its first chunk")


async def lone_added_ttft(
    session: aiohttp.ClientSession, direct: Target, proxy: Target, n: int
) -> float:
    """Median time to first chunk through `proxy` minus straight to the upstream, in ms."""
    seen: dict[str, list[float]] = {direct.name: [], proxy.name: []}
    for i in range(n):
        for t in (direct, proxy) if i % 2 == 0 else (proxy, direct):
            seen[t.name].append(await first_delta(session, t))
    return (percentile(seen[proxy.name], 50) - percentile(seen[direct.name], 50)) * 1000


async def mixed(session: aiohttp.ClientSession, t: Target, n: int) -> int:
    """Non-streamed calls and streams the client abandons after the first chunk, 16 at a time.

    Returns how many requests failed at the connection level (reported, not hidden).
    """
    left, failed = n, 0

    async def worker() -> None:
        nonlocal left, failed
        while left > 0:
            left -= 1
            try:
                if left % 10 == 0:
                    async with session.post(t.url, json=CHAT | {"stream": True}) as r:
                        await r.content.readany()
                        r.close()
                else:
                    await one(session, t)
            except aiohttp.ClientError:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(16)))
    return failed


async def run(bench: Bench) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="agentnode-bench-proxy-"))
    procs: list[subprocess.Popen[bytes]] = []
    env = os.environ | {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_MASTER_KEY": MASTER_KEY,
    }
    try:
        mock = subprocess.Popen([sys.executable, "-c", MOCK], stdout=subprocess.PIPE)
        procs.append(mock)
        assert mock.stdout is not None
        upstream = f"http://127.0.0.1:{int(mock.stdout.readline())}/v1"
        ours_port, lite_port = free_port(), free_port()
        (tmp / "agentnode.toml").write_text(
            f'[inference.deployments.mock]\nkind = "openai"\nbase_url = "{upstream}"\n'
            f'models = ["{MODEL}"]\nprice = {{ input = 0.15, output = 0.6 }}\n'
        )
        (tmp / "litellm.yaml").write_text(
            f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n"
            f"      model: openai/{MODEL}\n      api_base: {upstream}\n      api_key: sk-mock\n"
        )
        ours = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentnode",
                "proxy",
                "--config",
                str(tmp / "agentnode.toml"),
                "--listen",
                f"127.0.0.1:{ours_port}",
                "--state-dir",
                str(tmp / "state"),
            ],
            stdout=subprocess.DEVNULL,
        )
        procs.append(ours)
        litellm = Path(sys.executable).parent / "litellm"
        lite = subprocess.Popen(
            [
                str(litellm),
                "--config",
                str(tmp / "litellm.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(lite_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        procs.append(lite)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_up(session, f"http://127.0.0.1:{ours_port}/v1/models", ours)
            await wait_up(session, f"http://127.0.0.1:{lite_port}/health/liveliness", lite)
            targets = [
                Target("direct", upstream, {}, mock.pid),
                Target("agentnode", f"http://127.0.0.1:{ours_port}/v1", {}, ours.pid),
                Target(
                    "litellm",
                    f"http://127.0.0.1:{lite_port}/v1",
                    {"Authorization": f"Bearer {MASTER_KEY}"},
                    lite.pid,
                ),
            ]
            idle = {"agentnode": rss_mib(ours.pid), "litellm": rss_mib(lite.pid)}
            for t in targets:  # warm up connections, imports and caches
                await burst(session, t, 4, 40)
            await measure(bench, session, targets)
            await streaming(bench, session, targets)
            bench.record(
                "idle_rss", idle["agentnode"], idle["litellm"], "MiB", peer_name="LiteLLM proxy"
            )
            n = 2_000 if bench.quick else 100_000
            before = rss_mib(ours.pid)
            lite_before = rss_mib(lite.pid)
            ours_failed = await mixed(session, targets[1], n)
            lite_n = 100 if bench.quick else 5_000  # LiteLLM manages ~150 req/s here
            lite_failed = await mixed(session, targets[2], lite_n)
            print(
                f"proxy.mixed_connection_errors: agentnode {ours_failed} of {n}, "
                f"LiteLLM {lite_failed} of {lite_n}",
                flush=True,
            )
            bench.record(
                f"rss_growth_{n}_mixed",
                rss_mib(ours.pid) - before,
                rss_mib(lite.pid) - lite_before,
                "MiB",
                peer_name=f"LiteLLM proxy after {lite_n}",
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


async def measure(bench: Bench, session: aiohttp.ClientSession, targets: list[Target]) -> None:
    rounds = 2 if bench.quick else 6
    plan = {1: 50, 16: 160, 64: 192} if bench.quick else {1: 300, 16: 1600, 64: 3200}
    for c, n in plan.items():
        lat: dict[str, list[float]] = {t.name: [] for t in targets}
        rps: dict[str, list[float]] = {t.name: [] for t in targets}
        # CPU the proxy process spends per request: unlike rates, it hardly depends on what
        # else the machine is running at the time.
        cpu = {t.name: 0.0 for t in targets}
        for r in range(rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for t in order:
                # LiteLLM is ~50x slower here: fewer of its requests keep --quick under 40 s.
                k = max(c, n // 4) if bench.quick and t.name == "litellm" else n
                before = cpu_seconds(t.pid)
                got, rate = await burst(session, t, c, k)
                cpu[t.name] += cpu_seconds(t.pid) - before
                lat[t.name] += got
                rps[t.name].append(rate)
        for q in (50, 99):
            direct = percentile(lat["direct"], q)
            bench.record(
                f"added_p{q}_c{c}",
                (percentile(lat["agentnode"], q) - direct) * 1000,
                (percentile(lat["litellm"], q) - direct) * 1000,
                "ms",
                peer_name="LiteLLM proxy",
            )
        if c == 64:
            best = {k: max(v) for k, v in rps.items()}
            bench.record(
                "throughput_c64_vs_direct",
                best["agentnode"],
                best["direct"],
                "req/s",
                peer_name="direct to the upstream",
                higher_is_better=True,
            )
            bench.record(
                "cpu_per_request_c64",
                cpu["agentnode"] / len(lat["agentnode"]) * 1e6,
                cpu["litellm"] / len(lat["litellm"]) * 1e6,
                "us",
                peer_name="LiteLLM proxy",
            )
            print(
                f"proxy.cpu_per_request_c64: the mock upstream itself "
                f"{cpu['direct'] / len(lat['direct']) * 1e6:.0f} us",
                flush=True,
            )
            bench.record(
                "throughput_c64",
                best["agentnode"],
                best["litellm"],
                "req/s",
                peer_name="LiteLLM proxy",
                higher_is_better=True,
            )


async def streaming(bench: Bench, session: aiohttp.ClientSession, targets: list[Target]) -> None:
    # One stream at a time, abandoned after its first chunk: what the proxy adds to a first
    # token, without the queueing of several requests for 2 shared cores that the concurrent
    # figure below includes. Each proxy is paired with direct calls of its own, in alternating
    # order, so LiteLLM's work after a response does not land on our baseline.
    direct, ours, lite = targets
    n = 16 if bench.quick else 64
    bench.record(
        "stream_added_ttft_p50_c1",
        await lone_added_ttft(session, direct, ours, n),
        await lone_added_ttft(session, direct, lite, n),
        "ms",
        peer_name="LiteLLM proxy",
    )
    rounds = 1 if bench.quick else 4  # each stream lasts 64 x 20 ms
    per = 4 if bench.quick else 16
    ttft: dict[str, list[float]] = {t.name: [] for t in targets}
    gaps: dict[str, list[float]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for t in targets if r % 2 == 0 else list(reversed(targets)):
            for first, g in await asyncio.gather(*(stream(session, t) for _ in range(per))):
                ttft[t.name].append(first)
                gaps[t.name] += g
    d_ttft, d_gap = percentile(ttft["direct"], 50), percentile(gaps["direct"], 99)
    bench.record(
        f"stream_added_ttft_p50_c{per}",
        (percentile(ttft["agentnode"], 50) - d_ttft) * 1000,
        (percentile(ttft["litellm"], 50) - d_ttft) * 1000,
        "ms",
        peer_name="LiteLLM proxy",
    )
    bench.record(
        "stream_added_chunk_gap_p99",
        (percentile(gaps["agentnode"], 99) - d_gap) * 1000,
        (percentile(gaps["litellm"], 99) - d_gap) * 1000,
        "ms",
        peer_name="LiteLLM proxy",
    )


# ---- prompt caching ------------------------------------------------------------------------

SYSTEM = " ".join(f"Rule {i}: act carefully and check every result twice." for i in range(300))
TOOLS = [
    {
        "name": f"tool_{i}",
        "description": f"Tool number {i}, which does one thing well.",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
    for i in range(8)
]
STEPS = 20
# Claude Sonnet's list prices, USD per 1M tokens: input, cache read, cache write (5 min).
PRICE = {"input": 3.0, "cached_input": 0.3, "cache_write": 3.75, "output": 15.0}


def input_cost(usages: list[dict[str, int]]) -> float:
    """USD of the input side of Anthropic usages at PRICE."""
    return (
        sum(
            u["input_tokens"] * PRICE["input"]
            + u["cache_read_input_tokens"] * PRICE["cached_input"]
            + u["cache_creation_input_tokens"] * PRICE["cache_write"]
            for u in usages
        )
        / 1e6
    )


def anthropic_step(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step i's assistant tool call and the user's tool result, in Anthropic's format."""
    call = {"type": "tool_use", "id": f"toolu_{i}", "name": "tool_1", "input": {"path": "a"}}
    result = {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"line {i} " * 40}
    return (
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, call]},
        {"role": "user", "content": [result]},
    )


def conversation(step: int) -> dict[str, Any]:
    """The /v1/messages body an agent sends at `step` (0-based)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Fix the failing test."}]
    for i in range(step):
        messages += anthropic_step(i)
    return {
        "model": "claude-x",
        "max_tokens": 256,
        "system": SYSTEM,
        "tools": TOOLS,
        "messages": messages,
    }


async def ours_conversation(prompt_cache: str) -> float:
    """Input USD of the conversation through agentnode, breakpoints per `prompt_cache`."""
    mock = await MockUpstream("anthropic", prompt_cache=PromptCache()).start()
    tmp = Path(tempfile.mkdtemp(prefix="agentnode-bench-cache-"))
    config = parse_config(
        {
            "state_dir": str(tmp),
            "deployments": {
                "c": {
                    "kind": "anthropic",
                    "base_url": mock.base_url,
                    "models": ["claude-x"],
                    "price": PRICE,
                    "prompt_cache": prompt_cache,
                }
            },
        },
        prefix="",
    )
    runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    headers = {"anthropic-version": "2023-06-01", "x-agentnode-task": "bench"}
    try:
        async with aiohttp.ClientSession() as session:
            for step in range(STEPS):
                url = f"http://127.0.0.1:{port}/v1/messages"
                async with session.post(url, json=conversation(step), headers=headers) as r:
                    if r.status != 200:
                        raise RuntimeError(f"agentnode: HTTP {r.status}: {await r.text()}")
        return input_cost([r["usage"] for r in mock.requests])
    finally:
        await runner.cleanup()
        await mock.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


async def litellm_conversation(inject: bool) -> float:
    """Input USD of the same conversation through LiteLLM (the library, OpenAI format in),
    with `cache_control_injection_points` on the system message if `inject`."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    import litellm

    litellm.suppress_debug_info = True
    mock = await MockUpstream("anthropic", prompt_cache=PromptCache()).start()
    tools = [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["input_schema"],
            },
        }
        for t in TOOLS
    ]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Fix the failing test."},
    ]
    extra = (
        {"cache_control_injection_points": [{"location": "message", "role": "system"}]}
        if inject
        else {}
    )
    try:
        for i in range(STEPS):
            await litellm.acompletion(
                model="anthropic/claude-x",
                api_base=mock.base_url,
                api_key="sk-mock",
                messages=messages,
                tools=tools,
                max_tokens=256,
                **extra,
            )
            call = {
                "id": f"toolu_{i}",
                "type": "function",
                "function": {"name": "tool_1", "arguments": '{"path": "a"}'},
            }
            messages += [
                {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"toolu_{i}", "content": f"line {i} " * 40},
            ]
        return input_cost([r["usage"] for r in mock.requests])
    finally:
        await mock.close()


async def caching(bench: Bench) -> None:
    auto, off = await ours_conversation("always"), await ours_conversation("off")
    bench.record(
        f"conversation_{STEPS}_steps_input_cost_auto_vs_off",
        auto,
        off,
        "USD",
        peer_name="agentnode without prompt caching",
    )
    try:
        lite, lite_off = await litellm_conversation(True), await litellm_conversation(False)
    except Exception as e:
        print(f"proxy.conversation_vs_litellm: LiteLLM failed: {e}", flush=True)
    else:
        bench.record(
            f"conversation_{STEPS}_steps_input_cost_vs_litellm",
            auto,
            lite,
            "USD",
            peer_name=f"LiteLLM injection points on the system message (without: {lite_off:.4f})",
        )
    # The injection alone: breakpoints placed and the body re-serialised, vs parsing it, on the
    # first step's request (~4,000-token system prompt and tools) and the last one's (19 tool
    # calls and results more).
    n = 300 if bench.quick else 3000
    for step in (0, STEPS - 1):
        raw = json.dumps(conversation(step)).encode()
        inject, parse = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            payload = json.loads(raw)
            t1 = time.perf_counter()
            changes = anthropic_marks(payload, min_tokens=1024, ttl="5m") or {}
            patched(raw, payload, changes)
            t2 = time.perf_counter()
            parse.append(t1 - t0)
            inject.append(t2 - t1)
        bench.record(
            f"injection_p50_{len(raw) // 4}_tokens",
            percentile(inject, 50) * 1000,
            percentile(parse, 50) * 1000,
            "ms",
            peer_name="json.loads of the same body (what every request already costs)",
        )


async def usage_query(bench: Bench) -> None:
    """`usage(tenant, model, day)` over many rows from the kept sums vs scanning them."""
    rows = 100_000 if bench.quick else 1_000_000
    tmp = Path(tempfile.mkdtemp(prefix="agentnode-bench-usage-"))
    group_by = ("tenant", "model", "day")
    try:
        store = await Store.open(tmp)
        now = time.time()
        for i in range(rows):
            store.record(
                LedgerRow(
                    time=now - (i % 30) * 86400,
                    tenant=f"t{i % 20}",
                    task=f"task-{i % 5000}",
                    model=f"m{i % 4}",
                    deployment="d",
                    endpoint="chat",
                    status=200,
                    input=100,
                    cached_input=900,
                    cache_write=0,
                    output=50,
                    reasoning=0,
                    cost="0.0012",
                    latency_ms=1.0,
                    cache_hit=False,
                    stream=False,
                    saving="0.0024",
                )
            )
            if i % 10_000 == 9_999:
                await store.flush()
        await store.flush()
        sums = []
        for _ in range(50):
            t0 = time.perf_counter()
            await store.usage(group_by)
            sums.append(time.perf_counter() - t0)
        scans = []
        for _ in range(1 if rows >= 1_000_000 else 3):
            t0 = time.perf_counter()
            groups: dict[tuple[str, ...], int] = {}
            for r in await store.rows():  # the scan /v1/usage did before the sums
                day = time.strftime("%Y-%m-%d", time.gmtime(r.time))
                k = (r.tenant, r.model, day)
                groups[k] = groups.get(k, 0) + r.input
            scans.append(time.perf_counter() - t0)
        await store.close()
        bench.record(
            f"usage_query_p50_{rows}_rows",
            percentile(sums, 50) * 1000,
            percentile(scans, 50) * 1000,
            "ms",
            peer_name="scanning the ledger rows",
        )
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def main() -> None:
    bench = Bench.from_args("proxy")
    uvloop.run(caching(bench))
    uvloop.run(usage_query(bench))
    uvloop.run(run(bench))
    bench.save()


if __name__ == "__main__":
    main()
