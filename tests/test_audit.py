"""The audit log: its hash chain against edits, deletions and reorders (in copies of a real log),
rotation, crash recovery, group commit; exec tracing of real sandboxed tasks; and a daemon
task's timeline joining states, execs, LLM calls and egress denials in order."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agentnode.audit import AuditLog, verify
from agentnode.audit.execs import ExecTrace
from agentnode.errors import AgentnodeError, AuditError
from agentnode.inference.config import Price
from agentnode.inference.pricing import cost, openai_usage
from agentnode.isolation import spawn
from conftest import run_cli
from support.egress_world import OTHER4, World
from support.node_daemon import daemon

HERE = Path(__file__).parent
REPO = HERE.parent


def _filled(directory: Path, n: int = 20, *, flush_every: int = 0, **kw: Any) -> Path:
    log = AuditLog(directory, **kw)
    for i in range(n):
        log.append({"kind": "exec", "task": f"t{i % 3}", "argv": ["echo", str(i)]})
        if flush_every and i % flush_every == 0:
            log.flush()  # a rotation happens after a write, so write in several
    log.close()
    return directory


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _verify_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(["audit", "verify", str(path)])


@pytest.mark.parametrize(
    "args", [["audit", "verify", "/nonexistent"], ["timeline", "--socket", "/nonexistent", "x"]]
)
def test_audit_commands_stay_light(args: list[str]) -> None:
    """`audit verify` and `timeline` load neither RocksDB, aiohttp nor asyncio."""
    code = (
        "import sys\nfrom agentnode.cli import main\n"
        f"code = main({args!r})\n"
        "print(sorted({m.partition('.')[0] for m in sys.modules} & "
        "{'rocksdict', 'aiohttp', 'asyncio', 'opentelemetry', 'uvloop'}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "[]", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("agentnode: error:"), r.stderr


def test_untouched_log_verifies(tmp_path: Path) -> None:
    d = _filled(tmp_path / "audit")
    ok = verify(d)
    assert (ok.records, ok.first_seq, ok.last_seq, ok.files) == (20, 1, 20, 1)
    r = _verify_cli(d)
    assert r.returncode == 0 and f"records 1-20 in 1 file(s), head {ok.head}" in r.stdout


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        # A field changed: the record's own hash no longer matches it.
        (lambda ls: ls.__setitem__(6, ls[6].replace('"echo"', '"evil"')), "record 7 was altered"),
        # Changed and its hash recomputed: the next record's link breaks.
        ("rehash", "record 7 was rewritten"),
        (lambda ls: ls.pop(6), "record 7 is missing"),
        (lambda ls: ls.insert(7, ls.pop(6)), "record 7 is out of order"),
        (lambda ls: ls.insert(12, ls.pop(6)), "record 7 is out of order"),
        (lambda ls: ls.append(ls[6]), "record 7 is repeated or out of order"),
        (lambda ls: ls.__setitem__(6, ls[6][:40] + "\n"), "not an audit record"),
        (lambda ls: ls.__setitem__(19, ls[19][:-1]), "last line is incomplete"),
    ],
)
def test_verify_names_the_broken_record(tmp_path: Path, tamper: Any, named: str) -> None:
    d = _filled(tmp_path / "audit")
    copy = tmp_path / "copy.log"
    lines = _lines(d / "audit.log")
    if tamper == "rehash":
        lines[6] = _rehashed(lines[6].replace('"echo"', '"evil"'))
    else:
        tamper(lines)
    copy.write_text("".join(lines))
    with pytest.raises(AuditError, match=named):
        verify(copy)
    r = _verify_cli(copy)
    assert r.returncode == 1 and named in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert verify(d).records == 20  # the original is untouched


def _rehashed(line: str) -> str:
    import hashlib

    body = line.rstrip("\n")[:-75] + "}"
    return f'{body[:-1]},"hash":"{hashlib.sha256(body.encode()).hexdigest()}"}}\n'


def test_rotation_continues_the_chain_and_records_the_head(tmp_path: Path) -> None:
    d = _filled(tmp_path / "audit", 400, flush_every=20, max_bytes=8 << 10)
    files = sorted(p.name for p in d.glob("audit*.log"))
    assert len(files) > 3 and files[-1] == "audit.log"
    ok = verify(d)
    assert ok.files == len(files) and ok.first_seq == 1
    records = [json.loads(x) for f in [*files[1:], files[0]] for x in _lines(d / f)]
    rotations = [r for r in records if r["kind"] == "rotate"]
    by_seq = {r["seq"]: r for r in records}
    for r in rotations:
        assert r["head"] == by_seq[r["seq"] - 1]["hash"]
        assert by_seq[r["seq"] + 1]["kind"] == "rotated"
    # Deleting a rotated file is a gap in the chain.
    victim = sorted(d.glob("audit-*.log"))[1]
    first = json.loads(_lines(victim)[0])["seq"]
    victim.unlink()
    with pytest.raises(AuditError, match=f"record {first} is missing"):
        verify(d)


def test_reopen_continues_the_chain_and_drops_a_torn_tail(tmp_path: Path) -> None:
    d = _filled(tmp_path / "audit", 5)
    with (d / "audit.log").open("a") as f:
        f.write('{"kind":"exec","task":"t1","argv":["ha')  # a crash mid-write
    log = AuditLog(d)
    assert log.head[0] == 5
    log.append({"kind": "exec", "task": "t1"})
    log.close()
    assert verify(d).last_seq == 6
    # The index lost its tail (a crash after the log's fsync): reopening rebuilds it.
    shutil.rmtree(d / "index")
    log = AuditLog(d)
    assert [r["seq"] for r in log.task_records("t1")] == [2, 5, 6]
    log.close()


@pytest.mark.parametrize(
    "damage",
    [
        lambda lines: [*lines, "garbage{\n"],  # a whole line that is not JSON
        lambda lines: [*lines, "[1, 2]\n"],  # JSON, not a record
        lambda lines: [*lines, '{"kind":"exec"}\n'],  # a record without its chain fields
        lambda lines: [*lines[:2], "\x00" * 40 + "\n", *lines[2:]],  # zeroed mid-file
    ],
)
def test_a_damaged_log_is_refused_at_open_in_one_line(tmp_path: Path, damage: Any) -> None:
    """The node does not start on a log it cannot continue: one line names the file and
    what to do, never a traceback."""
    d = _filled(tmp_path / "audit", 5)
    live = d / "audit.log"
    live.write_text("".join(damage(_lines(live))))
    shutil.rmtree(d / "index")  # so that opening reads every line again
    with pytest.raises(AuditError) as caught:
        AuditLog(d)
    message = str(caught.value)
    assert "\n" not in message and str(live) in message and "is damaged" in message, message
    assert "agentnode audit verify" in message, message


def test_bad_records_are_refused_with_one_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    with pytest.raises(AuditError, match="needs a 'kind'"):
        log.append({"task": "t"})
    for field in ("seq", "prev", "hash"):
        with pytest.raises(AuditError, match=f"field '{field}' is set by the log"):
            log.append({"kind": "x", field: 1})
    cyclic: dict[str, Any] = {"kind": "tool_call"}
    cyclic["args"] = cyclic
    with pytest.raises(AuditError, match="audit record of kind 'tool_call' is not JSON"):
        log.append(cyclic)
    for bad in ({"n": float("nan")}, {"k": {(1,): 2}}):
        with pytest.raises(AuditError, match="is not JSON"):
            log.append({"kind": "x"} | bad)
    # Values JSON has no type for are kept as text, not dropped.
    log.append({"kind": "x", "task": "t-text", "when": Path("/a"), "raw": b"\x00"})
    log.flush()
    (kept,) = log.task_records("t-text")
    assert kept["when"] == "/a" and kept["raw"] == "b'\\x00'"
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append({"kind": "x"})
    r = _verify_cli(tmp_path / "nothing")
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_tool_call_records_are_taken_from_any_thread_and_indexed(tmp_path: Path) -> None:
    """The tools layer's records (any kind) from many threads: one gapless chain, and each task's
    records come back from the index in order."""
    log = AuditLog(tmp_path / "audit")

    def calls(worker: int) -> None:
        for i in range(500):
            log.append(
                {
                    "kind": "tool_call",
                    "task": f"w{worker}",
                    "tool": "run_code",
                    "args": {"i": i},
                    "args_sha256": "0" * 64,
                    "class": "ok",
                    "duration_ms": 1.5,
                }
            )

    threads = [threading.Thread(target=calls, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.flush()
    for w in range(4):
        assert [r["args"]["i"] for r in log.task_records(f"w{w}")] == list(range(500))
    last = list(log.task_records("w2"))[-1]["seq"]
    assert list(log.task_records("w2", after=last)) == []
    log.close()
    assert verify(tmp_path / "audit").records == 2000


def test_commit_returns_after_fsync_shared_by_waiters(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")

    async def main() -> list[int]:
        return await asyncio.gather(*(log.commit({"kind": "x", "n": i}) for i in range(300)))

    seqs = asyncio.run(main())
    assert sorted(seqs) == list(range(1, 301))
    # Durable: visible in the file without flush or close.
    assert len(_lines(tmp_path / "audit" / "audit.log")) == 300
    log.close()


def test_commits_return_across_rotations(tmp_path: Path) -> None:
    """Records a rotation writes along with its own are reported durable at once (nothing else
    has to come along to release their waiters)."""
    log = AuditLog(tmp_path / "audit", max_bytes=2048)

    async def writer(k: int) -> None:
        for i in range(40):
            await log.commit({"kind": "x", "task": f"t{k}", "n": i})

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(writer(k) for k in range(16))), 30)

    asyncio.run(main())
    log.close()
    ok = verify(tmp_path / "audit")
    assert ok.files > 2 and ok.records == 640 + 2 * (ok.files - 1)


def test_a_burst_shares_one_fsync_and_each_record_is_written_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: every record is in the file when `append` returns (before any fsync);
    the records of a burst from several threads share a handful of fsyncs and index writes,
    stay one gapless chain, and each task's come back from the index in order."""
    import agentnode.audit.log as audit_log

    synced: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(audit_log, "SYNC_INTERVAL", 0.5)
    monkeypatch.setattr(os, "fdatasync", counted)
    log = AuditLog(tmp_path / "audit")
    live = tmp_path / "audit" / "audit.log"
    seq = log.append({"kind": "llm_call", "task": "w0", "n": -1})
    assert json.loads(_lines(live)[-1])["seq"] == seq and not synced  # written, not synced

    def calls(worker: int) -> None:
        for i in range(250):
            log.append({"kind": "llm_call", "task": f"w{worker}", "n": i})

    threads = [threading.Thread(target=calls, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_lines(live)) == 1001
    log.flush()
    assert 1 <= len(synced) <= 3, f"{len(synced)} fsyncs for one burst"
    for w in range(4):
        assert [r["n"] for r in log.task_records(f"w{w}")] == [-1] * (w == 0) + list(range(250))
    log.close()
    assert verify(tmp_path / "audit").records == 1001


def test_commit_and_flush_do_not_wait_out_the_sync_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agentnode.audit.log as audit_log

    monkeypatch.setattr(audit_log, "SYNC_INTERVAL", 30.0)
    log = AuditLog(tmp_path / "audit")
    t0 = time.monotonic()
    log.append({"kind": "x", "task": "t"})
    log.flush()
    assert [r["kind"] for r in log.task_records("t")] == ["x"]
    asyncio.run(log.commit({"kind": "y"}))
    assert time.monotonic() - t0 < 5
    log.close()


APPENDER = """
import sys, time
import agentnode.audit.log as audit_log
audit_log.SYNC_INTERVAL = float(sys.argv[2])
log = audit_log.AuditLog(audit_log.Path(sys.argv[1]))
i = 0
while True:
    i += 1
    seq = log.append({"kind": "llm_call", "task": f"t{i % 3}", "n": i})
    print(seq, flush=True)  # answered: the caller was told
    if i % 7 == 0:
        time.sleep(0.001)
"""


@pytest.mark.parametrize("interval", [0.05, 60.0])
def test_kill_9_loses_no_record_append_returned(tmp_path: Path, interval: float) -> None:
    """A node killed (SIGKILL) mid-burst keeps every record whose `append` had returned, even
    with none of them fsynced yet (interval 60 s); reopened, the chain verifies, continues, and
    the index holds them all."""
    d = tmp_path / "audit"
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    told: list[int] = []
    for _ in range(2):  # the second run appends to what the first left
        p = subprocess.Popen([sys.executable, "-c", APPENDER, str(d), str(interval)],
                             stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        assert p.stdout is not None
        deadline = time.monotonic() + 30
        run: list[int] = []
        while len(run) < 3000 + random.randint(0, 500):
            line = p.stdout.readline()
            assert line and time.monotonic() < deadline, "the appender stopped"
            run.append(int(line))
        p.kill()
        p.wait(10)
        p.stdout.close()
        # Each run goes on from the last record the one before wrote (told or not).
        assert run == list(range(run[0], run[0] + len(run))) and run[0] > (told or [0])[-1]
        told += run
    ok = verify(d)  # gapless from 1: every record told is in it
    assert ok.first_seq == 1 and ok.last_seq >= told[-1]
    log = AuditLog(d)
    try:
        indexed = sorted(r["seq"] for t in ("t0", "t1", "t2") for r in log.task_records(t))
        assert indexed == list(range(1, ok.last_seq + 1))
        assert log.append({"kind": "x"}) == ok.last_seq + 1
    finally:
        log.close()
    assert verify(d).last_seq == ok.last_seq + 1


@pytest.mark.root
def test_kill_9_of_the_node_keeps_every_answered_llm_calls_record(tmp_path: Path) -> None:
    """An LLM call's record is written before its answer leaves: the node killed (SIGKILL) the
    moment the last answer arrived still has every call's record, in a chain that verifies."""
    import httpx

    from agentnode.inference.mock import MockUpstream

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    mock = asyncio.run_coroutine_threadsafe(MockUpstream("openai").start(), loop).result(30)
    port = random.randint(20000, 30000)
    bridge = f"agentnodea{random.randint(0, 99999)}"
    config = (
        f'[network]\nbridge = "{bridge}"\n'
        f'subnet = "10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"\n'
        f'[inference]\nlisten = "127.0.0.1:{port}"\n'
        f'[inference.deployments.mock]\nkind = "openai"\nbase_url = "{mock.base_url}"\n'
        'models = ["m"]\nprice = { input = 2.5, output = 10 }\n'
        '[inference.tenants.acme]\napi_keys = ["k-acme"]\n'
    )
    try:
        with daemon(tmp_path / "node", config) as d:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            with httpx.Client(headers={"Authorization": "Bearer k-acme"}) as client:
                for i in range(20):
                    r = client.post(url, json=body | {"stream": i % 2 == 1})
                    assert r.status_code == 200, r.text
            d.stop(signal.SIGKILL)
            log = d.data / "audit"
            calls = [json.loads(line) for line in (log / "audit.log").read_text().splitlines()]
            calls = [c for c in calls if c["kind"] == "llm_call"]
            assert len(calls) == 20 and all(c["tenant"] == "acme" for c in calls)
            assert [c["stream"] for c in calls] == [i % 2 == 1 for i in range(20)]
            assert verify(log).records >= 20
            d.start()  # the next node takes over what the killed one left (its bridge)
        assert not Path(f"/sys/class/net/{bridge}").exists(), "the node's bridge is removed"
    finally:
        asyncio.run_coroutine_threadsafe(mock.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.root
def test_exec_trace_records_every_exec_with_argv(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = []
    trace = ExecTrace.for_instance(sink=records.append)
    try:
        task = spawn(["sh", "-c", "ls / >/dev/null; cat /etc/hostname; /bin/true a 'b c'"])
        assert task.cgroup_dir is not None
        trace.watch(task.cgroup_dir, task="t-sh", tenant="acme")
        assert task.wait(30) is not None
        # Not ours: a process outside every task is not traced.
        subprocess.run(["true", "outside"], check=True)
        time.sleep(0.05)
        trace.forget("t-sh")
    finally:
        trace.close()
    ours = [r for r in records if r["kind"] == "exec"]
    assert [r["argv"] for r in ours] == [
        ["sh", "-c", "ls / >/dev/null; cat /etc/hostname; /bin/true a 'b c'"],
        ["ls", "/"],
        ["cat", "/etc/hostname"],
        ["/bin/true", "a", "b c"],
    ]
    assert {r["task"] for r in ours} == {"t-sh"} and {r["tenant"] for r in ours} == {"acme"}
    sh = ours[0]
    assert sh["filename"].endswith("/sh") and sh["uid"] == 65534
    assert all(r["ppid"] == sh["pid"] for r in ours[1:])
    assert not any("outside" in r["argv"] for r in records)


@pytest.mark.root
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        # exec replacing the shell, no fork
        (["sh", "-c", "exec /bin/echo replaced"], ["/bin/echo", "replaced"]),
        # fexecve (execveat on an fd): the kernel names the file /dev/fd/N
        (
            ["python3", "-c", "import os; fd = os.open('/bin/echo', os.O_RDONLY); "
             "os.execve(fd, ['echo', 'by-fd'], {})"],
            ["echo", "by-fd"],
        ),
        # a #! script: the kernel runs the interpreter with the script as its argument
        (["sh", "-c", "printf '#!/bin/sh\\necho s\\n' > /tmp/s; chmod +x /tmp/s; /tmp/s arg"],
         ["/bin/sh", "/tmp/s", "arg"]),
    ],
)  # fmt: skip
def test_exec_trace_sees_every_way_to_exec(command: list[str], expected: list[str]) -> None:
    records: list[dict[str, Any]] = []
    trace = ExecTrace.for_instance(sink=records.append)
    try:
        task = spawn(command)
        assert task.cgroup_dir is not None
        trace.watch(task.cgroup_dir, task="t-way", tenant="acme")
        assert task.wait(30) is not None and task.result is not None
        assert task.result.code == 0, task.result
        trace.forget("t-way")
    finally:
        trace.close()
    argvs = [r["argv"] for r in records if r.get("task") == "t-way"]
    assert argvs[0] == command and expected in argvs, argvs


@pytest.mark.root
def test_exec_trace_keeps_order_when_events_came_before_the_task_was_named() -> None:
    """The node's loop reads events while a spawn is in flight: those wait, unnamed, and come
    out before the ones read after the task is named."""
    records: list[dict[str, Any]] = []
    trace = ExecTrace.for_instance(sink=records.append)
    try:
        task = spawn(["sh", "-c", "/bin/true 1; sleep 0.3; /bin/true 2; /bin/true 3"])
        assert task.cgroup_dir is not None
        time.sleep(0.15)
        trace.poll()  # reads sh and `true 1`, not yet anyone's
        assert records == []
        time.sleep(0.4)  # `true 2` and `true 3` wait in the ring buffer
        trace.watch(task.cgroup_dir, task="t-order", tenant="acme")
        task.wait(30)
        trace.forget("t-order")
    finally:
        trace.close()
    argvs = [r["argv"][1:] for r in records if r.get("task") == "t-order"]
    assert argvs == [["-c", "/bin/true 1; sleep 0.3; /bin/true 2; /bin/true 3"], ["1"],
                     ["0.3"], ["2"], ["3"]]  # fmt: skip


@pytest.mark.root
def test_exec_trace_cuts_argv_at_256_bytes() -> None:
    records: list[dict[str, Any]] = []
    trace = ExecTrace.for_instance(sink=records.append)
    try:
        task = spawn(["/bin/true", "x" * 300, "tail"])
        assert task.cgroup_dir is not None
        trace.watch(task.cgroup_dir, task="t-long", tenant="acme")
        task.wait(30)
        trace.forget("t-long")
    finally:
        trace.close()
    (r,) = (r for r in records if r.get("task") == "t-long")
    assert r["argv_truncated"] and r["argv"] == ["/bin/true", "x" * (256 - len("/bin/true") - 1)]


MOCK_UPSTREAM = """
import asyncio
from agentnode.inference.mock import MockUpstream

async def main():
    mock = await MockUpstream("openai").start()
    print(mock.base_url, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

AGENT = """
import json, os, socket, subprocess, time, urllib.request

def chat(text):
    req = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions",
        data=json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": text}]}).encode(),
        headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                 "Content-Type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req))["usage"]

async def mcp_call():
    from agentnode.sdk import Tools
    async with Tools.mcp_client() as client:
        result = await client.call_tool("run_code", {"code": "print(6 * 7)"})
        return result.meta["agentnode"]["class"]

subprocess.run(["sh", "-c", "ls / >/dev/null; cat /etc/hostname"], check=True)
first = chat("hello")
time.sleep(0.3)
# Two tools: one through the node's MCP endpoint, one through /v1/tools (fails: no such file).
import asyncio
from agentnode.sdk import Tools
tools = [asyncio.run(mcp_call())]
time.sleep(0.3)
try:
    socket.create_connection((%r, 8080), timeout=2)
except OSError as e:
    denied = e.errno
time.sleep(0.3)
tools.append(Tools().call("read_file", {"path": "missing.txt"})["_meta"]["agentnode"]["class"])
time.sleep(0.3)
second = chat("hello again, a longer question this time")

# Its own timeline, through the task socket with its own token; another tenant's task is refused.
from agentnode.sdk.transport import connect
conn, _ = connect(os.environ["AGENTNODE_URL"], timeout=10)
def timeline(task):
    conn.request("GET", f"/v1/tasks/{task}/timeline",
                 headers={"Authorization": "Bearer " + os.environ["AGENTNODE_TOKEN"]})
    r = conn.getresponse()
    return r.status, json.loads(r.read())
own = timeline(os.environ["AGENTNODE_TASK_ID"])
other = timeline(os.environ["OTHER_TASK"])
print(json.dumps({"usage": [first, second], "denied": denied, "tools": tools, "own": own[0],
                  "own_kinds": sorted({e["kind"] for e in own[1]}), "other": other[0],
                  "other_body": other[1]}))
"""


@pytest.mark.root
def test_daemon_task_timeline_joins_everything_in_order(tmp_path: Path) -> None:
    """A daemon task runs `sh -c 'ls; cat'`, calls the proxy (mock upstream), is denied one
    connection and calls again: its timeline (API and CLI) holds its states, every exec with its
    argv, both LLM calls priced from the ledger and the denial, in order; the log verifies."""
    with World() as world:
        env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
        netns = ("nsenter", f"--net=/run/netns/{world.task}")
        mock = subprocess.Popen(
            [*netns, sys.executable, "-c", MOCK_UPSTREAM], stdout=subprocess.PIPE, text=True,
            env=env,
        )  # fmt: skip
        spans_file = tmp_path / "spans.jsonl"
        receiver = subprocess.Popen(
            [*netns, sys.executable, str(HERE / "support" / "otlp_receiver.py"), str(spans_file)],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            assert mock.stdout is not None and receiver.stdout is not None
            base_url = mock.stdout.readline().strip()
            otlp = receiver.stdout.readline().strip()
            config = (
                f'[telemetry]\notlp_endpoint = "{otlp}"\n'
                f'[network]\nsubnet = "10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"\n'
                f'[inference]\nlisten = "127.0.0.1:{random.randint(20000, 30000)}"\n'
                f'[inference.deployments.gpt]\nkind = "openai"\nbase_url = "{base_url}"\n'
                'models = ["gpt-test"]\n'
                "price = { input = 2.5, cached_input = 1.25, output = 10, reasoning = 20 }\n"
            )
            with daemon(tmp_path, config, netns) as d:
                other = d.submit(["true"], tenant="globex")
                task = d.submit(
                    [sys.executable, "-c", AGENT % OTHER4],
                    tenant="acme", network="egress", memory="256M", user="0",
                    ro=[str(REPO)],
                    env={"PYTHONPATH": str(REPO / "python"), "OTHER_TASK": other["id"]},
                )  # fmt: skip
                done = d.wait(task["id"], timeout=60)
                out = d.log(task["id"])
                assert done["state"] == "succeeded", (done["reason"], out)
                result = json.loads(out.splitlines()[-1])
                timeline = d.client.call("GET", f"/v1/tasks/{task['id']}/timeline")
                cli = run_cli(["timeline", task["id"], "--json", "--socket", str(d.socket)])
                human = run_cli(["timeline", task["id"], "--socket", str(d.socket)])
                follow = run_cli(
                    ["timeline", task["id"], "-f", "--json", "--socket", str(d.socket)]
                )
                with pytest.raises(AgentnodeError, match="after: must be a record seq"):
                    d.client.call("GET", f"/v1/tasks/{task['id']}/timeline?after=x")
            # The daemon has stopped: its exporter flushed every span.
            spans = [json.loads(x) for x in spans_file.read_text().splitlines()]
        finally:
            for p in (mock, receiver):
                p.kill()
                p.communicate()
    assert result["own"] == 200 and {"state", "exec", "llm_call"} <= set(result["own_kinds"])
    assert result["other"] == 403 and "not " + other["id"] in result["other_body"]["error"]
    assert [json.loads(x) for x in cli.stdout.splitlines()] == timeline
    assert [json.loads(x) for x in follow.stdout.splitlines()] == timeline
    assert human.returncode == 0 and "llm_call" in human.stdout and "$" in human.stdout
    seqs = [e["seq"] for e in timeline]
    assert seqs == sorted(seqs) and all(e["task"] == task["id"] for e in timeline)
    kinds = [e["kind"] for e in timeline]
    states = [e["state"] for e in timeline if e["kind"] == "state"]
    assert states == ["queued", "starting", "running", "succeeded"]
    argvs = [e["argv"] for e in timeline if e["kind"] == "exec"]
    assert ["sh", "-c", "ls / >/dev/null; cat /etc/hostname"] in argvs
    assert ["ls", "/"] in argvs and ["cat", "/etc/hostname"] in argvs
    assert argvs[0][0] == sys.executable
    # The calls and the denial in the order they happened, between the running and end states.
    middle = [k for k in kinds if k in ("llm_call", "egress_denied", "tool_call", "state")]
    assert middle == ["state"] * 3 + [
        "llm_call", "tool_call", "egress_denied", "tool_call", "llm_call", "state"
    ]  # fmt: skip
    tools = [e for e in timeline if e["kind"] == "tool_call"]
    assert [(e["tool"], e["class"]) for e in tools] == list(
        zip(["run_code", "read_file"], result["tools"], strict=True)
    )
    assert result["tools"][0] == "ok" and result["tools"][1] != "ok"
    calls = [e for e in timeline if e["kind"] == "llm_call"]
    price = Price(
        input=Decimal("2.5"),
        cached_input=Decimal("1.25"),
        output=Decimal(10),
        reasoning=Decimal(20),
    )
    for call, usage in zip(calls, result["usage"], strict=True):
        buckets = openai_usage(usage)
        assert {b: call[b] for b in buckets.as_dict()} == buckets.as_dict()
        assert buckets.cached_input and buckets.reasoning, "the mock reports every bucket"
        assert Decimal(call["cost"]) == cost(buckets, price) > 0
        assert call["model"] == "gpt-test" and call["tenant"] == "acme"
        assert call["latency_ms"] > 0 and call["status"] == 200
    (denial,) = (e for e in timeline if e["kind"] == "egress_denied")
    assert denial["address"] == OTHER4 and denial["port"] == 8080
    assert verify(tmp_path / "data" / "audit").records >= len(timeline)
    _check_spans(spans, task["id"], calls, timeline)
    _check_tool_spans(spans, task["id"], tools)


def _check_tool_spans(
    spans: list[dict[str, Any]], task_id: str, tools: list[dict[str, Any]]
) -> None:
    """An `execute_tool {name}` child of the task's `invoke_agent` span per tool call (in the
    same trace as its `chat` spans), spanning the call, with the GenAI attribute names, and an
    error status naming the class of a failed call."""
    (root,) = (
        s for s in spans
        if s["name"] == "invoke_agent" and s["attributes"]["gen_ai.agent.id"] == task_id
    )  # fmt: skip
    executed = sorted(
        (s for s in spans if s["name"].startswith("execute_tool ")),
        key=lambda s: int(s["startTimeUnixNano"]),
    )
    assert [s["name"] for s in executed] == [f"execute_tool {e['tool']}" for e in tools]
    for span, call in zip(executed, tools, strict=True):
        assert span["traceId"] == root["traceId"] and span["parentSpanId"] == root["spanId"]
        a = span["attributes"]
        assert a["gen_ai.operation.name"] == "execute_tool"
        assert a["gen_ai.tool.name"] == call["tool"]
        assert a["agentnode.tool.class"] == call["class"]
        took = int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])
        assert abs(took - call["duration_ms"] * 1e6) < 1e3
        assert int(span["endTimeUnixNano"]) == int(call["time"] * 1e9)
        failed = span.get("status", {}).get("code") == "STATUS_CODE_ERROR"
        assert failed == (call["class"] != "ok")
        assert a.get("error.type") == (None if call["class"] == "ok" else call["class"])
    chats = [s for s in spans if s["name"].startswith("chat ")]
    assert chats and all(s["traceId"] == root["traceId"] for s in chats)


def _check_spans(
    spans: list[dict[str, Any]], task_id: str, calls: list[dict[str, Any]],
    timeline: list[dict[str, Any]],
) -> None:  # fmt: skip
    """The OTLP export: one `invoke_agent` span for the task with `chat {model}` children that
    carry the GenAI attribute names, and the execs and the denial as its events."""
    agents = [s for s in spans if s["name"] == "invoke_agent"]
    (root,) = (s for s in agents if s["attributes"]["gen_ai.agent.id"] == task_id)
    assert len(agents) == 2 and len({s["traceId"] for s in agents}) == 2, "a trace per task"
    assert root["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert root["attributes"]["agentnode.task.id"] == task_id
    chats = [s for s in spans if s["name"] == "chat gpt-test"]
    assert len(chats) == len(calls) == 2
    for span, call in zip(sorted(chats, key=lambda s: int(s["startTimeUnixNano"])), calls,
                          strict=True):  # fmt: skip
        assert span["traceId"] == root["traceId"] and span["parentSpanId"] == root["spanId"]
        a = span["attributes"]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "gpt-test"
        assert a["gen_ai.usage.input_tokens"] == call["input"] + call["cached_input"]
        assert a["gen_ai.usage.output_tokens"] == call["output"] + call["reasoning"]
        assert a["gen_ai.usage.cache_read.input_tokens"] == call["cached_input"]
        assert a["agentnode.cost_usd"] == call["cost"]
        took = int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])
        assert abs(took - call["latency_ms"] * 1e6) < 1e3
    names = [e["name"] for e in root.get("events", [])]
    assert names.count("exec") == sum(1 for e in timeline if e["kind"] == "exec")
    assert "egress_denied" in names and "state succeeded" in names


CHECKPOINTER = """
from agentnode.sdk import ThisTask
ThisTask().save_checkpoint(b"x" * 1000)
"""


@pytest.mark.root
def test_daemon_timeline_holds_limit_kills_and_checkpoints(tmp_path: Path) -> None:
    """A task killed at its memory limit has an `oom` record, one stopped at its pids limit a
    `pids_limit` record (each with the limit), one that saves a checkpoint a `checkpoint`
    record with its size; each before the task's end state."""
    with daemon(tmp_path) as d:
        hog = d.submit([sys.executable, "-c", "x = bytearray(512 << 20)"], memory="64M",
                       user="0", ro=[str(REPO)])  # fmt: skip
        bomb = d.submit(["sh", "-c", "while :; do sleep 5 & done"], pids=16, timeout="20s")
        saver = d.submit([sys.executable, "-c", CHECKPOINTER], user="0", memory="256M",
                         ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")})  # fmt: skip
        ended = {t["id"]: d.wait(t["id"], timeout=60) for t in (hog, bomb, saver)}
        timelines = {t: d.client.call("GET", f"/v1/tasks/{t}/timeline") for t in ended}
    assert ended[saver["id"]]["state"] == "succeeded", d.log(saver["id"])

    def only(task: str, kind: str) -> dict[str, Any]:
        entry: dict[str, Any]
        (entry,) = (e for e in timelines[task] if e["kind"] == kind)
        last = timelines[task][-1]
        assert last["kind"] == "state" and entry["seq"] < last["seq"]
        return entry

    assert only(hog["id"], "oom")["limit"] == 64 << 20
    assert only(bomb["id"], "pids_limit")["limit"] == 16
    assert only(saver["id"], "checkpoint")["bytes"] == 1000
    assert ended[hog["id"]]["state"] != "succeeded" != ended[bomb["id"]]["state"]
