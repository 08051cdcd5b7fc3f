"""The node survives what one task or one client does: a task whose start raises, a poison
record across restarts, forged or stale credentials, a client that leaves, a stall, a full disk.

Real daemons (`agentnode run` subprocesses) on private data dirs; bad records are written into
the task store the way an older version or a missed check would have left them."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Options, Rdict

from agentnode.isolation import USERNS_BASE
from agentnode.isolation.spec import Limits, Sandbox
from agentnode.sdk.transport import UnixHTTPConnection
from agentnode.tasks import TaskStore
from agentnode.tasks.model import State, Task, TaskSpec
from conftest import processes_with, public_dir, run_cli
from support.egress_world import World
from support.node_daemon import Daemon, daemon
from test_egress_tasks import subnet
from test_node import call, in_parallel

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.root, pytest.mark.slow]


def forged(spec: TaskSpec, **fields: Any) -> TaskSpec:
    """`spec` with sandbox `fields` set past their checks: what a check that missed a case lets
    through (`user` is `UID[:GID]`; limits go to the sandbox's limits)."""
    sandbox = spec.sandbox
    for name, value in fields.items():
        if name == "user":
            uid, _, gid = value.partition(":")
            object.__setattr__(sandbox, "uid", int(uid))
            object.__setattr__(sandbox, "gid", int(gid or uid))
        elif hasattr(sandbox.limits, name):
            object.__setattr__(sandbox.limits, name, value)
        else:
            object.__setattr__(sandbox, name, value)
    return spec


def seed(data: Path, *specs: TaskSpec, state: State = State.QUEUED) -> list[str]:
    """Writes tasks straight into a stopped node's store, in `state`; returns their ids."""
    store = TaskStore(data / "tasks")
    ids = []
    tasks = []
    now = time.time()
    for spec in specs:
        history = [(State.QUEUED.value, now)]
        if state is not State.QUEUED:
            history.append((state.value, now))
        t = Task(id=uuid.uuid4().hex, seq=store.next_seq(), spec=spec, state=state,
                 history=tuple(history))  # fmt: skip
        ids.append(t.id)
        tasks.append(t)
    store.put_now(*tasks)
    store.close()
    return ids


def small(command: list[str], **fields: Any) -> TaskSpec:
    sandbox = Sandbox(limits=Limits(cpus=0.1, memory=32 << 20))
    return TaskSpec(tenant="t", command=tuple(command), sandbox=sandbox, **fields)


def failed_or_unreadable(d: Daemon, task_id: str) -> str:
    """A poison task ends failed with the reason it did not start; a record no version's checks
    can read any more is refused when shown (it never starts either)."""
    from agentnode.errors import AgentnodeError

    try:
        task = d.wait(task_id, timeout=30)
    except AgentnodeError as e:
        return f"unreadable: {e}"
    assert task["state"] == "failed", task
    assert task["reason"].startswith("did not start: "), task["reason"]
    assert "\n" not in task["reason"]
    return str(task["reason"])


def test_a_task_whose_start_raises_fails_alone_and_never_wedges_the_loop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = [small(["sh", "-c", f"echo ok{i}"]) for i in range(3)]
    poison = [
        forged(small(["true"]), user="4294967296"),  # OverflowError in the id switch
        forged(small(["true"]), user="1:99999999999999999999"),
        forged(small(["true"]), pids=2**63),  # the kernel refuses it: CgroupError
        forged(small(["true"]), rootfs=str(tmp_path / "gone")),  # no such root
    ]
    mixed = [good[0], *poison[:2], good[1], *poison[2:], good[2]]
    ids = seed(data, *mixed)
    # Its log path taken by a directory: an OSError no check of the spec could catch.
    odd = seed(data, small(["true"]))[0]
    (data / "logs").mkdir(parents=True)
    (data / "logs" / f"{odd}.1.log").mkdir()
    # A queued record whose body no version can decode (its header is fine).
    damaged = seed(data, small(["true"]))[0]
    db = Rdict(str(data / "tasks" / "db"), Options(raw_mode=True))
    record = db[b"t/" + damaged.encode()]
    assert isinstance(record, bytes)
    db[b"t/" + damaged.encode()] = record[: -len(record) // 2] + b"\xc1" * 8
    db.close()
    # A poison task that was starting when the last node died: lost, retried, fails again.
    restarted = seed(data, forged(small(["true"], retries=1), user="4294967296"),
                     state=State.STARTING)[0]  # fmt: skip
    with daemon(tmp_path) as d:
        for i, spec in zip(ids, mixed, strict=True):
            if spec in good:
                assert d.wait(i)["state"] == "succeeded"
            else:
                failed_or_unreadable(d, i)
        reason = failed_or_unreadable(d, odd)
        assert "IsADirectoryError" in reason or "Is a directory" in reason, reason
        failed_or_unreadable(d, restarted)
        assert failed_or_unreadable(d, damaged).startswith("unreadable: "), "never started"
        assert any(f"task {damaged} cannot be started" in line for line in d.lines), d.lines
        after = d.submit(["true"])
        assert d.wait(after["id"])["state"] == "succeeded", "the loop still starts tasks"
        assert d.client.call("GET", "/healthz")["ok"] is True
        assert not any("Traceback" in line for line in d.lines), d.lines
    # The poison records are still there after a restart: nothing wedges on them.
    with daemon(tmp_path) as d:
        task = d.submit(["true"])
        assert d.wait(task["id"])["state"] == "succeeded"
        assert d.client.call("GET", "/healthz")["scheduler"] == "ok"
        ps = d.client.call("GET", "/v1/tasks?all=1")
        assert task["id"] in {t["id"] for t in ps}


# -- credentials: the node's inference proxy and its task tokens ---------------------------------

MOCKS = """
import asyncio
from agentnode.inference.mock import MockUpstream

async def main():
    a = await MockUpstream("openai").start()
    c = await MockUpstream("anthropic").start()
    print(a.base_url, c.base_url, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

#: Run in the daemon's netns: each probe's (status, JSON body or error), one JSON line.
PROBE = """
import json, sys
import anthropic, httpx, openai

url, probes = sys.argv[1], json.loads(sys.argv[2])
MSG = [{"role": "user", "content": "hi"}]
out = []
for p in probes:
    headers = p.get("headers", {})
    try:
        if p["kind"] == "openai":
            c = openai.OpenAI(base_url=url + "/v1", api_key=p["key"], default_headers=headers,
                              max_retries=0)
            r = c.chat.completions.create(model="gpt-test", messages=MSG)
            out.append([200, r.choices[0].message.content])
        elif p["kind"] == "anthropic":
            c = anthropic.Anthropic(base_url=url, api_key=p["key"], default_headers=headers,
                                    max_retries=0)
            r = c.messages.create(model="claude-test", max_tokens=5, messages=MSG)
            out.append([200, r.content[0].text])
        else:
            r = httpx.request(p["method"], url + p["path"], headers=headers,
                              content=p.get("body", "").encode())
            try:
                body = r.json()
            except ValueError:
                body = {"not_json": r.text}
            out.append([r.status_code, body])
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        out.append([e.status_code, str(e)])
print(json.dumps(out))
"""


def _probe(world: Any, url: str, probes: list[dict[str, Any]]) -> list[list[Any]]:
    r = subprocess.run(
        ["nsenter", f"--net=/run/netns/{world.task}", sys.executable, "-c", PROBE, url,
         json.dumps(probes)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "python")},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: list[list[Any]] = json.loads(r.stdout.splitlines()[-1])
    return out


def _token(d: Daemon, task_id: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            line = d.log(task_id).strip()
            if line:
                return line
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} printed no token")


def raw(method: str, path: str, key: str | None = None, **headers: str) -> dict[str, Any]:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return {"kind": "raw", "method": method, "path": path, "headers": headers}


def test_the_node_proxy_needs_a_live_credential_on_every_route(tmp_path: Path) -> None:
    """With [inference] and no tenants, nothing is readable or billable without a running task's
    token; a token bills only its own task whatever header names another; an ended task's token
    is dead; every refusal is the provider's JSON."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    with World() as world:
        netns = ("nsenter", f"--net=/run/netns/{world.task}")
        mocks = subprocess.Popen([*netns, sys.executable, "-c", MOCKS], stdout=subprocess.PIPE,
                                 text=True, env=env)  # fmt: skip
        try:
            assert mocks.stdout is not None
            gpt, claude = mocks.stdout.readline().split()
            port = random.randint(20000, 30000)
            config = (
                f'[network]\nsubnet = "{subnet()}"\n'
                f'[inference]\nlisten = "127.0.0.1:{port}"\n'
                f'[inference.deployments.gpt]\nkind = "openai"\nbase_url = "{gpt}"\n'
                'models = ["gpt-test"]\nprice = { input = 2.5, output = 10 }\n'
                f'[inference.deployments.claude]\nkind = "anthropic"\nbase_url = "{claude}"\n'
                'models = ["claude-test"]\nprice = { input = 3, output = 15 }\n'
            )
            with daemon(tmp_path, config, netns) as d:
                _proxy_probes(d, world, f"http://127.0.0.1:{port}")
        finally:
            mocks.kill()
            mocks.communicate()


def _proxy_probes(d: Daemon, world: Any, url: str) -> None:
    print_token = ["sh", "-c", "echo $AGENTNODE_TOKEN; exec sleep 60"]
    a = d.submit(print_token, tenant="acme", network="egress")
    b = d.submit(print_token, tenant="globex", network="egress")
    c = d.submit(print_token, tenant="acme", network="egress")
    ta, tb, tc = _token(d, a["id"]), _token(d, b["id"]), _token(d, c["id"])
    forged = f"{a['id']}.1.{'0' * 64}"
    chat = '{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'
    results = _probe(world, url, [
        raw("GET", "/v1/usage"),
        raw("GET", "/v1/usage", "sk-bogus"),
        raw("GET", "/v1/usage", forged),
        raw("GET", "/v1/usage?group_by=task", None, **{"x-api-key": "nope"}),
        {**raw("POST", "/v1/chat/completions", None, **{"x-agentnode-task": b["id"]}),
         "body": chat},
        raw("GET", "/v1/models"),
        raw("GET", "/metrics"),
        raw("GET", "/v1/nothing-here"),
        {"kind": "openai", "key": "sk-bogus"},
        {"kind": "anthropic", "key": "sk-bogus"},
        {"kind": "openai", "key": ta, "headers": {"x-agentnode-task": b["id"]}},
        {"kind": "anthropic", "key": ta, "headers": {"x-agentnode-task": b["id"]}},
        raw("GET", "/v1/usage?group_by=tenant,task", ta),
        raw("GET", "/v1/usage?group_by=tenant,task", tb),
        raw("GET", "/metrics", ta),
        raw("GET", "/v1/models", ta),
        raw("GET", "/v1/nothing-here", ta),
        raw("DELETE", "/v1/usage", ta),
        raw("GET", "/v1/usage?group_by=tenant,task", tc),
        raw("GET", f"/v1/usage?group_by=task&task={a['id']}", tc),
        raw("GET", f"/v1/usage?task={a['id']}", None,
            **{"x-api-key": tc, "anthropic-version": "2023-06-01"}),
    ])  # fmt: skip
    *refused, models, metrics, nowhere, sdk_o, sdk_a = results[:10]
    for status, body in [*refused, models, metrics, nowhere]:
        assert status == 401, (status, body)
        assert body["error"]["code"] == "invalid_api_key", body
    for status, text in (sdk_o, sdk_a):
        assert status == 401 and "unknown API key" in text, text
    (o_status, _), (a_status, _) = results[10:12]
    assert o_status == 200 and a_status == 200, results[10:12]
    (ua, rows_a), (ub, rows_b) = results[12:14]
    assert ua == 200 and ub == 200
    assert [(r["tenant"], r["task"], r["requests"]) for r in rows_a["data"]] == [
        ("acme", a["id"], 2)
    ], "the token's own task was billed, not the one the header named"
    assert rows_b["data"] == [], "another tenant's task sees none of acme's spend"
    (m_status, m_body), (l_status, l_body), (n_status, n_body), (x_status, x_body) = results[14:18]
    assert m_status == 403 and "every tenant" in m_body["error"]["message"]
    assert l_status == 200 and l_body["data"]
    assert n_status == 404 and n_body["error"]["code"] == "not_found", n_body
    assert x_status == 405 and x_body["error"]["code"] == "method_not_allowed", x_body
    # A sibling task of the same tenant sees neither a's spend nor, by naming it, a's rows.
    (sib, sib_rows), (named, named_body), (named_a, named_a_body) = results[18:]
    assert sib == 200 and sib_rows["data"] == [], sib_rows
    assert named == 403 and "own task" in named_body["error"]["message"], named_body
    assert named_a == 403 and named_a_body["type"] == "error", named_a_body
    # Revoked with its task: the same token is refused once the task has ended.
    d.client.call("POST", f"/v1/tasks/{a['id']}/cancel")
    d.wait(a["id"])
    after = _probe(world, url, [raw("GET", "/v1/usage", ta), {"kind": "openai", "key": ta}])
    assert [s for s, _ in after] == [401, 401], after


#: A task as an unprivileged user: the node's task socket through the system Python's stdlib.
ASK = """
import http.client, os, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(os.environ["AGENTNODE_URL"][len("unix://"):])
c = Conn("localhost")
c.request("GET", "/v1/tasks/" + os.environ["AGENTNODE_TASK_ID"],
          headers={"Authorization": "Bearer " + os.environ["AGENTNODE_TOKEN"]})
print(c.getresponse().status, os.getuid(), flush=True)
"""


def test_the_task_socket_is_for_tasks_and_root_and_tokens_die_with_their_task() -> None:
    # A user-namespaced task binds the socket in as an unprivileged host id: the state may not
    # sit under pytest's private (0700) tmp_path.
    with public_dir("sock") as root:
        _task_socket(root)


def _task_socket(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        sock = d.data / "run" / "sockets" / "task.sock"
        st = sock.parent.parent.stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o710, 0, USERNS_BASE)
        for user, userns in (("65534", False), ("1000:1000", False), ("0", True), ("7", True)):
            task = d.submit(["/usr/bin/python3", "-c", ASK], user=user, userns=userns)
            assert d.wait(task["id"])["state"] == "succeeded", d.log(task["id"])
            assert d.log(task["id"]).split() == ["200", user.split(":")[0]], "tasks reach it"
        for user in ("65534", "1000"):
            r = subprocess.run(
                ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                 "/usr/bin/python3", "-c",
                 f"import socket; socket.socket(socket.AF_UNIX).connect({str(sock)!r})"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
        # Root on the host reaches it, and a token is good only while its attempt runs.
        gate = d.submit(["sh", "-c", "echo $AGENTNODE_TOKEN; "
                         "while [ ! -e /workspace/go ]; do sleep 0.01; done; exit 3"],
                        retries=1)  # fmt: skip
        token = _token(d, gate["id"])

        def ask(tok: str) -> int:
            conn = UnixHTTPConnection(str(sock), timeout=10)
            conn.request(
                "GET", f"/v1/tasks/{gate['id']}", headers={"Authorization": f"Bearer {tok}"}
            )
            status = conn.getresponse().status
            conn.close()
            return status

        assert ask(token) == 200
        (d.data / "workspaces" / gate["id"] / "go").touch()
        d.wait(gate["id"], states=("queued", "starting", "running", "failed"))
        deadline = time.monotonic() + 30
        while d.task(gate["id"])["attempt"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ask(token) == 401, "the first attempt's token died with it"
        done = d.wait(gate["id"])
        assert done["attempt"] == 2 and done["state"] == "failed"
        second = d.log(gate["id"], 2).strip()
        assert second and second != token, "the retry got a token of its own"
        assert ask(second) == 401, "and it died when the retry ended"


# -- one bad input never harms others ------------------------------------------------------------


def test_idempotency_key_returns_the_first_task_also_across_restarts(tmp_path: Path) -> None:
    body = {"command": ["sleep", "30"], "cpus": 0.1, "memory": "32M"}
    d = Daemon(tmp_path)
    d.start()
    try:
        status, first = call(d, "POST", "/v1/tasks", body, **{"Idempotency-Key": "k-1"})
        assert status == 201
        status, again = call(d, "POST", "/v1/tasks", body, **{"Idempotency-Key": "k-1"})
        assert status == 200 and again["id"] == first["id"]
        # Sixteen clients racing with one key (a retried submit racing its own first try).
        racers = in_parallel(
            lambda _: call(d, "POST", "/v1/tasks", body, **{"Idempotency-Key": "k-race"}), 16
        )
        assert sorted(s for s, _ in racers) == [200] * 15 + [201], racers
        assert len({t["id"] for _, t in racers}) == 1
        status, other = call(d, "POST", "/v1/tasks", body, **{"Idempotency-Key": "k-2"})
        assert status == 201 and other["id"] != first["id"], "another key, another task"
        status, err = call(d, "POST", "/v1/tasks", {**body, "command": ["true"]},
                           **{"Idempotency-Key": "k-1"})  # fmt: skip
        assert status == 409 and "used for another request" in err["error"], err
        for bad in ("", "x" * 256, "a b", "ключ"):
            status, err = call(d, "POST", "/v1/tasks", body,
                               **{"Idempotency-Key": bad.encode().decode("latin-1")})  # fmt: skip
            assert status == 400 and err.get("field") == "Idempotency-Key", (bad, err)
        d.stop(signal.SIGKILL)
        d.start()
        status, after = call(d, "POST", "/v1/tasks", body, **{"Idempotency-Key": "k-1"})
        assert status == 200 and after["id"] == first["id"], "the key outlives a kill -9"
        everything = d.client.call("GET", "/v1/tasks?all=1")
        assert len(everything) == 3, [t["id"] for t in everything]
    finally:
        if d.proc is not None:
            d.stop()


def test_a_follower_that_leaves_is_no_error(tmp_path: Path) -> None:
    import socket as socketlib

    with daemon(tmp_path) as d:
        chatty = d.submit(["sh", "-c", "while true; do echo line; sleep 0.01; done"])
        quiet = d.submit(["sleep", "30"])
        d.wait(chatty["id"], states=("running",))
        follows = [f"/v1/tasks/{t['id']}/{what}?follow=1"
                   for t in (chatty, quiet) for what in ("logs", "timeline")]  # fmt: skip
        for path in [*follows, "/v1/events"] * 5:
            s = socketlib.socket(socketlib.AF_UNIX)
            s.connect(str(d.socket))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            s.close()
        d.submit(["true"])  # an event for the events followers to fail on
        time.sleep(1.0)  # the chatty log's next writes meet the closed sockets
        # (the timelines' next records, the cancels below, meet them too)
        for task in (chatty, quiet):
            d.client.call("POST", f"/v1/tasks/{task['id']}/cancel")
            d.wait(task["id"])
        assert d.client.call("GET", "/healthz")["ok"]
    assert not [line for line in d.lines if "Traceback" in line or "Error handling" in line], (
        d.lines
    )


# -- stalls --------------------------------------------------------------------------------------

#: Heartbeats every 0.3 s through the task socket for `seconds`, then exits 0.
BEAT = """
import http.client, os, socket, sys, time
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(os.environ["AGENTNODE_URL"][len("unix://"):])
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    c = Conn("localhost", timeout=60)
    c.request("POST", "/v1/tasks/" + os.environ["AGENTNODE_TASK_ID"] + "/heartbeat",
              headers={"Authorization": "Bearer " + os.environ["AGENTNODE_TOKEN"]})
    assert c.getresponse().status == 200
    c.close()
    time.sleep(0.3)
"""


def test_a_stopped_daemon_judges_tasks_by_their_own_time(tmp_path: Path) -> None:
    """SIGSTOP for 5 s: tasks that exited before their deadline succeeded, and a task that kept
    heartbeating (its beats waiting in the socket) is not killed for missing them."""
    with daemon(tmp_path) as d:
        quick = [d.submit(["sh", "-c", "sleep 1"], timeout="3s") for _ in range(6)]
        beating = [d.submit(["/usr/bin/python3", "-c", BEAT, "8"], heartbeat="2s",
                            timeout="60s") for _ in range(2)]  # fmt: skip
        slow = d.submit(["sleep", "30"], timeout="2s")
        for t in [*quick, *beating, slow]:
            d.wait(t["id"], states=("running",))
        time.sleep(0.5)
        os.kill(d.pid, signal.SIGSTOP)
        time.sleep(5)
        os.kill(d.pid, signal.SIGCONT)
        for t in quick:
            done = d.wait(t["id"])
            assert done["state"] == "succeeded", done["reason"]
        for t in beating:
            done = d.wait(t["id"], timeout=30)
            assert done["state"] == "succeeded", (done["reason"], d.log(t["id"]))
        assert d.wait(slow["id"])["state"] == "timed_out", "a task still running past it is"


# -- a full disk ---------------------------------------------------------------------------------


def test_a_full_disk_is_507_and_the_node_resumes_by_itself(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)], check=True)
    try:
        with daemon(tmp_path) as d:
            _fill_and_free(d)
            code = d.stop()
            assert code == 0, "\n".join(d.lines)
        assert not [line for line in d.lines if "Traceback" in line], "\n".join(d.lines)
        # What the node recorded while the disk was full is in its audit log, chained.
        verified = run_cli(["audit", "verify", str(data / "audit")])
        assert verified.returncode == 0, verified.stderr
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def _fill_and_free(d: Daemon) -> None:
    assert d.wait(d.submit(["true"])["id"])["state"] == "succeeded"
    filler = d.data / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):  # until ENOSPC
        while True:
            os.write(fd, b"\0" * (1 << 20))
    os.close(fd)
    pad = {"command": ["true"], "cpus": 0.1, "memory": "32M", "env": {"PAD": "x" * 100_000}}
    for _ in range(500):
        status, answer = call(d, "POST", "/v1/tasks", pad)
        if status != 201:
            break
    assert status == 507, (status, answer)
    assert "is full" in answer["error"] and "\n" not in answer["error"], answer
    status, health = call(d, "GET", "/healthz")
    assert status == 503 and health["disk_full"] is True, health
    assert health["store"].startswith("failing: the disk holding"), health
    status, metrics = call(d, "GET", "/metrics")
    assert b"agentnode_disk_full 1.0" in metrics
    assert call(d, "POST", "/v1/tasks", pad)[0] == 507, "still full: still refused"
    filler.unlink()
    deadline = time.monotonic() + 15
    while True:
        status, task = call(d, "POST", "/v1/tasks", {**pad, "env": {}})
        if status == 201 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 201, ("no recovery once space returned", task)
    assert d.wait(task["id"])["state"] == "succeeded"
    status, health = call(d, "GET", "/healthz")
    deadline = time.monotonic() + 5
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
        status, health = call(d, "GET", "/healthz")
    assert status == 200 and health["disk_full"] is False, health
    assert b"agentnode_disk_full 0.0" in call(d, "GET", "/metrics")[1]


def test_a_chatty_task_log_is_capped_and_the_cut_is_marked(tmp_path: Path) -> None:
    with daemon(tmp_path, "[node]\nlog_max_mb = 1\n") as d:
        # 10 MiB in 64 KiB lines over a second or two (~6 MiB/s, the rate the outside run saw):
        # a pass every 0.25 s keeps it near its cap. (A burst faster than the passes overshoots
        # by what it writes between two of them: the cap bounds disk use, not each burst.)
        line = "head -c 65535 /dev/zero | tr '\\0' x; echo"
        chatty = d.submit(["sh", "-c", f"for i in $(seq 160); do {line}; sleep 0.01; done"])
        follow = threading.Thread(target=lambda: run_cli(
            ["logs", "-f", chatty["id"], "--socket", str(d.socket)]), daemon=True)  # fmt: skip
        follow.start()
        done = d.wait(chatty["id"], timeout=60)
        assert done["state"] == "succeeded", done["reason"]
        log = d.data / "logs" / f"{chatty['id']}.1.log"
        kept = log.with_name(log.name + ".1")
        assert kept.exists(), "it passed its cap at least once"
        # A pass every 0.25 s: at most what it wrote meanwhile over the cap.
        assert log.stat().st_size < 8 << 20 and kept.stat().st_size < 8 << 20
        # The marker follows the cut (a line the task wrote between the truncation and the
        # marker may come before it: the task writes its log itself, with O_APPEND).
        marks = [x for x in log.read_text().splitlines()[:4] if "[agentnode: " in x]
        assert marks and "passed its 1 MiB cap" in marks[0] and kept.name in marks[0]
        follow.join(30)
        assert not follow.is_alive(), "logs -f ends with its task across rotations"
    with daemon(tmp_path / "off", "[node]\nlog_max_mb = 0\n") as d:
        t = d.submit(["sh", "-c", "head -c 3145728 /dev/zero"])
        assert d.wait(t["id"])["state"] == "succeeded"
        assert (d.data / "logs" / f"{t['id']}.1.log").stat().st_size == 3 << 20, "0: no cap"


# -- a start that fails ---------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@pytest.mark.parametrize(
    ("damaged", "content", "named"),
    [
        ("audit/audit.log", "garbage{\n", "audit/audit.log is damaged"),
        ("tools/keys", "junk", "cannot open the database at {data}/tools/keys"),
        ("memory/episodic", "junk", "cannot open the database at {data}/memory/episodic"),
        ("memory/vectors/rocksdb", "junk", "cannot open the database at {data}/memory/vectors"),
        ("memory/objects/meta", "junk", "cannot open the database at {data}/memory/objects"),
    ],
)
def test_a_node_that_cannot_start_says_why_in_one_line_and_leaves_nothing(
    tmp_path: Path, damaged: str, content: str, named: str
) -> None:
    """Whatever part of the data dir cannot be opened, early in the start or late: one line
    naming it, exit 1, and no bpffs mount, pin or process of the node left behind."""
    from agentnode.node.restore import node_id

    data = tmp_path / "data"
    (data / damaged).parent.mkdir(parents=True)
    (data / damaged).write_text(content)
    r = run_cli(["run", "--data-dir", str(data), "--socket", str(tmp_path / "api.sock")])
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentnode: error: "), r.stderr
    assert named.format(data=data) in lines[0], lines[0]
    assert not _mounts_under(data), _mounts_under(data)
    assert not Path("/sys/fs/bpf/agentnode", node_id(data)).exists()
    assert not processes_with(str(data)), "a process of the failed start is still running"


