"""The one sandbox spec (`agentnode.isolation.spec`): its bounds, its JSON form, and the same
answer from every door (the Python type, `agentnode exec`, `agentnode submit`, the API)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from agentnode.errors import SandboxError, TaskError
from agentnode.isolation import spawn
from agentnode.isolation.launch import Launch
from agentnode.isolation.spec import (
    FIELDS,
    MAX_BYTES,
    MAX_ID,
    MAX_PIDS,
    MAX_SECONDS,
    MIN_MEMORY,
    Limits,
    Mount,
    Sandbox,
    SpecError,
    json_schema,
)
from agentnode.tasks import State, Task, TaskManager, TaskSpec, TaskStore
from agentnode.tasks.store import decode, encode
from conftest import public_dir, run_cli
from support.node_daemon import Daemon

OPENAPI = Path(__file__).parents[1] / "python/agentnode/node/openapi.json"
#: What a task prints so the test can see who it runs as: Uid/Gid are real, effective, saved, fs.
WHO = ["sh", "-c", "grep -E '^(Uid|Gid):' /proc/self/status"]

# -- the type ---------------------------------------------------------------------------------

#: (JSON field, a value out of bounds): each class several ways.
BAD = [
    ("user", "4294967295"),  # (uid_t)-1: "unchanged" to setresuid, the task would stay root
    ("user", "0:4294967295"),
    ("user", 4294967295),
    ("user", "4294967296"),
    ("user", 2**64),
    ("user", -1),
    ("user", "99999999999999999999999"),
    ("user", "1000:"),
    ("user", True),
    ("pids", 2**64),
    ("pids", 0),
    ("pids", MAX_PIDS + 1),
    ("pids", 1.5),
    ("pids", "10"),
    ("memory", 2**64),
    ("memory_high", 2**64),
    ("swap", 2**64),
    ("tmp_size", 2**64),
    ("tmp_size", MAX_BYTES + 1),
    ("memory", "9" * 400 + "G"),
    ("memory", 0),
    ("memory", -5),
    ("memory", math.inf),
    ("memory", math.nan),
    ("timeout", "99999999999999999999999h"),
    ("timeout", math.nan),
    ("timeout", math.inf),
    ("timeout", -math.inf),
    ("timeout", 1e308),
    ("timeout", MAX_SECONDS + 1),
    ("timeout", 0),
    ("timeout", "9" * 400 + "s"),
    ("cpus", math.nan),
    ("cpus", math.inf),
    ("cpus", 0.001),
    ("cpus", 1e308),
    ("cpu_weight", 0),
    ("cpu_weight", 10001),
    ("cpu_weight", 2**64),
    ("nofile", 2**64),
    ("egress_rate", "9" * 400),
    ("egress_rate", 2**64),
    ("conn_rate", 2**64),
    ("hostname", "a b"),
    ("cwd", "relative"),
    ("rootfs", "/a/../b"),
    ("ro", ["/a:relative"]),
    ("rw", ["relative"]),
    # The node's own binds (its sockets, unmasked) go in /run/agentnode: a task's may not.
    ("ro", ["/var/lib/agentnode/run:/run/agentnode/sockets"]),
    ("rw", ["/run:/run/agentnode"]),
    ("ro", ["/tmp:/run/./agentnode/x"]),
    ("ro", ["/tmp://run//agentnode/"]),
    ("rw", ["/run/agentnode/sockets"]),
    ("caps", ["CAP_NOPE"]),
    ("env", {"A=B": "c"}),
    ("network", "/proc/1/ns/net"),  # a namespace path is not part of the JSON form
    ("allow", ["10.0.0.0/33"]),
    ("bogus", 1),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_every_out_of_bounds_value_is_refused_naming_its_field(field: str, value: Any) -> None:
    with pytest.raises(SpecError) as e:
        Sandbox.from_json({field: value})
    assert e.value.field == field
    message = str(e.value)
    assert message.startswith(f"{field} ") and "\n" not in message and len(message) < 300


@pytest.mark.parametrize("cap", ["CAP_NET_RAW", "net_raw", "CAP_NET_ADMIN", "NET_ADMIN"])
def test_packet_capabilities_never_go_with_an_enforced_policy(cap: str) -> None:
    for rules in ({"network": "egress"}, {"allow": ["203.0.113.0/24:443"]}, {"conn_rate": 5}):
        with pytest.raises(SpecError, match="bypasses the egress policy") as e:
            Sandbox.from_json({"caps": [cap], **rules})
        assert e.value.field == "caps"
    # Allowed where no hook is bypassed: no network, or the host's (weaker by choice).
    assert Sandbox.from_json({"caps": [cap]}).network == "none"
    host = Sandbox.from_json({"caps": [cap], "network": "host", "allow": ["203.0.113.0/24"]})
    assert host.caps == ("CAP_" + cap.upper().removeprefix("CAP_"),)


def test_userns_maps_only_the_first_65536_ids() -> None:
    assert Sandbox.from_json({"user": "65535:65535", "userns": True}).uid == 65535
    with pytest.raises(SpecError, match="with userns"):
        Sandbox.from_json({"user": "65536", "userns": True})


def test_json_form_round_trips_and_matches_the_openapi_document() -> None:
    box = Sandbox(
        limits=Limits(cpus=0.5, cpu_weight=7, memory=1 << 30, memory_high=1 << 29, swap=1,
                      pids=MAX_PIDS, tmp_size=MAX_BYTES, timeout=MAX_SECONDS, nofile=10),
        uid=MAX_ID, gid=0, caps=("CAP_CHOWN",), rootfs="/", cwd="/w", hostname="h.x",
        mounts=(Mount("/data", "/in"), Mount("/out", "/o:ut", writable=True)),
        env=(("A", "1=2"), ("B", "")), network="host", allow=("203.0.113.0/24:443",),
        allow_hosts=("*.example.com:443",), egress_rate="1MiB/s", conn_rate=20,
    )  # fmt: skip
    data = box.to_json()
    assert tuple(data) == FIELDS
    assert Sandbox.from_json(json.loads(json.dumps(data))) == box
    schema = json_schema()
    jsonschema.validate(data, schema)
    jsonschema.validate(Sandbox().to_json(), schema)
    doc = json.loads(OPENAPI.read_text())["components"]["schemas"]
    assert doc["Sandbox"]["properties"] == schema["properties"]
    for name in ("TaskSpec", "Task"):
        props = doc[name]["properties"]
        assert {k: props[k] for k in FIELDS} == schema["properties"], name


def test_a_spec_is_checked_on_this_host_only_where_a_task_is_asked_for(tmp_path: Path) -> None:
    gone = Sandbox(mounts=(Mount(str(tmp_path / "gone"), "/in"),), rootfs=str(tmp_path / "no"))
    assert Sandbox.from_json(gone.to_json()) == gone  # a record read back never fails on it
    with pytest.raises(SpecError, match=r"rootfs .* is not a directory"):
        gone.check_host()


# -- the task store ---------------------------------------------------------------------------


def test_format_1_records_still_load(tmp_path: Path) -> None:
    flat = {
        "tenant": "acme", "command": ("x",), "cls": "high", "cpu_millis": 1500,
        "memory_bytes": 1 << 30, "timeout_s": 60.0, "pids": 7, "heartbeat_s": None,
        "env": (("A", "1"),), "network": "egress", "allow": ("203.0.113.0/24:443",),
        "allow_hosts": (), "egress_rate": None, "conn_rate": None, "user": "1000:1001",
        "retries": 2, "binds": (("/data", "/in", False), ("/out", "/out", True)),
        "cpu_weight": None, "memory_high": None, "swap": None, "tmp_size": None,
        "userns": False, "caps": ("CAP_CHOWN",), "rootfs": "/", "cwd": "/workspace",
        "hostname": "agentnode",
    }  # fmt: skip
    body = {"id": "old1", "seq": 3, "state": "queued", "attempt": 1, "not_before": 0.0,
            "reason": "", "exit_code": None, "history": (("queued", 1.0),), "spec": flat}  # fmt: skip
    head = struct.pack("<BBBBQQQd", 1, 0, 1, 4, 3, 1500, 1 << 30, 0.0)
    raw = head + b"acme" + msgpack.packb(body)
    t = decode(raw)
    box = t.spec.sandbox
    assert (t.id, t.spec.cls, t.spec.retries, t.spec.cpu_millis) == ("old1", "high", 2, 1500)
    assert (box.uid, box.gid, box.limits.pids, box.limits.memory) == (1000, 1001, 7, 1 << 30)
    assert box.mounts == (Mount("/data", "/in"), Mount("/out", "/out", writable=True))
    assert (box.network, box.allow, box.env) == ("egress", ("203.0.113.0/24:443",), (("A", "1"),))
    assert decode(encode(t)) == t  # and it is written back in the current format
    poisoned = head + b"acme" + msgpack.packb({**body, "spec": {**flat, "user": "4294967295"}})
    with pytest.raises(TaskError, match=r"spec this agentnode refuses .*user '4294967295'"):
        decode(poisoned)
    # What a node of the last version left: a good record and one that asked for uid -1.
    store = TaskStore(tmp_path)
    store.close()
    db = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    db[b"t/old1"] = raw
    db[b"t/old2"] = poisoned.replace(b"old1", b"old2")
    db.close()
    manager = TaskManager(tmp_path)
    try:
        assert manager.get("old1") == t
        refused = manager.get("old2")
        assert refused.state is State.CANCELLED and refused.spec.sandbox.uid == 65534
        assert "user '4294967295'" in refused.reason and refused.reason.startswith("not run")
        assert manager.queued_count() == 1  # only old1 waits to run
    finally:
        manager.close()
    again = TaskStore(tmp_path).load()  # rewritten in the current format, once
    assert all(r[0] == 2 for r in again.records.values())


def test_one_bad_record_fails_alone_in_a_group_commit(tmp_path: Path) -> None:
    store = TaskStore(tmp_path)
    spec = TaskSpec(tenant="acme", command=("x",))
    good = [Task(id=f"g{i}", seq=store.next_seq(), spec=spec) for i in range(6)]
    # A value no record can hold, as a 2^64 limit was before the spec bounded them.
    bad = [Task(id=f"b{i}", seq=store.next_seq(), spec=spec, exit_code=1 << 70) for i in range(3)]

    async def burst() -> list[BaseException | None]:
        order = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4], bad[2], good[5]]
        return await asyncio.gather(*(store.put(t) for t in order), return_exceptions=True)

    results = asyncio.run(burst())
    errors = [r for r in results if r is not None]
    assert len(errors) == 3 and all(isinstance(e, TaskError) for e in errors)
    assert all("cannot be stored" in str(e) for e in errors)
    assert sorted(store.load().records) == sorted(t.id for t in good)
    store.close()


# -- the Rust side: no input panics ------------------------------------------------------------


@pytest.mark.root
def test_native_wait_takes_any_float_without_panicking(ws: Path) -> None:
    with spawn(["sleep", "0.2"], workspace=ws) as t:
        with pytest.raises(SandboxError, match="NaN"):
            t._native.wait(math.nan)
        assert t._native.wait(-1e308) is None  # negative: do not wait
        assert t._native.wait(1e300) == (0, None)  # beyond a Duration: until it ends
    with spawn(["true"], workspace=ws) as t:
        assert t._native.wait(math.inf) == (0, None)


@pytest.mark.root
def test_native_start_refuses_the_unchanged_id(ws: Path) -> None:
    """(uid_t)-1 is "leave unchanged" to setresuid: the launcher refuses it whatever the
    Python side let through, before it takes a zygote or makes a cgroup."""
    from agentnode.isolation.task import DATA_DIR, _instance

    launch = Launch.of(Sandbox(), ["true"], env={}, stage=DATA_DIR / "stage", workspace=ws)
    for uid, gid in ((2**32 - 1, 0), (0, 2**32 - 1)):
        with pytest.raises(SandboxError, match="4294967295"):
            _instance().start(launch._replace(uid=uid, gid=gid))


# -- the doors: exec and the daemon, fuzzed -----------------------------------------------------


def _edges(*values: int) -> st.SearchStrategy[int]:
    return st.sampled_from(values)


IDS = st.one_of(
    _edges(0, 1, 1000, 65534, 65535, 65536, 2**31 - 1, 2**31, MAX_ID, MAX_ID + 1, 2**32,
           2**63, 2**64, 2**64 + 1, -1),
    st.integers(-(2**65), 2**65),
)  # fmt: skip
SIZES = st.one_of(
    _edges(
        0,
        1,
        4096,
        MIN_MEMORY - 1,
        MIN_MEMORY,
        64 << 20,
        1 << 30,
        MAX_BYTES,
        MAX_BYTES + 1,
        2**63 - 1,
        2**63,
        2**64,
        -1,
    ),
    st.integers(-(2**65), 2**65),
)
COUNTS = st.one_of(
    _edges(0, 1, 2, 64, MAX_PIDS, MAX_PIDS + 1, 2**31, 2**32, 2**64, 2**64 + 1, -1),
    st.integers(-(2**65), 2**65),
)
#: (text, seconds) of a duration, units included.
DURATIONS = st.tuples(
    st.one_of(_edges(0, 1, 30, 99, 10**6, 10**9, 10**23), st.integers(0, 10**30)),
    st.sampled_from([("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]),
).map(lambda d: (f"{d[0]}{d[1][0]}", d[0] * d[1][1]))
#: One field drawn out of bounds or in them, the others left at their defaults.
DRAWS = st.one_of(
    st.tuples(st.just("user"), st.tuples(IDS, IDS), st.booleans()),
    st.tuples(st.sampled_from(["memory", "memory_high", "swap", "tmp_size"]), SIZES, st.just(0)),
    st.tuples(st.just("pids"), COUNTS, st.just(0)),
    st.tuples(st.just("timeout"), DURATIONS, st.just(0)),
)


def _in_bounds(field: str, value: Any, userns: bool) -> bool:
    if field == "user":
        hi = 65535 if userns else MAX_ID
        return all(0 <= n <= hi for n in value)
    if field == "pids":
        return bool(1 <= value <= MAX_PIDS)
    if field == "timeout":
        return bool(0 < value[1] <= MAX_SECONDS)
    least = {"memory": MIN_MEMORY, "memory_high": MIN_MEMORY, "swap": 0}.get(field, 1)
    return bool(least <= value <= MAX_BYTES)


def _as_text(field: str, value: Any) -> str:
    if field == "user":
        return f"{value[0]}:{value[1]}"
    return str(value[0]) if field == "timeout" else str(value)


def _ids(output: str) -> dict[str, list[int]]:
    """{"Uid": [real, effective, saved, fs], "Gid": [...]} from /proc/self/status lines."""
    out = {}
    for line in output.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid"):
            out[key] = [int(x) for x in rest.split()]
    return out


def _check_identity(output: str, field: str, value: Any, userns: bool) -> None:
    uid, gid = value if field == "user" else (65534, 65534)
    ids = _ids(output)
    if not ids:  # it did not get as far (a pids limit of 1 leaves sh unable to fork grep)
        assert "Uid" not in output, output
        return
    assert ids == {"Uid": [uid] * 4, "Gid": [gid] * 4}, (field, value, userns, output)


@pytest.fixture(scope="module")
def reachable() -> Iterator[Path]:
    """A state dir that every task user can reach: with userns a task's ids are unprivileged
    host ids, which pytest's private (0700) tmp dirs keep out."""
    with public_dir("spec") as root:
        yield root


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@example(draw=("user", (MAX_ID + 1, MAX_ID + 1), False))
@example(draw=("user", (0, MAX_ID + 1), False))
@example(draw=("user", (MAX_ID, MAX_ID), False))
@example(draw=("user", (65536, 0), True))
@example(draw=("pids", 2**64, 0))
@example(draw=("timeout", ("99999999999999999999999h", 99999999999999999999999 * 3600.0), 0))
@given(draw=DRAWS)
def test_exec_either_runs_as_asked_or_refuses_in_one_line(
    draw: tuple[str, Any, bool], reachable: Path
) -> None:
    field, value, userns = draw
    data = Path(tempfile.mkdtemp(dir=reachable))
    data.chmod(0o755)
    option = "--" + field.replace("_", "-")
    # OPTION=VALUE: a value like -1 would otherwise read as an option.
    args = [f"{option}={_as_text(field, value)}", *(["--userns"] if userns else []), "--", *WHO]
    r = subprocess.run(
        [sys.executable, "-m", "agentnode", "exec", *args],
        capture_output=True, text=True, timeout=120,
        env=os.environ | {"AGENTNODE_DATA_DIR": str(data)},
    )  # fmt: skip
    if not _in_bounds(field, value, bool(userns)):
        assert r.returncode == 2 and r.stdout == "", (args, r)
        assert re.fullmatch(rf"agentnode: error: {option} '[^\n]*': [^\n]+\n", r.stderr), r.stderr
        return
    if r.returncode == 1:  # a limit this host cannot enforce (memory.high on cgroup v1)
        assert re.fullmatch(r"agentnode: error: [^\n]*cannot enforce[^\n]*\n", r.stderr), r
        return
    # In bounds: it starts. A tiny limit may then stop it (124 timeout, 250 OOM, 251 pids).
    assert "agentnode: error" not in r.stderr, (args, r.stderr)
    assert r.returncode in (0, 124, 250, 251), (args, r)
    if r.stdout:
        _check_identity(r.stdout, field, value, bool(userns))


