"""Layer 5 tools in process: input checks, classes, retries and idempotency keys, audit
records, run_code (fresh sandboxes and sessions), workspace file tools, http_fetch through the
caller's own egress policy, and web_search against a mock SearXNG API on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from agentnode.egress import service as egress_service
from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.isolation import task as isolation
from agentnode.isolation.task import SAFE_PATH
from agentnode.tools import code
from agentnode.tools.code import CodeRunner
from agentnode.tools.files import file_tools
from agentnode.tools.registry import Caller, Registry, RetryPolicy, Tool, ToolLimits
from agentnode.tools.result import Outcome
from agentnode.tools.sandboxed import owned_workspace
from agentnode.tools.service import RUNNING_PER_CALLER, ToolService
from agentnode.tools.web import WebTools
from support.counting_listener import counting_listener
from support.egress_world import HOST4, World
from test_node import swept_cgroups

#: The `world` fixture (a netns pair with a test HTTP server and a node bridge).
pytest_plugins = ["support.tools_world"]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)"),
    pytest.mark.usefixtures("data_dir"),
]


def service(*tools: Tool, records: list[dict[str, Any]] | None = None) -> ToolService:
    return ToolService(Registry(tools), on_record=(records if records is not None else []).append)


def call(svc: ToolService, name: str, args: Any, caller: Caller, **kw: Any) -> dict[str, Any]:
    return asyncio.run(svc.call(name, args, caller, **kw))


def meta(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = result["_meta"]["agentnode"]
    return out


A = Caller(task="t1", tenant="a")

# -- the service ----------------------------------------------------------------------------------


async def _echo(args: dict[str, Any], caller: Caller) -> Outcome:
    return Outcome.text(repr(args))


ECHO = Tool(
    name="echo",
    description="echo",
    input_schema={
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0},
            "items": {"type": "array", "items": {"type": "string"}},
            "auth": {"type": "object", "properties": {"token": {"type": "string", "secret": True}}},
        },
        "required": ["n"],
        "additionalProperties": False,
    },
    run=_echo,
)


@pytest.mark.parametrize(
    ("args", "path"),
    [
        ({"n": "1"}, "/n"),
        ({}, "(root)"),
        ({"n": 1, "other": 2}, "(root)"),
        ({"n": -1}, "/n"),
        ({"n": 1, "items": ["a", 3]}, "/items/1"),
        ([1, 2], "(root)"),
        (None, "(root)"),
    ],
)
def test_bad_input_is_invalid_input_with_its_schema_path(args: Any, path: str) -> None:
    records: list[dict[str, Any]] = []
    result = call(service(ECHO, records=records), "echo", args, A)
    assert result["isError"] and meta(result)["class"] == "invalid_input"
    assert meta(result)["path"] == path
    assert result["content"][0]["text"].startswith(f"input {path}:")
    assert [r["class"] for r in records] == ["invalid_input"]


#: Schemas and inputs on which the fast validator and the Python one must agree.
AGREE: list[tuple[Mapping[str, Any], list[Any]]] = [
    (ECHO.input_schema, [{"n": 0}, {"n": 1.0}, {"n": True}, {"n": 1, "items": []},
                         {"n": 1, "auth": {"token": 3}}, {"n": 2**70}, {}]),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z]+$",
                                             "minLength": 2, "maxLength": 4}}},
     [{"s": "ab"}, {"s": "a"}, {"s": "abcde"}, {"s": "aB"}, {"s": "é"}, {"s": "ab\n"}]),
    ({"type": "object", "properties": {"e": {"enum": ["x", 1, None]}, "c": {"const": [1]}}},
     [{"e": "x"}, {"e": None}, {"e": "y"}, {"c": [1]}, {"c": [1.0]}, {"c": 1}]),
    ({"type": "object", "$defs": {"pos": {"type": "number", "exclusiveMinimum": 0}},
      "properties": {"p": {"$ref": "#/$defs/pos"}, "q": {"type": "array",
                                                        "items": {"$ref": "#/$defs/pos"},
                                                        "uniqueItems": True}}},
     [{"p": 1}, {"p": 0}, {"q": [1, 2]}, {"q": [1, 1]}, {"q": [1, -1]}]),
    ({"type": "object", "properties": {"o": {"oneOf": [{"type": "integer"},
                                                      {"type": "number"}]},
                                       "a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                       "n": {"not": {"type": "boolean"}}}},
     [{"o": 1}, {"o": 1.5}, {"o": "1"}, {"a": None}, {"a": 1}, {"n": False}, {"n": 0}]),
    ({"type": "object", "required": ["k"], "properties": {"k": {"type": "object",
                                                               "minProperties": 1,
                                                               "additionalProperties":
                                                                   {"type": "integer"}}}},
     [{"k": {"x": 1}}, {"k": {}}, {"k": {"x": "1"}}, {"k": []}, {}]),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "inputs"), AGREE)
def test_the_fast_validator_and_the_python_one_agree(
    schema: Mapping[str, Any], inputs: list[Any]
) -> None:
    # Inputs pass on the fast validator's word alone: it must never pass what the Python one
    # (whose words an error gives) refuses. The other way they may differ ("ab\n" fits
    # "^[a-z]+$" in Python's regex dialect, not in ECMA 262's): the Python one then decides,
    # as it did alone before.
    tool = Tool(name="t", description="", input_schema=schema, run=_echo)
    assert tool._fast is not None
    for args in inputs:
        assert (tool.input_error(args) is None) == tool.validator.is_valid(args), args
        assert tool.validator.is_valid(args) or not tool._fast.is_valid(args), args


@pytest.mark.parametrize(
    "refer",
    [
        lambda url: {"type": "object", "properties": {"a": {"$ref": url}}},
        lambda url: {"$ref": url},
        lambda url: {
            "type": "object",
            "$defs": {"d": {"$ref": url}},
            "properties": {"a": {"$ref": "#/$defs/d"}},
        },
        lambda url: {
            "$id": url.rsplit("/", 1)[0] + "/base.json",
            "type": "object",
            "properties": {"a": {"$ref": "other.json"}},
        },
        lambda url: {"type": "object", "properties": {"a": {"items": {"$ref": url + "#/x"}}}},
    ],
    ids=["property", "root", "defs", "relative-to-id", "fragment"],
)
def test_a_schema_ref_by_url_is_never_fetched(refer: Any) -> None:
    # The node is outside every egress policy: a tool's schema (an MCP server's word) naming
    # a URL must not make it connect, nor block its loop on the fetch.
    with counting_listener() as (url, connections):
        tool = Tool(name="r", description="", input_schema=refer(url), run=_echo)
        result = call(service(tool), "r", {"a": [1]}, A)
    assert connections == []
    assert meta(result)["class"] == "invalid_input"
    text = result["content"][0]["text"]
    assert "does not fetch" in text and "\n" not in text


def test_an_unknown_tool_or_one_of_another_tenant_looks_the_same() -> None:
    only_b = Tool(name="b_only", description="", input_schema={"type": "object"}, run=_echo,
                  tenants=frozenset({"b"}))  # fmt: skip
    svc = service(ECHO, only_b)
    for name in ("nope", "b_only", "", "../echo"):
        result = call(svc, name, {}, A)
        assert meta(result)["class"] == "invalid_input"
        assert (
            result["content"][0]["text"]
            == f"no tool named {name!r} (list them with agentnode tool ls)"
        )
    assert [t["name"] for t in asyncio.run(svc.list("a"))] == ["echo"]
    assert [t["name"] for t in asyncio.run(svc.list("b"))] == ["echo", "b_only"]


def test_the_record_hashes_the_arguments_and_redacts_secret_fields() -> None:
    records: list[dict[str, Any]] = []
    svc = service(ECHO, records=records)
    result = call(svc, "echo", {"n": 1, "auth": {"token": "s3cret"}}, A)
    assert meta(result)["class"] == "ok"
    (rec,) = records
    assert rec["kind"] == "tool_call" and rec["tool"] == "echo" and rec["task"] == "t1"
    assert rec["tenant"] == "a" and rec["class"] == "ok" and len(rec["args_sha256"]) == 64
    assert rec["args"] == {"n": 1, "auth": {"token": "[redacted]"}}
    assert "s3cret" not in repr(rec)
    for key in ("time", "duration_ms", "cpu_s", "memory_peak", "bytes_out"):
        assert key in rec


def test_the_record_keeps_large_arguments_shortened_and_hashed_whole() -> None:
    """A task's large calls must not fill the node's disk through its audit log: the record
    keeps each argument shortened, saying how much there was; the hash covers all of it."""
    records: list[dict[str, Any]] = []
    schema = {"type": "object", "properties": ECHO.input_schema["properties"]}
    svc = service(Tool(name="take", description="takes anything", input_schema=schema,
                       run=_echo), records=records)  # fmt: skip
    big = {
        "content": "x" * (3 << 20),
        "many": list(range(100_000)),
        "keys": {f"k{i}": i for i in range(1000)},
        "deep": functools.reduce(lambda inner, _: [inner], range(40), cast(Any, ["bottom"])),
        "auth": {"token": "s" * 5000},
    }
    other = {**big, "content": "x" * (3 << 20) + "y"}
    for args in (big, other):
        assert meta(call(svc, "take", args, A))["class"] == "ok"
    first, second = records
    assert len(json.dumps(first)) < 20_000, len(json.dumps(first))
    args = first["args"]
    assert args["content"] == "x" * 1024 + f"…[{3 << 20} characters]"
    assert args["many"] == [*range(64), "…[100000 items]"]
    assert len(args["keys"]) == 65 and args["keys"]["…"] == "[1000 keys]"
    assert args["auth"] == {"token": "[redacted]"}
    assert "nested deeper than 16" in json.dumps(args["deep"])
    # Shortened alike, hashed apart.
    assert first["args_sha256"] != second["args_sha256"]


class Flaky:
    """Fails with `cls` `fails` times, then succeeds; counts the side effects it had."""

    def __init__(self, fails: int, cls: Any = "transient") -> None:
        self.fails, self.cls, self.runs = fails, cls, 0

    async def run(self, args: dict[str, Any], caller: Caller) -> Outcome:
        self.runs += 1
        await asyncio.sleep(0.01)
        if self.runs <= self.fails:
            return Outcome.error(self.cls, f"failure {self.runs}")
        return Outcome.text(f"done after {self.runs} runs")

    def tool(self, **kw: Any) -> Tool:
        return Tool(name="flaky", description="", input_schema={"type": "object"}, run=self.run,
                    retry=RetryPolicy(attempts=4, base_s=0.001), **kw)  # fmt: skip


def test_a_transient_failure_is_retried_under_a_key_and_the_key_never_runs_twice() -> None:
    flaky = Flaky(2)
    records: list[dict[str, Any]] = []
    svc = service(flaky.tool(), records=records)

    async def calls() -> list[dict[str, Any]]:
        # Two at once and one after: all get the first run's result; it ran once (3 attempts).
        both = await asyncio.gather(
            svc.call("flaky", {}, A, idempotency_key="k"),
            svc.call("flaky", {}, A, idempotency_key="k"),
        )
        return [*both, await svc.call("flaky", {}, A, idempotency_key="k")]

    results = asyncio.run(calls())
    assert flaky.runs == 3
    assert all(r == results[0] for r in results)
    assert meta(results[0])["class"] == "ok" and meta(results[0])["attempts"] == 3
    assert results[0]["content"][0]["text"] == "done after 3 runs"
    assert len(records) == 1  # one call ran; the repeats were answered from it
    # The same key with other arguments is refused, and runs nothing.
    other = call(svc, "flaky", {"x": 1}, A, idempotency_key="k")
    assert meta(other)["class"] == "invalid_input" and flaky.runs == 3
    # Keys are per task: another tenant's "k", and another task's of this tenant, are their
    # own calls (a result made in one task's workspace is not another's), and neither is told
    # that this one used the key; a caller without a task keys per tenant.
    for other_caller in (Caller(task="t9", tenant="b"), Caller(task="t2", tenant="a")):
        runs = flaky.runs
        call(svc, "flaky", {}, other_caller, idempotency_key="k")
        assert flaky.runs == runs + 1
        again = call(svc, "flaky", {"x": 1}, other_caller, idempotency_key="k")
        assert "first used with other arguments" in again["content"][0]["text"]
    runs = flaky.runs
    for _ in range(2):
        call(svc, "flaky", {}, Caller(task="", tenant="a"), idempotency_key="k")
    assert flaky.runs == runs + 1


@pytest.mark.parametrize("key", ["", "x" * 257, "a\0b", 7, ["k"], {"k": 1}, True])
def test_a_bad_idempotency_key_is_refused_at_every_door(key: Any) -> None:
    """An empty, overlong (each key is kept with its result) or non-string key is
    `invalid_input` in one line, and nothing runs; over the HTTP tool API a 400."""
    flaky = Flaky(0)
    records: list[dict[str, Any]] = []
    r = call(service(flaky.tool(), records=records), "flaky", {}, A, idempotency_key=key)
    assert meta(r)["class"] == "invalid_input" and flaky.runs == 0
    assert r["content"][0]["text"].startswith("idempotency key: must be a string of 1 to 256")
    assert [rec["class"] for rec in records] == ["invalid_input"]


@pytest.mark.parametrize("number", [float("inf"), float("-inf"), float("nan")])
def test_arguments_no_audit_record_could_hold_are_refused_and_recorded(number: float) -> None:
    """A number JSON has no form for (a JSON reader may give one for 1e309): refused as
    `invalid_input` before anything runs (run_code's timeout took an infinity, and ran
    unbounded), and recorded, without the arguments."""
    flaky = Flaky(0)
    records: list[dict[str, Any]] = []
    svc = service(flaky.tool(), records=records)
    r = call(svc, "flaky", {"timeout": number}, A)
    assert meta(r)["class"] == "invalid_input" and flaky.runs == 0
    assert "NaN or an infinity" in r["content"][0]["text"]
    assert records[-1]["args"] == "[arguments not recordable as JSON]"
    json.dumps(records[-1], allow_nan=False)


def test_a_record_its_log_refuses_is_written_without_its_arguments() -> None:
    """Arguments the audit log cannot encode (its encoder raises) cost the record its
    arguments, never the record."""
    written: list[dict[str, Any]] = []

    def strict(record: dict[str, Any]) -> None:
        if record["args"] != "[arguments not recordable as JSON]":
            raise ValueError("not encodable")
        written.append(record)

    svc = ToolService(Registry([ECHO]), on_record=strict)
    r = call(svc, "echo", {"n": 1}, A)
    assert meta(r)["class"] == "ok" and [w["tool"] for w in written] == ["echo"]


def test_without_a_key_only_an_idempotent_tool_is_retried() -> None:
    flaky = Flaky(1)
    once = call(service(flaky.tool()), "flaky", {}, A)
    assert meta(once)["class"] == "transient" and meta(once)["retryable"] and flaky.runs == 1
    flaky = Flaky(1)
    again = call(service(flaky.tool(idempotent=True)), "flaky", {}, A)
    assert meta(again)["class"] == "ok" and flaky.runs == 2


@pytest.mark.parametrize("cls", ["permanent", "policy", "resource", "invalid_input"])
def test_a_failure_that_is_not_transient_is_not_retried(cls: str) -> None:
    flaky = Flaky(5, cls)
    result = call(service(flaky.tool(idempotent=True)), "flaky", {}, A, idempotency_key="p")
    assert meta(result)["class"] == cls and not meta(result)["retryable"] and flaky.runs == 1


def test_the_key_store_keeps_results_across_reopening_and_bounds_retention(
    tmp_path: Path,
) -> None:
    from agentnode.tools.keys import KeyStore

    store = KeyStore(tmp_path / "keys", kept=3)
    for i in range(5):
        store.start(("a", "t", f"k{i}"), f"d{i}")
        store.finish(("a", "t", f"k{i}"), f"d{i}", {"n": i})
    store.start(("a", "t", "cut"), "dc")  # never finished: a call cut off mid-run
    store.close()
    store = KeyStore(tmp_path / "keys", kept=3, max_age_s=3600)
    assert [store.get(("a", "t", f"k{i}")) for i in range(3)] == [None, None, None]
    assert store.get(("a", "t", "k4")) == ("d4", {"n": 4})
    assert store.get(("b", "t", "k4")) is None, "a key is its tenant's own"
    assert store.get(("a", "t", "cut")) == ("dc", None)
    store.close()
    store = KeyStore(tmp_path / "keys", max_age_s=0.0)
    assert store.get(("a", "t", "k4")) is None, "expired"
    store.close()
    # Bounded in bytes too: big results push the oldest out (counted again after reopening).
    store = KeyStore(tmp_path / "big", max_bytes=250_000)
    for i in range(4):
        store.start(("a", "t", f"b{i}"), "d")
        store.finish(("a", "t", f"b{i}"), "d", {"text": "x" * 100_000})
    store.close()
    store = KeyStore(tmp_path / "big", max_bytes=250_000)
    store.start(("a", "t", "b4"), "d")
    store.finish(("a", "t", "b4"), "d", {"text": "x" * 100_000})
    held = [store.get(("a", "t", f"b{i}")) is not None for i in range(5)]
    assert held == [False, False, False, True, True]
    store.close()


def test_one_tenants_keys_never_push_out_anothers(tmp_path: Path) -> None:
    """Retention is per tenant: a tenant making keys without end drops its own oldest, never
    another tenant's (whose call would then run twice), by count and by bytes; a task's slot
    counts for its tenant."""
    from agentnode.tools.keys import KeyStore

    store = KeyStore(tmp_path / "keys", kept=5, max_bytes=300_000)
    store.start(("a/t1", "write", "once"), "d")
    store.finish(("a/t1", "write", "once"), "d", {"text": "x" * 100_000})
    store.start(("a", "write", "tenant-wide"), "d")
    store.finish(("a", "write", "tenant-wide"), "d", {"n": 1})
    for i in range(50):
        store.start((f"b/t{i % 3}", "write", f"k{i}"), "d")
        store.finish((f"b/t{i % 3}", "write", f"k{i}"), "d", {"text": "y" * (i % 2) * 100_000})
    assert store.get(("a/t1", "write", "once")) == ("d", {"text": "x" * 100_000})
    assert store.get(("a", "write", "tenant-wide")) == ("d", {"n": 1})
    kept_b = [i for i in range(50) if store.get((f"b/t{i % 3}", "write", f"k{i}"))]
    assert kept_b == [46, 47, 48, 49], kept_b  # 2 of 100 kB and 2 empty: under 300 kB
    store.close()
    store = KeyStore(tmp_path / "keys", kept=5, max_bytes=300_000)
    store.start(("b/t0", "write", "more"), "d")
    assert store.get(("a/t1", "write", "once")) is not None, "counted again after reopening"
    assert [i for i in range(50) if store.get((f"b/t{i % 3}", "write", f"k{i}"))] == [
        46,
        47,
        48,
        49,
    ]
    store.close()


def test_a_key_store_of_before_per_tenant_retention_is_taken_over(tmp_path: Path) -> None:
    import msgpack

    from agentnode.storage.rocks import Batch, Rocks
    from agentnode.tools.keys import KeyStore

    db = Rocks(tmp_path / "keys")
    batch = Batch()
    now = time.time() - 10  # taken before the next key
    for n, (owner, key) in enumerate([("a/t1", "x"), ("b/t2", "y"), ("b/t2", "z")]):
        slot = f"{owner}\0tool\0{key}".encode()
        packed = msgpack.packb(["d", now + n, {"key": key}])
        batch.put(b"k" + slot, packed)
        batch.put(b"a" + int((now + n) * 1e9).to_bytes(8, "big") + slot,
                  len(packed).to_bytes(8, "big"))  # fmt: skip
    db.write(batch)
    db.close()
    store = KeyStore(tmp_path / "keys", kept=1)
    assert store.get(("a/t1", "tool", "x")) == ("d", {"key": "x"})
    # b held two keys past its bound of one: its next key drops its oldest, a's stays.
    store.start(("b/t2", "tool", "w"), "d")
    assert store.get(("b/t2", "tool", "y")) is None and store.get(("b/t2", "tool", "z")) is None
    assert store.get(("a/t1", "tool", "x")) is not None
    store.close()


def test_the_key_store_drops_aged_keys_while_it_runs(tmp_path: Path) -> None:
    """Within its bounds a call opens no scan of the keys' ages; past one (here the age of the
    oldest key) the next call drops what is out, and keeps the rest."""
    from agentnode.tools.keys import KeyStore

    store = KeyStore(tmp_path / "keys", max_age_s=0.3)
    store.start(("a", "t", "old"), "d")
    store.finish(("a", "t", "old"), "d", {"n": 0})
    time.sleep(0.4)
    for i in range(3):
        store.start(("a", "t", f"k{i}"), "d")
        store.finish(("a", "t", f"k{i}"), "d", {"n": i})
    store.close()
    store = KeyStore(tmp_path / "keys", max_age_s=3600)  # what is still stored, by any age
    assert store.get(("a", "t", "old")) is None
    assert [store.get(("a", "t", f"k{i}")) for i in range(3)] == [("d", {"n": i}) for i in range(3)]
    store.close()


def test_a_tool_that_raises_is_permanent_and_the_call_does_not() -> None:
    async def boom(args: dict[str, Any], caller: Caller) -> Outcome:
        raise RuntimeError("kaput")

    tool = Tool(name="boom", description="", input_schema={"type": "object"}, run=boom)
    result = call(service(tool), "boom", {}, A)
    assert meta(result)["class"] == "permanent"
    assert result["content"][0]["text"] == "tool boom failed: kaput"


# -- run_code -------------------------------------------------------------------------------------


def code_service(**limits: Any) -> tuple[CodeRunner, ToolService]:
    runner = CodeRunner(limits=ToolLimits(**{"timeout": 10.0, "memory": 64 << 20, **limits}))
    return runner, service(runner.tool())


def test_run_code_returns_output_and_exit_status() -> None:
    _runner, svc = code_service()
    py = call(
        svc,
        "run_code",
        {"code": "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"},
        A,
    )
    assert py["structuredContent"] == {"stdout": "out\n", "stderr": "err\n", "exit_status": 4}
    assert meta(py)["class"] == "permanent" and py["isError"]
    sh = call(svc, "run_code", {"code": "echo $((6*7)); id -u", "language": "bash"}, A)
    assert sh["structuredContent"] == {"stdout": "42\n65534\n", "stderr": "", "exit_status": 0}
    assert meta(sh)["class"] == "ok" and not sh["isError"]
    assert meta(sh)["cpu_s"] > 0 and meta(sh)["memory_peak"] > 0 and meta(sh)["bytes_out"] == 9


def test_run_code_without_a_memory_limit_sets_no_swap_limit() -> None:
    # On cgroup v1 a swap limit needs a memory limit: none of either must still start.
    for session in (False, True):
        runner = CodeRunner(limits=ToolLimits(memory=None, cpus=None, pids=None))
        try:
            result = call(
                service(runner.tool()), "run_code", {"code": "print(1)", "session": session}, A
            )
        finally:
            runner.close()
        assert meta(result)["class"] == "ok", result


def test_run_code_out_of_memory_or_pids_is_resource() -> None:
    _runner, svc = code_service(pids=8)
    oom = call(svc, "run_code", {"code": "b = bytearray(200 << 20)"}, A)
    assert meta(oom)["class"] == "resource" and "out of memory" in oom["content"][0]["text"]
    fork = call(svc, "run_code", {"language": "bash",
                                  "code": "for i in $(seq 40); do sleep 5 & done; wait"}, A)  # fmt: skip
    assert meta(fork)["class"] == "resource", fork


def test_run_code_past_its_timeout_is_timeout_and_killed() -> None:
    _runner, svc = code_service()
    result = call(svc, "run_code", {"code": "import time; time.sleep(30)", "timeout": 0.3}, A)
    assert meta(result)["class"] == "timeout" and meta(result)["duration_ms"] < 5000
    capped = call(svc, "run_code", {"code": "print(1)", "timeout": 1e9}, A)
    assert meta(capped)["class"] == "ok"  # a timeout above the tool's limit is cut to it


def test_run_code_output_is_cut_at_its_limit() -> None:
    _runner, svc = code_service(output=1000)
    result = call(svc, "run_code", {"code": "print('x' * 100000)"}, A)
    assert meta(result)["truncated"] and meta(result)["bytes_out"] == 100001
    assert len(result["structuredContent"]["stdout"]) == 1000
    assert meta(result)["class"] == "ok"


def test_run_code_has_no_network() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        _runner, svc = code_service()
        result = call(svc, "run_code", {"code": code}, A)
    assert meta(result)["class"] == "permanent"
    assert "ConnectionRefusedError" in result["structuredContent"]["stderr"]


@pytest.mark.parametrize(
    "code",
    [
        "import sys; print(sys.argv, __name__, list(globals()), __file__)",
        "def f():\n    1 / 0\nf()",
        "print(",
        "try:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('v') from e",
        "raise SystemExit('bye')",
        "import sys; sys.stdout.write('partial'); sys.exit(7)",
        "import sys; print(repr(sys.stdin.read()), sys.flags.isolated)",
    ],
)
def test_a_fresh_python_run_is_python_reading_its_program_from_stdin(code: str) -> None:
    # Fresh runs start in a sandbox made ahead, the interpreter already up: what the code sees
    # and what it prints (tracebacks, exit status) must be `python3 -I -`'s own.
    own = subprocess.run(
        ["python3", "-I", "-"], input=code.encode(), capture_output=True, env={"PATH": SAFE_PATH}
    )
    runner, svc = code_service()
    try:
        results = [call(svc, "run_code", {"code": code}, A) for _ in range(2)]  # cold, then warm
    finally:
        runner.close()
    for result in results:
        assert result["structuredContent"] == {
            "stdout": own.stdout.decode(),
            "stderr": own.stderr.decode(),
            "exit_status": own.returncode,
        }


def test_fresh_runs_never_share_a_sandbox_and_spares_end_with_their_task() -> None:
    runner, svc = code_service(timeout=0.5)
    b = Caller(task="t2", tenant="b")
    mark = "import os; print(os.path.exists('/tmp/mark')); open('/tmp/mark', 'w').close()"

    async def scenario() -> list[dict[str, Any]]:
        out = [await svc.call("run_code", {"code": mark}, c) for c in (A, A, b, A)]
        await asyncio.sleep(1.0)  # a spare waiting longer than the timeout: its clock waits too
        out.append(await svc.call("run_code", {"code": "print(1)"}, A))
        out.append(await svc.call("run_code", {"code": "import time; time.sleep(30)"}, A))
        return out

    try:
        results = asyncio.run(scenario())
        assert [r["structuredContent"]["stdout"] for r in results[:4]] == ["False\n"] * 4
        assert meta(results[4])["class"] == "ok"
        assert meta(results[5])["class"] == "timeout"
        deadline = time.monotonic() + 10  # the next spares are made after each call
        while time.monotonic() < deadline and not (
            len(runner.spare_pids("a", "t1")) == len(runner.spare_pids("b", "t2")) == code.SPARES
        ):
            time.sleep(0.01)
        mine, theirs = runner.spare_pids("a", "t1"), runner.spare_pids("b", "t2")
        assert len(mine) == len(theirs) == code.SPARES and not set(mine) & set(theirs)
        runner.end_task("t1")
        assert runner.spare_pids("a", "t1") == [] and runner.spare_pids("b", "t2") == theirs
        assert not any(Path(f"/proc/{pid}").exists() for pid in mine)
    finally:
        runner.close()
    assert not any(Path(f"/proc/{pid}").exists() for pid in theirs)


#: What one call leaves behind, every way it can: files (/tmp, /workspace, /dev/shm), its
#: environment, processes (a child, a daemonized grandchild), module state, an abstract socket.
_LEAVE = """
import json, os, socket, subprocess, sys
for d in ("/tmp", "/workspace", "/dev/shm"):
    try:
        open(os.path.join(d, "left"), "w").write("x")
    except OSError:
        pass