# -- a task that hoards connections --------------------------------------------------------------

#: Opens `n` connections to each of the node's doors into tasks and holds them until
#: /gate/done appears; prints how many each door left open (a door past its bound closes them).
HOARD = """
import os, socket, sys, time
doors = [os.environ[k].removeprefix("unix://") for k in
         ("AGENTNODE_URL", "AGENTNODE_MEMORY_SOCKET", "AGENTNODE_MCP_SOCKET",
          "AGENTNODE_MCP_STDIO_SOCKET")]
held = {d: [] for d in doors}
for d in doors:
    for _ in range(int(sys.argv[1])):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(d)
        except OSError:
            s.close()
            continue
        held[d].append(s)
time.sleep(1)
for d, socks in held.items():
    left = 0
    for s in socks:
        s.setblocking(False)
        try:
            left += s.recv(1) != b""
        except BlockingIOError:
            left += 1  # open, nothing to read
        except OSError:
            pass
    print(os.path.basename(d), left, flush=True)
while not os.path.exists("/gate/done"):
    time.sleep(0.1)
"""


def test_a_task_cannot_hoard_the_nodes_connections(tmp_path: Path) -> None:
    """A task opening 600 connections to each door into tasks (each holding one of the
    daemon's descriptors, most never sending a byte) is held to 256 a door; the daemon's
    descriptors stay bounded and another task reaches every door meanwhile."""
    gate = tmp_path / "gate"
    gate.mkdir()
    with daemon(tmp_path) as d:
        before = len(os.listdir(f"/proc/{d.pid}/fd"))
        hoarder = d.submit(["/usr/bin/python3", "-c", HOARD, "600"], nofile=4096,
                           ro=[f"{gate}:/gate"])  # fmt: skip
        d.wait(hoarder["id"], states=("running",))
        deadline = time.monotonic() + 60
        while len(d.log(hoarder["id"]).splitlines()) < 4:
            assert time.monotonic() < deadline, d.log(hoarder["id"])
            time.sleep(0.2)
        left = dict(line.split() for line in d.log(hoarder["id"]).splitlines())
        assert sorted(left) == ["mcp.sock", "mcps.sock", "memory.sock", "task.sock"], left
        assert all(int(n) == 256 for n in left.values()), left
        held = len(os.listdir(f"/proc/{d.pid}/fd")) - before
        assert held < 4 * 256 + 64, f"the daemon holds {held} descriptors more"
        # Another task reaches every door while the hoarder holds its 4 x 256.
        other = d.submit(["/usr/bin/python3", "-c", HOARD, "3"], ro=[f"{gate}:/gate"])
        d.wait(other["id"], states=("running",))
        while len(d.log(other["id"]).splitlines()) < 4:
            assert time.monotonic() < deadline, d.log(other["id"])
            time.sleep(0.2)
        assert all(line.split()[1] == "3" for line in d.log(other["id"]).splitlines())
        (gate / "done").touch()
        for t in (hoarder, other):
            assert d.wait(t["id"])["state"] == "succeeded"
        refused = [line for line in d.lines if "refused connections past 256" in line]
        assert len(refused) == 4, refused  # one line a door, not one a connection