@pytest.fixture(scope="module")
def node(reachable: Path) -> Iterator[Daemon]:
    d = Daemon(reachable / "node", "[node]\ngrace = 0.2\n")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _post(d: Daemon, body: dict[str, Any]) -> tuple[int, Any]:
    from agentnode.sdk.transport import UnixHTTPConnection

    conn = UnixHTTPConnection(str(d.socket), timeout=60)
    conn.request("POST", "/v1/tasks", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def _json_value(field: str, value: Any) -> Any:
    if field == "user":
        return f"{value[0]}:{value[1]}"
    return value[0] if field == "timeout" else value


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@example(draw=("user", (MAX_ID + 1, MAX_ID + 1), False))
@example(draw=("user", (MAX_ID, 0), False))
@example(draw=("pids", 2**64, 0))
@example(draw=("memory_high", 2**64, 0))
@example(draw=("tmp_size", 2**64, 0))
@example(draw=("swap", 2**64, 0))
@given(draw=DRAWS)
def test_daemon_either_runs_as_asked_or_refuses_naming_the_field(
    draw: tuple[str, Any, bool], node: Daemon
) -> None:
    field, value, userns = draw
    jvalue = _json_value(field, value)
    body = {"command": WHO, "cpus": 0.1, "memory": "64M", field: jvalue, "userns": bool(userns)}
    status, data = _post(node, body)
    in_bounds = _in_bounds(field, value, bool(userns))
    if field == "memory" and in_bounds:
        in_bounds = value <= node.client.call("GET", "/v1/node")["allocatable_memory_bytes"]
    if not in_bounds:
        assert status == 400 and data["field"] == field, (body, status, data)
        assert "\n" not in data["error"] and data["error"].startswith(field), data
        return
    assert status == 201, (body, status, data)
    task = node.wait(data["id"], timeout=60)
    assert task["state"] in ("succeeded", "failed", "timed_out"), task
    if task["reason"].startswith("did not start"):
        assert "cannot enforce" in task["reason"], task  # memory.high on cgroup v1
    elif output := node.log(task["id"]):
        _check_identity(output, field, value, bool(userns))


@pytest.mark.root
def test_concurrent_submits_mixing_good_and_bad_fail_only_the_bad(node: Daemon) -> None:
    bad: list[dict[str, Any]] = [{"pids": 2**64}, {"memory_high": 2**64}, {"swap": 2**64}, {"tmp_size": 2**64},
           {"user": "4294967295"}, {"timeout": 1e308}, {"cpus": math.nan}, {"timeout": math.inf},
           {"caps": ["CAP_NET_RAW"], "network": "egress"}, {"memory": 1}]  # fmt: skip
    results: list[tuple[int, Any, dict[str, Any]]] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        extra = bad[i % len(bad)] if i % 3 == 0 else {}
        status, data = _post(node, {"command": ["true"], "cpus": 0.1, "memory": "16M", **extra})
        with lock:
            results.append((status, data, extra))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, data, extra in results:
        if extra:
            assert status == 400 and data["field"] == next(iter(extra)), (extra, data)
        else:
            assert status == 201, data
    ended = [node.wait(d["id"], timeout=60) for s, d, _ in results if s == 201]
    assert len(ended) == 40 and all(t["state"] == "succeeded" for t in ended)
    info = node.client.call("GET", "/v1/node")
    assert info["running"] == 0 and info["free_cpu_millis"] == info["allocatable_cpu_millis"]


@pytest.mark.root
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "4294967295"], "--user '4294967295': uid must be from 0 to 4294967294"),
        (["--user", "0:4294967296"], "--user '0:4294967296': gid must be from 0 to 4294967294"),
        (["--pids", str(2**64)], f"--pids '{2**64}': is out of range"),
        (["--memory-high", str(2**64)], f"--memory-high '{2**64}': is too large"),
        (["--timeout", "99999999999999999999999h"], "--timeout '99999999999999999999999h': "),
        (["--cpus", "nan"], "--cpus 'nan': must be a finite number"),
        (["--cpus", "inf"], "--cpus 'inf': must be a finite number"),
        (["--cap-add", "NET_RAW", "--net", "egress"], "--cap-add 'CAP_NET_RAW': a raw or packet"),
        (["--cap-add", "NET_ADMIN", "--allow", "203.0.113.1"], "--cap-add 'CAP_NET_ADMIN'"),
    ],
)
def test_submit_and_exec_give_the_same_one_line_error(args: list[str], message: str) -> None:
    for verb in (["exec"], ["submit", "--socket", "/nonexistent/agentnode.sock"]):
        r = run_cli([*verb, *args, "--", "true"])
        assert r.returncode == 2, (verb, r)
        assert r.stderr.startswith(f"agentnode: error: {message}"), (verb, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr


def test_submit_sends_the_sandbox_json_form(tmp_path: Path) -> None:
    """`submit` and the API take the same form: what the CLI parses is what the node gets."""
    from agentnode.cli import build_parser

    args = build_parser("submit").parse_args(
        ["submit", "--user", "7:8", "--ro", str(tmp_path), "--memory", "1G", "--", "x"]
    )
    box = Sandbox.from_args(args)
    assert (box.uid, box.gid, box.limits.memory) == (7, 8, 1 << 30)
    assert box.mounts == (Mount(str(tmp_path), str(tmp_path)),)
    assert Sandbox.from_json(box.to_json()) == box