os.environ["LEFT"] = "1"
os.putenv("LEFT_PUT", "1")
subprocess.Popen(["sleep", "60"])
subprocess.Popen(["sh", "-c", "(setsid sleep 61 &) ; exit 0"]).wait()
json.LEFT = 1
sys.modules["left_behind"] = json
sys.path.append("/left")
s = socket.socket(socket.AF_UNIX); s.bind("\\0left"); s.listen()
globals()["_kept"] = s
print("left")
"""
_FIND = """
import json, os, socket, sys
procs = []
for p in os.listdir("/proc"):
    try:
        procs.append(open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")[0].decode())
    except (OSError, ValueError):
        pass
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("\\0left"); sock = True
except OSError:
    sock = False
print(json.dumps({
    "files": [d for d in ("/tmp", "/workspace", "/dev/shm") if os.path.exists(d + "/left")],
    "env": [k for k in os.environ if k.startswith("LEFT")],
    "sleep": [p for p in procs if "sleep" in p],
    "modules": hasattr(json, "LEFT") or "left_behind" in sys.modules or "/left" in sys.path,
    "globals": "_kept" in globals(),
    "socket": sock,
}))
"""


def test_back_to_back_fresh_runs_find_nothing_of_the_one_before() -> None:
    # Calls with no pause between them take the sandboxes made ahead while the one before ran:
    # each is still fresh (its own namespaces, cgroup, /tmp, workspace, interpreter).
    runner, svc = code_service()
    clean = {"files": [], "env": [], "sleep": [], "modules": False, "globals": False,
             "socket": False}  # fmt: skip

    async def scenario() -> list[dict[str, Any]]:
        out = []
        for _ in range(4):
            out.append(await svc.call("run_code", {"code": _LEAVE}, A))
            out.append(await svc.call("run_code", {"code": _FIND}, A))
        return out

    try:
        results = asyncio.run(scenario())
    finally:
        runner.close()
    for left, found in zip(results[::2], results[1::2], strict=True):
        assert left["structuredContent"]["stdout"] == "left\n", left
        assert json.loads(found["structuredContent"]["stdout"]) == clean, found


def test_an_unused_spare_sandbox_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    # Also the one made after a call that was still running when its task ended.
    monkeypatch.setattr(code, "_SPARE_IDLE_S", 0.5)
    runner, svc = code_service()

    async def scenario() -> tuple[list[int], list[int]]:
        running = asyncio.ensure_future(
            svc.call("run_code", {"code": "import time; time.sleep(0.3)"}, A)
        )
        await asyncio.sleep(0.1)
        runner.end_task("t1")  # while the call runs: the spare made after it outlives the task
        await running
        deadline = time.monotonic() + 10
        while len(runner.spare_pids("a", "t1")) < code.SPARES and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        made = runner.spare_pids("a", "t1")
        await asyncio.sleep(1.0)
        return made, runner.spare_pids("a", "t1")

    try:
        made, later = asyncio.run(scenario())
        assert len(made) == code.SPARES and later == []
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{p}").exists() for p in made) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(Path(f"/proc/{p}").exists() for p in made)
    finally:
        runner.close()


def test_a_session_keeps_its_variables_and_dies_with_its_task() -> None:
    runner, svc = code_service()

    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        out = [await svc.call("run_code", {"code": c, "session": True}, A)
               for c in ("x = 41", "x += 1", "print(x)", "raise ValueError('v')", "print(x)")]  # fmt: skip
        return out, runner.session_pid("a", "t1")

    results, pid = asyncio.run(scenario())
    assert [meta(r)["class"] for r in results] == ["ok", "ok", "ok", "permanent", "ok"]
    assert results[2]["structuredContent"]["stdout"] == "42\n"
    assert "ValueError: v" in results[3]["structuredContent"]["stderr"]
    assert results[4]["structuredContent"]["stdout"] == "42\n"  # an error keeps the state
    assert pid is not None and Path(f"/proc/{pid}").exists()
    runner.end_task("t1")
    assert runner.session_pid("a", "t1") is None
    assert not Path(f"/proc/{pid}").exists()


def test_sessions_are_never_shared_between_tenants_or_tasks() -> None:
    runner, svc = code_service()
    callers = [Caller(task="t1", tenant="a"), Caller(task="t1", tenant="b"),
               Caller(task="t2", tenant="a")]  # fmt: skip

    async def scenario() -> list[str]:
        for i, c in enumerate(callers):
            await svc.call("run_code", {"code": f"mine = {i}", "session": True}, c)
        outs = []
        for c in callers:
            r = await svc.call("run_code", {"code": "import os; print(mine, os.getpid())",
                                            "session": True}, c)  # fmt: skip
            outs.append(r["structuredContent"]["stdout"].split()[0])
        return outs

    try:
        assert asyncio.run(scenario()) == ["0", "1", "2"]
        pids = {runner.session_pid(c.tenant, c.task) for c in callers}
        assert len(pids) == 3 and None not in pids
    finally:
        runner.close()


def test_a_session_past_its_timeout_is_killed_and_starts_fresh() -> None:
    runner, svc = code_service()

    async def scenario() -> list[dict[str, Any]]:
        return [await svc.call("run_code", args | {"session": True}, A) for args in (
            {"code": "x = 1"}, {"code": "import time; time.sleep(30)", "timeout": 0.3},
            {"code": "print(globals().get('x'))"})]  # fmt: skip

    try:
        _first, slow, after = asyncio.run(scenario())
        assert meta(slow)["class"] == "timeout"
        assert after["structuredContent"]["stdout"] == "None\n"
    finally:
        runner.close()


@pytest.mark.parametrize("language", ["python", "bash"])
def test_a_fresh_call_under_way_ends_with_its_task(tmp_path: Path, language: str) -> None:
    """The task's end (or cancel) kills its fresh calls under way, as its session and spares:
    code never goes on acting in the workspace of a task that ended. Another task's call runs
    on."""
    runner, svc = code_service(timeout=30.0)
    ws = {t: owned_workspace(tmp_path / t, "65534") for t in ("t1", "t2")}
    callers = {t: Caller(task=t, tenant="a", workspace=ws[t]) for t in ws}
    code = {
        "python": "import time\nfor i in range(300):\n    open('/workspace/late', 'a').write('x')\n"
        "    time.sleep(0.02)",
        "bash": "for i in $(seq 300); do printf x >> /workspace/late; sleep 0.02; done",
    }[language]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], float]:
        calls = {t: asyncio.ensure_future(svc.call("run_code", {"code": code, "language": language},
                                                   callers[t])) for t in ws}  # fmt: skip
        while not all((ws[t] / "late").exists() for t in ws):
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        runner.end_task("t1")
        ended = await calls["t1"]
        took = time.monotonic() - t0
        return ended, await calls["t2"], took

    try:
        ended, other, took = asyncio.run(scenario())
        assert took < 5 and ended["isError"], ended
        size = (ws["t1"] / "late").stat().st_size
        time.sleep(0.3)
        assert (ws["t1"] / "late").stat().st_size == size
        assert meta(other)["class"] == "ok" and (ws["t2"] / "late").stat().st_size == 300
    finally:
        runner.close()


@pytest.mark.parametrize(
    "how",
    [
        {"code": "x = bytearray(100 << 20); print(len(x))"},
        {"code": "x = bytearray(100 << 20); print(len(x))", "session": True},
        {
            "code": "head -c 100000000 /dev/zero | tail -c 1 >/dev/null; x=$(head -c 100000000 "
            "/dev/zero | tr '\\0' a); echo ${#x}",
            "language": "bash",
        },
    ],
    ids=["python", "session", "bash"],
)
def test_a_tool_runs_within_its_tasks_own_limits(how: dict[str, Any]) -> None:
    """A task with 48 MiB cannot get 100 by asking run_code (whose own limit is 256 MiB) to
    allocate them: a tool's sandbox gets the least of the tool's and the task's limits."""
    from agentnode.isolation.spec import Limits

    runner, svc = code_service(memory=256 << 20)
    small = Caller(task="t1", tenant="a", task_limits=Limits(memory=48 << 20, pids=16))
    roomy = Caller(task="t2", tenant="a", task_limits=Limits(memory=1 << 30))
    try:
        capped, free = (call(svc, "run_code", how, c) for c in (small, roomy))
        assert meta(capped)["class"] == "resource", capped
        assert meta(free)["class"] == "ok", free
        assert small.within(runner.limits).pids == 16 and roomy.within(runner.limits).pids == 64
    finally:
        runner.close()


def test_calls_that_waited_their_turn_past_their_tasks_end_run_nothing(tmp_path: Path) -> None:
    """A task's 8 slow calls hold its turns; a session call and two fresh ones wait behind
    them; the task ends: those get their turns as the 8 are killed, and must run nothing,
    least of all a session nothing would ever end."""
    runner, svc = code_service(timeout=30.0)
    ws = owned_workspace(tmp_path / "ws", "65534")
    running = {"t1": True}
    caller = Caller(task="t1", tenant="a", workspace=ws, alive=lambda: running["t1"])
    late = [
        {"code": "open('/workspace/session', 'w').write('ran')", "session": True},
        {"code": "open('/workspace/fresh', 'w').write('ran')"},
        {"code": "echo ran > /workspace/bash", "language": "bash"},
    ]

    async def scenario() -> list[dict[str, Any]]:
        slow = [asyncio.ensure_future(svc.call("run_code", {"code": "import time; time.sleep(30)"},
                                               caller)) for _ in range(RUNNING_PER_CALLER)]  # fmt: skip
        while len(runner._running.get("t1", ())) < RUNNING_PER_CALLER:
            await asyncio.sleep(0.02)
        waiting = [asyncio.ensure_future(svc.call("run_code", a, caller)) for a in late]
        await asyncio.sleep(0.2)
        running["t1"] = False  # as the node does: off its running tasks, then end_task
        runner.end_task("t1")
        await asyncio.gather(*slow)
        return list(await asyncio.gather(*waiting))

    try:
        answers = asyncio.run(scenario())
        for a in answers:
            assert a["isError"] and "task t1 has ended" in a["content"][0]["text"], a
        time.sleep(0.3)
        assert runner.session_pid("a", "t1") is None
        assert sorted(p.name for p in ws.iterdir()) == []
    finally:
        runner.close()


@pytest.mark.parametrize("session", [True, False], ids=["session", "fresh"])
def test_a_sandbox_made_as_its_task_ends_goes_with_it(tmp_path: Path, session: bool) -> None:
    """The task ends while its call's sandbox is being made (after the call's turn came): the
    sandbox is ended as soon as it is there, never kept for a task that has none."""
    runner, svc = code_service(timeout=30.0)
    ws = owned_workspace(tmp_path / "ws", "65534")
    asked = iter([True])  # alive when the call gets its turn, then never
    caller = Caller(task="t1", tenant="a", workspace=ws, alive=lambda: next(asked, False))
    code = "import time; open('/workspace/ran', 'w').write('x'); time.sleep(30)"
    try:
        t0 = time.monotonic()
        r = call(svc, "run_code", {"code": code, "session": session}, caller)
        assert r["isError"] and time.monotonic() - t0 < 10, r
        time.sleep(0.3)
        assert runner.session_pid("a", "t1") is None and runner.spare_pids("a", "t1") == []
    finally:
        runner.close()


@pytest.mark.parametrize("after_s", [0.3, 1.0])
def test_a_cancelled_session_call_never_answers_the_next(after_s: float) -> None:
    """A session call cancelled by its caller (an MCP cancel, a client gone) runs on in its
    interpreter: its reply must not become the next call's. The session ends with it."""
    runner = CodeRunner(limits=ToolLimits(timeout=10.0, memory=64 << 20))
    records: list[dict[str, Any]] = []
    svc = ToolService(Registry([runner.tool()]), on_record=records.append)
    slow = "import time; time.sleep(1.5); print('reply of A')"

    async def scenario() -> dict[str, Any]:
        await svc.call("run_code", {"code": "x = 1", "session": True}, A)
        first = runner.session_pid("a", "t1")
        a = asyncio.ensure_future(svc.call("run_code", {"code": slow, "session": True}, A))
        await asyncio.sleep(after_s)
        a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a
        b = await svc.call("run_code", {"code": "print('reply of B', 'x' in globals())",
                                        "session": True}, A)  # fmt: skip
        await asyncio.sleep(1.5)  # A's code would have printed by now
        c = await svc.call("run_code", {"code": "print('reply of C')", "session": True}, A)
        return {"b": b, "c": c, "first": first, "now": runner.session_pid("a", "t1")}

    try:
        out = asyncio.run(scenario())
        assert out["b"]["structuredContent"]["stdout"] == "reply of B False\n", out["b"]
        assert out["c"]["structuredContent"]["stdout"] == "reply of C\n", out["c"]
        assert out["first"] != out["now"], "the cancelled call's session ended with it"
        cancelled = [r for r in records if r.get("cancelled")]
        assert len(cancelled) == 1 and "reply of A" in cancelled[0]["args"]["code"]
    finally:
        runner.close()


def test_a_cancelled_keyed_call_is_never_run_twice_under_its_key(tmp_path: Path) -> None:
    """Cancelled mid-run, a keyed call may have had its effect (its run goes on): a repeat
    under its key is told it was cut off, now and after a restart, and the code runs once."""
    from agentnode.tools.keys import KeyStore

    ws = owned_workspace(tmp_path / "ws", "65534")
    caller = Caller(task="t1", tenant="a", workspace=ws)
    runner = CodeRunner(limits=ToolLimits(timeout=10.0, memory=64 << 20))
    store = KeyStore(tmp_path / "keys")
    code = "import time; open('/workspace/runs', 'a').write('x'); time.sleep(1)"

    def service_now() -> ToolService:
        return ToolService(Registry([runner.tool()]), on_record=lambda _: None, keys=store)

    svc = service_now()

    async def scenario() -> list[dict[str, Any]]:
        first = asyncio.ensure_future(
            svc.call("run_code", {"code": code}, caller, idempotency_key="once")
        )
        while not (ws / "runs").exists():
            await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(
            svc.call("run_code", {"code": code}, caller, idempotency_key="once")
        )
        await asyncio.sleep(0.1)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        later = await svc.call("run_code", {"code": code}, caller, idempotency_key="once")
        await asyncio.sleep(1.5)
        restarted = await service_now().call(
            "run_code", {"code": code}, caller, idempotency_key="once"
        )
        return [await waiting, later, restarted]

    try:
        for answer in asyncio.run(scenario()):
            assert meta(answer)["class"] == "permanent" and answer["isError"], answer
            assert "outcome is unknown" in answer["content"][0]["text"], answer
        assert (ws / "runs").read_text() == "x", "run once"
    finally:
        runner.close()
        store.close()


def test_a_session_output_is_cut_as_a_fresh_calls_and_its_state_kept() -> None:
    """What session code prints is cut at the tool's output limit, in all, as a fresh call's
    is (the reply says so and how much it printed); the session goes on. Cut in the sandbox:
    the node never holds more than the limit of it."""
    runner, svc = code_service(output=1000)
    calls = [
        "x = 7\nprint('a' * 3000)",
        "import sys\nprint('é' * 400)\nprint('b' * 500, file=sys.stderr)",
        "print(x)",
    ]

    async def scenario() -> list[dict[str, Any]]:
        return [await svc.call("run_code", {"code": c, "session": True}, A) for c in calls]

    try:
        big, mixed, after = asyncio.run(scenario())
        assert meta(big)["class"] == "ok" and meta(big)["truncated"] is True
        assert big["structuredContent"]["stdout"] == "a" * 1000
        assert meta(big)["bytes_out"] == 3001
        out, err = mixed["structuredContent"]["stdout"], mixed["structuredContent"]["stderr"]
        assert out == "é" * 400 + "\n" and len(err) == 1000 - 801  # a cut character goes whole
        assert meta(mixed)["truncated"] is True and meta(mixed)["bytes_out"] == 801 + 501
        assert after["structuredContent"]["stdout"] == "7\n" and not meta(after)["truncated"]
    finally:
        runner.close()


@pytest.mark.parametrize(
    "written",
    [
        "b'x' * (8 << 20)",  # no end of line: a reply that never ends
        "b'{\"stdout\": 1}\\n'",  # a line that is no reply
        "b'[1, 2]\\n'",
        "b'not json\\n'",
    ],
)
def test_session_code_that_writes_on_its_reply_stream_ends_its_session(written: str) -> None:
    """Code that finds the session's reply stream and writes on it: the node reads at most
    what the output limit allows, takes nothing it wrote as a reply, and ends the session
    (one line says why); the next call gets a fresh one."""
    runner, svc = code_service(output=1000)
    forge = f"import os, time\nos.write(3, {written})  # the reply stream\ntime.sleep(30)"

    async def scenario() -> list[dict[str, Any]]:
        return [await svc.call("run_code", {"code": c, "session": True}, A)
                for c in ("y = 1", forge, "print(globals().get('y'))")]  # fmt: skip

    try:
        _first, forged, after = asyncio.run(scenario())
        assert meta(forged)["class"] in ("permanent", "resource"), forged
        assert "session state lost" in forged["content"][0]["text"]
        assert after["structuredContent"]["stdout"] == "None\n"
    finally:
        runner.close()


def test_one_tasks_slow_calls_do_not_hold_another_tasks() -> None:
    """A task with many slow sandboxed calls at once (run_code in python and bash, with a
    session) runs at most `RUNNING_PER_CALLER` of them at a time; another task's calls run
    meanwhile as if it were alone."""
    from agentnode.tools.service import RUNNING_PER_CALLER

    runner, svc = code_service()
    flooder, other = Caller(task="flood", tenant="a"), Caller(task="quiet", tenant="b")
    slow = [{"code": "import time; time.sleep(1.5)"},
            {"code": "sleep 1.5", "language": "bash"}]  # fmt: skip

    async def scenario() -> tuple[list[float], float]:
        flood = [asyncio.ensure_future(svc.call("run_code", slow[i % 2], flooder))
                 for i in range(3 * RUNNING_PER_CALLER)]  # fmt: skip
        session = asyncio.ensure_future(
            svc.call("run_code", {"code": "import time; time.sleep(1.5)", "session": True}, flooder)
        )
        await asyncio.sleep(0.3)
        took = []
        for args in ({"code": "print(1)"}, {"code": "echo 1", "language": "bash"},
                     {"code": "print(2)", "session": True}):  # fmt: skip
            t0 = time.monotonic()
            r = await svc.call("run_code", args, other)
            assert meta(r)["class"] == "ok", r
            took.append(time.monotonic() - t0)
        t0 = time.monotonic()
        results = await asyncio.gather(*flood, session)
        assert all(meta(r)["class"] == "ok" for r in results)
        return took, time.monotonic() - t0

    try:
        took, rest = asyncio.run(scenario())
        assert max(took) < 1.0, took  # not behind the flood's 1.5 s runs
        assert rest > 1.5  # the flood's last turns came after its first ones
    finally:
        runner.close()


# -- workspace files ------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "a.txt").write_text("hello")
    (tmp_path / "secret").write_text("host secret")
    os.symlink(tmp_path / "secret", ws / "abs-link")
    os.symlink("../secret", ws / "rel-link")
    os.symlink("/etc", ws / "etc-link")
    os.symlink("sub/a.txt", ws / "inner-link")  # inside, but every symlink is refused
    return ws


@pytest.mark.parametrize(
    ("tool", "args", "cls"),
    [
        ("write_file", {"path": "d\u0000/f", "content": "x"}, "invalid_input"),
        ("write_file", {"path": "new\u0000dir/sub/f", "content": "x"}, "invalid_input"),
        ("write_file", {"path": "f\u0000", "content": "x"}, "invalid_input"),
        ("read_file", {"path": "a\u0000b"}, "invalid_input"),
        ("list_files", {"path": "sub\u0000"}, "invalid_input"),
        ("read_file", {"path": "."}, "permanent"),
        ("read_file", {"path": "sub"}, "permanent"),
        ("write_file", {"path": "sub", "content": "x"}, "permanent"),
        ("write_file", {"path": "sub/a.txt/x", "content": "x"}, "permanent"),
        ("read_file", {"path": "fifo"}, "permanent"),
        ("write_file", {"path": "fifo", "content": "x"}, "permanent"),
    ],
)
def test_file_tools_refusals_hold_no_descriptor(
    workspace: Path, tool: str, args: dict[str, Any], cls: str
) -> None:
    """Each refusal (a NUL in a path, a directory or a FIFO where a file is meant) is one line
    of its class, and leaves the node no descriptor more: one leaked per call let a task use up
    the daemon's, and no task could start."""
    os.mkfifo(workspace / "fifo")
    svc = service(*file_tools())
    me = Caller(task="t1", tenant="a", workspace=workspace, user="1234:4321")
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        r = call(svc, tool, args, me)
        assert meta(r)["class"] == cls and "\n" not in r["content"][0]["text"], r
    # Not exact: earlier tests' sandboxes may still be closing on other threads.
    assert len(os.listdir("/proc/self/fd")) < fds + 20


def test_file_tools_read_write_and_list_inside_the_workspace(workspace: Path) -> None:
    svc = service(*file_tools(output=4))
    me = Caller(task="t1", tenant="a", workspace=workspace, user="1234:4321")
    assert call(svc, "read_file", {"path": "sub/a.txt"}, me)["content"][0]["text"] == "hell"
    assert meta(call(svc, "read_file", {"path": "/workspace/sub/a.txt"}, me))["truncated"]
    wrote = call(svc, "write_file", {"path": "new/deep/b.txt", "content": "data"}, me)
    assert meta(wrote)["class"] == "ok"
    made = workspace / "new" / "deep" / "b.txt"
    assert made.read_text() == "data"
    assert (made.stat().st_uid, made.stat().st_gid) == (1234, 4321)
    assert (made.parent.stat().st_uid, made.parent.stat().st_gid) == (1234, 4321)
    listing = call(svc, "list_files", {"path": "."}, me)["structuredContent"]["entries"]
    assert {e["name"]: e["type"] for e in listing}["etc-link"] == "symlink"
    assert {e["name"] for e in listing} >= {"sub", "new", "abs-link"}
    # An absolute path is the task's own: it lands inside the workspace.
    call(svc, "write_file", {"path": "/proc/self/root/etc/passwd", "content": "mine"}, me)
    assert (workspace / "proc/self/root/etc/passwd").read_text() == "mine"


@pytest.mark.parametrize(
    "path",
    ["../secret", "/workspace/../secret", "sub/../../secret", "abs-link", "rel-link",
     "etc-link/passwd", "inner-link", "/etc/passwd/../../secret", "..", "etc-link/../../secret"],
)  # fmt: skip
def test_file_tools_refuse_every_way_out_of_the_workspace(workspace: Path, path: str) -> None:
    svc = service(*file_tools())
    me = Caller(task="t1", tenant="a", workspace=workspace)
    for name, args in (("read_file", {"path": path}), ("list_files", {"path": path}),
                       ("write_file", {"path": path, "content": "pwned"})):  # fmt: skip
        result = call(svc, name, args, me)
        assert result["isError"], (name, path)
        assert meta(result)["class"] in ("policy", "permanent", "invalid_input"), (name, path)
        assert "host secret" not in result["content"][0]["text"]
    assert (workspace.parent / "secret").read_text() == "host secret"
    assert not Path("/etc/passwd").read_text().startswith("pwned")


def test_file_tools_refuse_a_symlink_swapped_in_for_a_directory(workspace: Path) -> None:
    svc = service(*file_tools())
    me = Caller(task="t1", tenant="a", workspace=workspace)
    (workspace / "sub" / "a.txt").unlink()
    (workspace / "sub").rmdir()
    os.symlink(workspace.parent, workspace / "sub")
    result = call(svc, "write_file", {"path": "sub/secret", "content": "pwned"}, me)
    assert meta(result)["class"] == "policy"
    assert (workspace.parent / "secret").read_text() == "host secret"


def test_file_tools_refuse_a_hard_link_and_change_nothing(workspace: Path) -> None:
    svc = service(*file_tools())
    me = Caller(task="t1", tenant="a", workspace=workspace)
    os.link(workspace.parent / "secret", workspace / "hard")
    for name, args in (("read_file", {"path": "hard"}),
                       ("write_file", {"path": "hard", "content": "pwned"})):  # fmt: skip
        assert meta(call(svc, name, args, me))["class"] == "policy"
    assert (workspace.parent / "secret").read_text() == "host secret"


def test_file_tools_need_a_calling_task() -> None:
    result = call(service(*file_tools()), "read_file", {"path": "x"}, A)
    assert meta(result)["class"] == "invalid_input"


# -- http_fetch and web_search --------------------------------------------------------------------


def test_http_fetch_reaches_only_what_the_calling_task_may(
    world: tuple[World, EgressService],
) -> None:
    _, net = world
    records: list[dict[str, Any]] = []
    svc = service(*WebTools(node_network=net, limits=ToolLimits(timeout=10)).tools(),
                  records=records)  # fmt: skip
    allowed = Caller(task="t1", tenant="a", network="egress",
                     egress=EgressPolicy(allow=[f"{HOST4}:8080"]))  # fmt: skip
    ok = call(svc, "http_fetch", {"url": f"http://{HOST4}:8080/page"}, allowed)
    assert meta(ok)["class"] == "ok" and meta(ok)["status"] == 200
    assert ok["content"][0]["text"] == "/page from the test host"
    other_port = call(svc, "http_fetch", {"url": f"http://{HOST4}:8081/"}, allowed)
    assert meta(other_port)["class"] == "policy"
    assert meta(other_port)["denial"]["port"] == 8081
    nothing = Caller(task="t2", tenant="a", network="egress", egress=EgressPolicy())
    denied = call(svc, "http_fetch", {"url": f"http://{HOST4}:8080/page"}, nothing)
    assert meta(denied)["class"] == "policy" and meta(denied)["denial"]["address"] == HOST4
    # Each denial is its own audit record, the caller's, just before the call's record.
    denial, rec = records[-2:]
    assert denial["kind"] == "egress_denied" and denial["tool"] == "http_fetch"
    assert (denial["task"], denial["address"], denial["port"]) == ("t2", HOST4, 8080)
    assert rec["kind"] == "tool_call" and rec["class"] == "policy"
    offline = call(svc, "http_fetch", {"url": f"http://{HOST4}:8080/page"}, A)
    assert meta(offline)["class"] == "policy"
    busy = call(svc, "http_fetch", {"url": f"http://{HOST4}:8080/busy"}, allowed)
    assert meta(busy)["class"] == "transient" and meta(busy)["retry_after"] == 7
    assert meta(busy)["attempts"] == 1  # no key and not idempotent: not retried
    gone = call(svc, "http_fetch", {"url": f"http://{HOST4}:8080/gone"}, allowed)
    assert meta(gone)["class"] == "permanent" and meta(gone)["status"] == 404


def _connect(port: int, host: str = HOST4) -> str:
    return f"import socket; socket.create_connection(({host!r}, {port}), timeout=3); print('in')"


def _bash_connect(port: int, host: str = HOST4) -> str:
    # A whole request: the test server serves one connection at a time, and a connection left
    # open (its sandbox's netns gone before its FIN) would hold it.
    return (f"exec 3<>/dev/tcp/{host}/{port} && printf 'GET /sh HTTP/1.0\\r\\n\\r\\n' >&3"
            " && cat <&3")  # fmt: skip


def _logged(runner: CodeRunner) -> tuple[ToolService, list[dict[str, Any]]]:
    """A service whose log numbers its records (their seq is their index), as the audit log."""
    records: list[dict[str, Any]] = []

    def append(record: dict[str, Any]) -> int:
        records.append(record)
        return len(records) - 1

    return ToolService(Registry([runner.tool()]), on_record=append), records


def test_run_code_has_no_network_by_default_nor_for_a_caller_without_a_task(
    world: tuple[World, EgressService],
) -> None:
    _, net = world
    may = Caller(task="t1", tenant="a", network="egress",
                 egress=EgressPolicy(allow=[f"{HOST4}:8080"]))  # fmt: skip
    default = CodeRunner(limits=ToolLimits(timeout=10), node_network=net)
    task_net = CodeRunner(limits=ToolLimits(timeout=10), network="task", node_network=net)
    try:
        for runner, caller in ((default, may), (task_net, Caller(task="", tenant="a"))):
            svc, records = _logged(runner)
            for args in (
                {"code": _connect(8080)},
                {"code": _connect(8080)},  # in the sandbox made ahead
                {"code": _connect(8080), "session": True},
                {"code": _bash_connect(8080), "language": "bash"},
            ):
                result = call(svc, "run_code", args, caller)
                assert meta(result)["class"] == "permanent", result
                assert "unreachable" in result["content"][0]["text"], result
                assert "denial" not in meta(result)
            assert [r["kind"] for r in records] == ["tool_call"] * 4
    finally:
        default.close()
        task_net.close()


def test_run_code_with_the_task_network_reaches_what_its_task_may_and_no_more(
    world: tuple[World, EgressService],
) -> None:
    # Tenant a's t1 may reach HOST4:8080; tenant b's t1 (same task id) only HOST4:8081, where
    # nothing listens: reaching it is a refused connection, not a denial.
    _, net = world
    runner = CodeRunner(limits=ToolLimits(timeout=10), network="task", node_network=net)
    svc, records = _logged(runner)
    a = Caller(task="t1", tenant="a", network="egress",
               egress=EgressPolicy(allow=[f"{HOST4}:8080"], publish=["18080:80"]))  # fmt: skip
    b = Caller(task="t1", tenant="b", network="egress",
               egress=EgressPolicy(allow=[f"{HOST4}:8081"]))  # fmt: skip
    fetch = "import urllib.request as u; "
    fetch += f"print(u.urlopen('http://{HOST4}:8080/p', timeout=5).read())"

    def denied(caller: Caller, args: dict[str, Any], port: int) -> None:
        result = call(svc, "run_code", args, caller)
        assert meta(result)["class"] == "policy", result
        denial = meta(result)["denial"]
        assert (denial["address"], denial["port"]) == (HOST4, port)
        record = records[denial["record"]]
        assert record["kind"] == "egress_denied" and record["tool"] == "run_code"
        assert (record["task"], record["tenant"], record["port"]) == ("t1", caller.tenant, port)
        assert records[-1]["kind"] == "tool_call"
        assert records[-1]["denials"] == [denial["record"]]

    try:
        for _round in range(2):  # the second round's python runs take sandboxes made ahead
            for session in (False, True):
                ok = call(svc, "run_code", {"code": fetch, "session": session}, a)
                assert meta(ok)["class"] == "ok", ok
                assert "/p from the test host" in ok["structuredContent"]["stdout"]
                denied(a, {"code": _connect(8081), "session": session}, 8081)
                denied(b, {"code": _connect(8080), "session": session}, 8080)
                refused = call(svc, "run_code", {"code": _connect(8081), "session": session}, b)
                assert meta(refused)["class"] == "permanent", refused
                assert "ConnectionRefusedError" in refused["content"][0]["text"]
            sh = call(svc, "run_code", {"code": _bash_connect(8080), "language": "bash"}, a)
            assert meta(sh)["class"] == "ok", sh
            assert "/sh from the test host" in sh["structuredContent"]["stdout"]
            denied(a, {"code": _bash_connect(8081), "language": "bash"}, 8081)
            denied(b, {"code": _bash_connect(8080), "language": "bash"}, 8080)
        # a's policy changes: its sandbox made ahead (old policy) is not used, and its session
        # follows live, keeping its variables.
        call(svc, "run_code", {"code": "kept = 42", "session": True}, a)
        deadline = time.monotonic() + 10
        while len(runner.spare_pids("a", "t1")) < code.SPARES and time.monotonic() < deadline:
            time.sleep(0.01)
        spares = runner.spare_pids("a", "t1")  # made with a's policy: they could reach 8080
        assert len(spares) == code.SPARES
        for spare in spares:
            assert os.readlink(f"/proc/{spare}/ns/net") != os.readlink("/proc/self/ns/net")
        narrowed = Caller(task="t1", tenant="a", network="egress", egress=EgressPolicy())
        denied(narrowed, {"code": _connect(8080)}, 8080)
        while any(Path(f"/proc/{p}").exists() for p in spares) and time.monotonic() < deadline:
            time.sleep(0.01)  # stopped unused when those for the new policy were made
        assert not any(Path(f"/proc/{p}").exists() for p in spares)
        denied(narrowed, {"code": _connect(8080) + "\nprint(kept)", "session": True}, 8080)
        kept = call(svc, "run_code", {"code": "print(kept)", "session": True}, narrowed)
        assert kept["structuredContent"]["stdout"] == "42\n"
        # Without its network (mode none now) its session starts again without network.
        offline = call(svc, "run_code", {"code": _connect(8080), "session": True},
                       Caller(task="t1", tenant="a"))  # fmt: skip
        assert meta(offline)["class"] == "permanent" and "denial" not in meta(offline)
    finally:
        runner.close()


def _names(world: World) -> tuple[set[str], set[str]]:
    """The network namespaces on the host and the task veths on the world's bridge."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-n", world.task, "-o", "link"], capture_output=True,
                           text=True, check=True)  # fmt: skip
    return (
        {line.split()[0] for line in ns.stdout.splitlines() if line.strip()},
        {ln.split(":")[1].strip().split("@")[0] for ln in links.stdout.splitlines()
         if ": anv" in ln},
    )  # fmt: skip


def _made(net: EgressService, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The (netns, veth) of every task network `net` makes from now on."""
    made: list[tuple[str, str]] = []
    add = net.network.add_task

    def recording(task_id: str, **kw: Any) -> Any:
        tn = add(task_id, **kw)
        made.append((tn.netns, tn.host_veth))
        return tn

    monkeypatch.setattr(net.network, "add_task", recording)
    return made


def _gone(world: World, made: list[tuple[str, str]], within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while True:
        ns, veths = _names(world)
        if not any(n in ns or v in veths for n, v in made):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_run_code_answers_before_its_task_network_is_removed_and_it_is_removed(
    world: tuple[World, EgressService], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Removals held until the calls are done: they answer all the same, and then every netns
    # and veth goes.
    w, net = world
    made = _made(net, monkeypatch)
    remove = net.network.release_task  # what the background teardown does
    release = threading.Event()

    def held(tn: Any) -> None:
        release.wait(60)
        remove(tn)

    monkeypatch.setattr(net.network, "release_task", held)
    runner = CodeRunner(limits=ToolLimits(timeout=10), network="task", node_network=net)
    svc = service(runner.tool())
    may = Caller(task="t1", tenant="a", network="egress",
                 egress=EgressPolicy(allow=[f"{HOST4}:8080"]))  # fmt: skip
    fetch = f"import urllib.request as u; print(u.urlopen('http://{HOST4}:8080/q').read())"
    try:
        for args in ({"code": fetch}, {"code": fetch}, {"code": _bash_connect(8080),
                                                          "language": "bash"}):  # fmt: skip
            result = call(svc, "run_code", args, may)
            assert meta(result)["class"] == "ok", result
        assert len(made) >= 3 and not release.is_set()
        ns, _ = _names(w)
        assert any(n in ns for n, _v in made)  # the used ones' removals are still held
    finally:
        release.set()
        runner.close()
    assert _gone(w, made)


def test_the_background_teardown_has_a_bounded_backlog(
    world: tuple[World, EgressService], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the backlog the ending caller tears down itself: ends faster than removals cannot
    # pile up netns and veths.
    _, net = world
    net.start()
    net.wait_retired()  # an earlier test's teardown still queued would fill the backlog
    monkeypatch.setattr(egress_service, "RETIRE_BACKLOG", 1)
    release = threading.Event()
    ran: list[str] = []

    def first() -> None:
        release.wait(30)
        ran.append("first")

    net.retire(first)
    net.retire(lambda: ran.append(threading.current_thread().name))  # the backlog is full
    assert ran == [threading.current_thread().name]
    release.set()
    deadline = time.monotonic() + 10
    while len(ran) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran[1:] == ["first"]


def test_a_task_network_left_to_the_background_teardown_goes_when_its_owner_is_killed(
    world: tuple[World, EgressService],
) -> None:
    # The node killed (-9) right after it answered, its teardown not done: what it left (the
    # used sandbox's network, and the spare's made ahead) goes at the next start's sweep.
    w, net = world
    script = f"""
import asyncio, json, time
from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.isolation import use_data_dir
from agentnode.tools.code import CodeRunner
from agentnode.tools.registry import Caller, Registry, ToolLimits
from agentnode.tools.service import RUNNING_PER_CALLER, ToolService
use_data_dir({str(isolation.DATA_DIR)!r})
net = EgressService(bridge="agentnode0", subnet={str(net.network.subnet)!r}, node_netns={w.task!r})
made = []
add = net.network.add_task
def recording(task_id, **kw):
    tn = add(task_id, **kw)
    made.append((tn.netns, tn.host_veth))
    return tn
net.network.add_task = recording
net.network.release_task = lambda tn: time.sleep(3600)  # never done: the kill comes first
runner = CodeRunner(limits=ToolLimits(timeout=10), network="task", node_network=net)
svc = ToolService(Registry([runner.tool()]), on_record=lambda r: None)
may = Caller(task="t1", tenant="a", network="egress", egress=EgressPolicy(allow=[{HOST4 + ":8080"!r}]))
async def go():
    out = await svc.call("run_code", {{"code": "print(1)"}}, may)
    while len(made) < 2:  # and the spare made after it
        await asyncio.sleep(0.01)
    return out
out = asyncio.run(go())
print(json.dumps({{"stdout": out["structuredContent"]["stdout"], "made": made}}), flush=True)
time.sleep(3600)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(code.__file__).parents[2])}
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env,
                             text=True)  # fmt: skip
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        report = json.loads(line)
        assert report["stdout"] == "1\n"
        made = [tuple(m) for m in report["made"]]
        ns, veths = _names(w)
        assert all(n in ns and v in veths for n, v in made)  # left behind, as a kill leaves
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.communicate()
    net.network.sweep()  # as the node's next start does
    assert _gone(w, made, within=5.0)
    assert swept_cgroups(owner.pid) == []  # its sandboxes' cgroups, as that start sweeps them


def test_web_search_speaks_searxng_json_through_its_own_policy(
    world: tuple[World, EgressService],
) -> None:
    # The mock SearXNG runs on a test-made address: the node's "host" network mode currently
    # starts tasks in a fresh namespace (see docs/tools.md), so host loopback is out of reach.
    _, net = world
    tools = WebTools(node_network=net, limits=ToolLimits(timeout=10),
                     search_url=f"http://{HOST4}:8080")  # fmt: skip
    svc = service(*tools.tools())
    # Any network of its own will do: the search goes through the tool's own policy.
    online = Caller(task="t1", tenant="a", network="egress", egress=EgressPolicy(allow=[]))
    result = call(svc, "web_search", {"query": "agent nodes", "max_results": 2}, online)
    assert meta(result)["class"] == "ok", result
    assert result["structuredContent"]["results"] == [
        {"title": "T0 agent nodes", "url": "https://example.org/0", "content": "c0"},
        {"title": "T1 agent nodes", "url": "https://example.org/1", "content": "c1"},
    ]
    # Its policy allows its backend only; the caller's own does not matter.
    (search,) = [t for t in tools.tools() if t.name == "web_search"]
    assert search.egress == EgressPolicy(allow=[f"{HOST4}:8080"])
    # A task without network has no way out through it: its query would leave the node.
    for caller in (A, Caller(task="t2", tenant="a", network="egress")):
        refused = call(svc, "web_search", {"query": "secret", "max_results": 1}, caller)
        assert meta(refused)["class"] == "policy" and "has no network" in str(refused), refused


# -- configuration and the CLI --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[tools]\nbogus = 1\n", "tools.bogus: unknown key"),
        ("[tools.run_code]\nmemory = -5\n", "tools.run_code.memory: must be a positive number"),
        ('[tools.run_code]\nmemory = "lots"\n', "tools.run_code.memory"),
        ('[tools.mcp.x]\ncommand = "node"\n', "tools.mcp.x.command: must be a non-empty list"),
        ('[tools.mcp.x]\ncommand = ["a"]\nnetwork = "moon"\n', "tools.mcp.x.network"),
        ('[tools.mcp.x]\ncommand = ["a"]\nallow = ["not an address"]\n', "tools.mcp.x.allow"),
        ('[tools.mcp.x]\ncommand = ["a"]\nro = ["/does/not/exist"]\n', "tools.mcp.x.ro"),
        ('[tools.mcp.x]\ncommand = ["a"]\nwhat = 1\n', "tools.mcp.x.what: unknown key"),
        ('[tools.mcp.a__b]\ncommand = ["a"]\n', "may not hold '__'"),
        ("[tools]\nmcp_port = 70000\n", "tools.mcp_port: must be a port number"),
        ("[tools.mcp.x]\nidle = 5\n", "tools.mcp.x: give a command to run, a url"),
        ('[tools.mcp.x]\nurl = "http://10.0.0.1:80/mcp"\n', "tools.mcp.x.url: give http://127"),
        ('[tools.mcp.x]\nurl = "https://127.0.0.1/mcp"\n', "tools.mcp.x.url: give http://127"),
        ('[tools.mcp.x]\nurl = "http://example.org/mcp"\n', "tools.mcp.x.url: give http://"),
        ("[tools.mcp.x]\nurl = 5\n", "tools.mcp.x.url: must be a string"),
        (
            '[tools.mcp.x]\nurl = "http://[::1]:9/mcp"\nmemory = "1G"\n',
            "tools.mcp.x.memory: applies only to a server the node runs",
        ),
        ('[tools.web_search]\nurl = "ftp://x"\n', "tools.web_search.url"),
        ('[tools.run_code]\nnetwork = "egress"\n', 'tools.run_code.network: use "none"'),
    ],
)
def test_bad_tools_config_is_one_line_naming_the_key(
    tmp_path: Path, toml: str, needle: str
) -> None:
    from agentnode.errors import ConfigError
    from agentnode.node.config import load_config
    from agentnode.tools.toolbox import Toolbox

    path = tmp_path / "agentnode.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        Toolbox(load_config(path).tools, data_dir=tmp_path, on_record=lambda r: None)
    message = str(e.value)
    assert needle in message and "\n" not in message, message


def test_a_tools_config_declares_servers_and_limits(tmp_path: Path) -> None:
    from agentnode.node.config import load_config

    path = tmp_path / "agentnode.toml"
    path.write_text(
        '[tools]\nmcp_port = 8931\n[tools.run_code]\nmemory = "128M"\ntimeout = "5s"\n'
        'network = "task"\n'
        '[tools.web_search]\nurl = "http://search.internal:8888"\n'
        f'[tools.mcp.fs]\ncommand = ["node", "fs.js"]\nro = ["{tmp_path}:/data"]\n'
        'network = "egress"\nallow_hosts = ["api.example.org:443"]\nidle = "2m"\n'
        'tenants = ["a"]\nmemory = "1G"\n'
        '[tools.mcp.own]\nurl = "http://127.0.0.1:8123/mcp"\ntenants = ["b"]\n'
        f'[tools.mcp.boxed]\ncommand = ["srv"]\nurl = "http://localhost:8000/mcp"\n'
    )
    tools = load_config(path).tools
    fs, own, boxed = tools.mcp
    assert own.url == "http://127.0.0.1:8123/mcp" and own.command == ()
    assert boxed.url == "http://localhost:8000/mcp" and boxed.command == ("srv",)
    assert tools.mcp_port == 8931 and tools.run_code.memory == 128 << 20
    assert tools.run_code.timeout == 5.0 and tools.run_code_network == "task"
    assert tools.search_url == "http://search.internal:8888"
    assert fs.command == ("node", "fs.js") and fs.network == "egress"
    assert fs.egress is not None and list(fs.egress.hosts) == ["api.example.org:443"]
    assert fs.idle_s == 120 and fs.tenants == frozenset({"a"}) and fs.limits.memory == 1 << 30
    assert fs.mounts[0].src == str(tmp_path) and fs.mounts[0].dest == "/data"
