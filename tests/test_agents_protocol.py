"""The Agent Protocol (v1) on a real daemon, driven by a client speaking it over HTTP (aiohttp,
following the protocol's OpenAPI document): a task runs the reference runtime against the
scripted mock; its steps are executed until `is_last`; its artifacts are listed, downloaded
and uploaded; unknown and other tenants' ids answer 404; workspace symlinks lead nowhere."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.agent_env import HERE, REPO, agent_node, ap_client_python
from support.egress_world import World

pytestmark = [pytest.mark.root]

SCRIPT = [
    {"tool_calls": [{"name": "write_file", "arguments": {"path": "out.txt",
                                                          "content": "Washington"}}]},
    "Wrote Washington to out.txt.",
]  # fmt: skip
TOKEN = "ap-test-token"
#: What the task needs on this host (the interpreter lives under /root, which only root reads).
TASK = {"user": "0", "ro": [str(REPO)], "env": {"PYTHONPATH": str(REPO / "python")}}
#: Keys of the AP's models (agent_protocol.models 1.0.2).
TASK_KEYS = {"task_id", "input", "additional_input", "artifacts"}
STEP_KEYS = {"task_id", "step_id", "name", "status", "input", "additional_input", "output",
             "additional_output", "artifacts", "is_last"}  # fmt: skip
ARTIFACT_KEYS = {"artifact_id", "agent_created", "file_name", "relative_path"}
PAGE_KEYS = {"total_items", "total_pages", "current_page", "page_size"}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        yield w


class Client:
    """An Agent Protocol client on the daemon's admin socket; `base` is `/ap/v1` or
    `/t/TENANT/ap/v1`."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, "http://node" + self.base + path, **kw) as r:
            raw = await r.read()
            if r.content_type == "application/json":
                return r.status, json.loads(raw)
            return r.status, raw


def _tcp_status(world: World, port: int, path: str, token: str | None) -> int:
    """The status of GET `path` on the daemon's TCP listener (in the world's netns)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    code = (
        "import urllib.request, urllib.error\n"
        f"r = urllib.request.Request('http://127.0.0.1:{port}{path}', headers={headers!r})\n"
        "try:\n    print(urllib.request.urlopen(r).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)\n"
    )
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{world.task}", sys.executable, "-c", code],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return int(out.stdout)


async def _scenario(socket: Path, data: Path, plain: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as s:
        acme, default, other = (Client(s, "/t/acme/ap/v1"), Client(s, "/ap/v1"),
                                Client(s, "/t/other/ap/v1"))  # fmt: skip
        found: dict[str, Any] = {}
        # Refused creations say why, in the AP's error body.
        for body, needle in (({}, "input"), ({"input": "  "}, "input"),
                             ({"input": "x", "additional_input": {"agent": "nope"}}, "agent"),
                             ({"input": "x", "additional_input": {"task": {"cpus": "many"}}},
                              "cpus"),
                             ({"input": "x", "additional_input": {"task": {"tenant": "y"}}},
                              "tenant"),
                             ({"input": "x", "additional_input": [1]}, "additional_input")):  # fmt: skip
            status, err = await acme.call("POST", "/agent/tasks", json=body)
            assert status == 422 and needle in err["message"], (body, status, err)
        status, err = await acme.call("POST", "/agent/tasks", data=b"{nope")
        assert status == 400 and "JSON" in err["message"]

        status, task = await acme.call("POST", "/agent/tasks", json={
            "input": "Write 'Washington' to out.txt",
            "additional_input": {"tools": ["write_file"], "task": TASK}})  # fmt: skip
        assert status == 200, task
        assert set(task) == TASK_KEYS and task["input"] == "Write 'Washington' to out.txt"
        tid = found["task_id"] = task["task_id"]

        # Two clients posting at once get two different steps, in order.
        pair = await asyncio.gather(
            *(acme.call("POST", f"/agent/tasks/{tid}/steps", json={}) for _ in range(2))
        )
        assert [status for status, _ in pair] == [200, 200], pair
        steps = sorted((step for _, step in pair), key=lambda x: int(x["step_id"]))
        assert steps[0]["step_id"] != steps[1]["step_id"]
        for _ in range(30):
            status, step = await acme.call("POST", f"/agent/tasks/{tid}/steps", json={})
            assert status == 200, step
            assert set(step) == STEP_KEYS and step["status"] == "completed"
            steps.append(step)
            if step["is_last"]:
                break
        found["steps"] = steps
        status, err = await acme.call("POST", f"/agent/tasks/{tid}/steps", json={"input": "more"})
        assert status == 409 and "ended" in err["message"]

        status, listed = await acme.call("GET", f"/agent/tasks/{tid}/steps?page_size=100")
        assert status == 200 and set(listed["pagination"]) == PAGE_KEYS
        assert [x["step_id"] for x in listed["steps"]] == [x["step_id"] for x in steps]
        status, page = await acme.call(
            "GET", f"/agent/tasks/{tid}/steps?page_size=1&current_page=2"
        )
        assert page["steps"] == [listed["steps"][1]]
        assert page["pagination"]["total_pages"] == len(steps)
        status, one = await acme.call("GET", f"/agent/tasks/{tid}/steps/{steps[0]['step_id']}")
        assert status == 200 and one == listed["steps"][0]

        status, arts = await acme.call("GET", f"/agent/tasks/{tid}/artifacts")
        assert status == 200 and set(arts["pagination"]) == PAGE_KEYS
        (out,) = [a for a in arts["artifacts"] if a["file_name"] == "out.txt"]
        assert set(out) == ARTIFACT_KEYS and out["agent_created"] and out["relative_path"] == ""
        status, content = await acme.call(
            "GET", f"/agent/tasks/{tid}/artifacts/{out['artifact_id']}"
        )
        assert (status, content) == (200, b"Washington")

        form = aiohttp.FormData()
        form.add_field("file", b"\x00binary\xff", filename="data.bin")
        form.add_field("relative_path", "inputs/sub")
        status, up = await acme.call("POST", f"/agent/tasks/{tid}/artifacts", data=form)
        assert status == 200 and up["agent_created"] is False, up
        assert (up["file_name"], up["relative_path"]) == ("data.bin", "inputs/sub")
        status, content = await acme.call(
            "GET", f"/agent/tasks/{tid}/artifacts/{up['artifact_id']}"
        )
        assert (status, content) == (200, b"\x00binary\xff")
        status, again = await acme.call("GET", f"/agent/tasks/{tid}")
        assert {a["artifact_id"] for a in again["artifacts"]} == {out["artifact_id"],
                                                                 up["artifact_id"]}  # fmt: skip

        # A symlink in the workspace (a task can make one) is neither listed nor followed;
        # uploads through `..` or a linked directory are refused and write nothing outside.
        workspace = data / "workspaces" / tid
        outside = data.parent / "outside"
        outside.mkdir()
        (workspace / "escape").symlink_to("/etc/hostname")
        (workspace / "linkdir").symlink_to(outside)
        odd = 'odd"\r\nSet-Cookie: x.txt'
        (workspace / odd).write_bytes(b"odd")
        status, arts = await acme.call("GET", f"/agent/tasks/{tid}/artifacts?page_size=100")
        names = {a["file_name"]: a["artifact_id"] for a in arts["artifacts"]}
        assert set(names) == {"out.txt", "data.bin", odd}
        # A task's file name cannot add a header to the download's answer.
        async with s.get(f"http://node/t/acme/ap/v1/agent/tasks/{tid}/artifacts/{names[odd]}") as r:
            assert r.status == 200 and await r.read() == b"odd"
            assert "Set-Cookie" not in r.headers
            assert (
                r.headers["Content-Disposition"] == 'attachment; filename="odd___Set-Cookie: x.txt"'
            )
        for rel in ("../../outside", "linkdir", "inputs/../../x", "/abs"):
            form = aiohttp.FormData()
            form.add_field("file", b"x", filename="planted")
            form.add_field("relative_path", rel)
            status, err = await acme.call("POST", f"/agent/tasks/{tid}/artifacts", data=form)
            assert status == 422, (rel, status, err)
        form = aiohttp.FormData()
        form.add_field("file", b"x", filename="..")
        status, err = await acme.call("POST", f"/agent/tasks/{tid}/artifacts", data=form)
        assert status == 422, err
        assert list(outside.iterdir()) == []
        # A FIFO the task made where an upload goes is refused at once (opening it would block
        # a thread of the node's for good); a file with other hard links is neither written
        # nor read.
        os.mkfifo(workspace / "pipe")
        (workspace / "hard").write_bytes(b"mine")
        os.link(workspace / "hard", workspace / "hard2")
        for name in ("pipe", "hard"):
            form = aiohttp.FormData()
            form.add_field("file", b"planted", filename=name)
            status, err = await asyncio.wait_for(
                acme.call("POST", f"/agent/tasks/{tid}/artifacts", data=form), 10
            )
            assert status == 422 and "not a regular file" in err["message"], (name, err)
        assert (workspace / "hard").read_bytes() == b"mine"
        status, arts = await acme.call("GET", f"/agent/tasks/{tid}/artifacts?page_size=100")
        (hard,) = [a for a in arts["artifacts"] if a["file_name"] == "hard"]
        status, err = await acme.call("GET", f"/agent/tasks/{tid}/artifacts/{hard['artifact_id']}")
        assert status == 404, err

        # Unknown ids, and this task through another tenant: 404 alike, on every route.
        for client, task_id in ((acme, "t-nope"), (acme, plain), (default, tid), (other, tid)):
            for method, path in (("GET", ""), ("GET", "/steps"), ("POST", "/steps"),
                                 ("GET", "/steps/final"), ("GET", "/artifacts"),
                                 ("GET", f"/artifacts/{out['artifact_id']}")):  # fmt: skip
                status, err = await client.call(method, f"/agent/tasks/{task_id}{path}")
                assert status == 404 and "no task" in err["message"], (client.base, path, err)
            form = aiohttp.FormData()
            form.add_field("file", b"x", filename="y")
            status, err = await client.call("POST", f"/agent/tasks/{task_id}/artifacts", data=form)
            assert status == 404
        status, err = await acme.call("GET", f"/agent/tasks/{tid}/steps/999999")
        assert status == 404 and "no executed step" in err["message"]
        status, err = await acme.call("GET", f"/agent/tasks/{tid}/artifacts/{'0' * 32}")
        assert status == 404 and "no artifact" in err["message"]
        for q in ("current_page=0", "page_size=x", "page_size=-1"):
            status, err = await acme.call("GET", f"/agent/tasks?{q}")
            assert status == 400 and q.split("=")[0] in err["message"]
        status, err = await Client(s, "/t/bad%20name/ap/v1").call("GET", "/agent/tasks")
        assert status == 400 and "invalid tenant" in err["message"]

        status, mine = await acme.call("GET", "/agent/tasks")
        assert [t["task_id"] for t in mine["tasks"]] == [tid]
        for client in (default, other):
            status, theirs = await client.call("GET", "/agent/tasks")
            assert status == 200 and theirs["tasks"] == []
            assert theirs["pagination"]["total_items"] == 0
        return found


@pytest.mark.timeout(240)
def test_agent_protocol_drives_the_reference_runtime(world: World, tmp_path: Path) -> None:
    port = 31000 + os.getpid() % 2000
    extra = f'[node]\nlisten = "127.0.0.1:{port}"\napi_token = "{TOKEN}"\n'
    with agent_node(world, tmp_path, SCRIPT, extra=extra) as (d, mock):
        # A node task not made through the protocol is not one of its tasks.
        plain = d.submit(["true"], tenant="acme")
        found = asyncio.run(_scenario(d.socket, d.data, plain["id"]))
        tid, steps = found["task_id"], found["steps"]
        names = [s["name"] for s in steps]
        # The agent's model calls, its tool call and its execs, in order, then its end.
        assert [n for n in names if not n.startswith("exec ")] == [
            "llm_call gpt-test", "tool_call write_file", "llm_call gpt-test", "finish"]  # fmt: skip
        assert any(n.startswith("exec python") for n in names), names
        call = next(s for s in steps if s["name"].startswith("llm_call"))
        assert call["output"] == (
            "chat on gpt-test (status 200): 400 tokens in (+600 cached), "
            "200 out (+100 reasoning), 0.00495 USD"
        )
        assert call["additional_output"]["cost"] == "0.00495"
        final = steps[-1]
        assert final["is_last"] and final["output"] == "Wrote Washington to out.txt."
        assert final["additional_output"]["state"] == "succeeded"
        assert [a["file_name"] for a in final["artifacts"]] == ["out.txt"]
        assert not any(s["is_last"] for s in steps[:-1])
        assert len(mock.requests) == 2
        # The executed steps are in the task's timeline (so they survive a restart).
        timeline = d.client.call("GET", f"/v1/tasks/{tid}/timeline")
        assert [r["step"] for r in timeline if r["kind"] == "ap_step"] == [
            s["step_id"] for s in steps]  # fmt: skip
        # Executed steps are read back from the audit log after a restart.
        before = d.client.call("GET", f"/t/acme/ap/v1/agent/tasks/{tid}/steps?page_size=100")
        d.stop()
        d.start()
        after = d.client.call("GET", f"/t/acme/ap/v1/agent/tasks/{tid}/steps?page_size=100")
        assert after == before and len(after["steps"]) == len(steps)
        # On the TCP listener the protocol needs the node's token, like every route.
        path = "/t/acme/ap/v1/agent/tasks"
        assert _tcp_status(world, port, path, None) == 401
        assert _tcp_status(world, port, path, "wrong") == 401
        assert _tcp_status(world, port, path, TOKEN) == 200


#: The runtime's first answer runs code that takes a while, so a step's input posted meanwhile
#: reaches its second model call; the third answer is another task's.
SLOW_SCRIPT = [
    {"tool_calls": [{"name": "run_code", "arguments": {"code": "import time; time.sleep(3)"}}]},
    "Done, and hi.",
    "Quick answer.",
]


@pytest.mark.timeout(240)
def test_a_step_input_reaches_the_running_agent(world: World, tmp_path: Path) -> None:
    """The Agent Protocol's own client executes the first step with an input: it is in the
    task's inbox and reaches the runtime's next model call as a user message, so its second
    call (after the tool's result) carries it once. A step's input for an agent that has ended
    is answered as not delivered."""
    python = ap_client_python()
    port = 31000 + os.getpid() % 2000
    extra = f'[node]\nlisten = "127.0.0.1:{port}"\napi_token = "{TOKEN}"\n'
    with agent_node(world, tmp_path, SLOW_SCRIPT, extra=extra) as (d, mock):
        body = {"input": "Wait a little", "additional_input": {"tools": ["run_code"], "task": TASK}}
        out = subprocess.run(
            ["nsenter", f"--net=/run/netns/{world.task}", str(python),
             str(HERE / "ap_sdk_client.py"), f"http://127.0.0.1:{port}", TOKEN, json.dumps(body),
             "Also say hi."],
            capture_output=True, text=True, timeout=200, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-1500:]
        report = json.loads(out.stdout)
        steps = report["steps"]
        assert steps[-1]["is_last"] and steps[-1]["output"] == "Done, and hi."
        assert [s["delivered"] for s in steps] == [True] + [None] * (len(steps) - 1), steps
        first, second = mock.requests
        assert first["user_texts"][0] == "Wait a little"
        assert second["user_texts"] == ["Wait a little", "Also say hi."], second
        assert second["tool_results"] and second["messages"] == 4  # the input once
        inbox = d.data / "tasks" / "inbox" / report["task_id"]
        assert [json.loads(line) for line in inbox.read_text().splitlines()] == [
            {"input": "Also say hi.", "additional_input": None}]  # fmt: skip
        assert "input after step" in d.log(report["task_id"])

        # An agent that has ended is sent nothing, and the step's answer says so.
        quick = d.client.call("POST", "/ap/v1/agent/tasks", {
            "input": "Answer at once", "additional_input": {"task": TASK}})  # fmt: skip
        assert d.wait(quick["task_id"], timeout=120)["state"] == "succeeded"
        step = d.client.call("POST", f"/ap/v1/agent/tasks/{quick['task_id']}/steps",
                             {"input": "too late"})  # fmt: skip
        assert step["additional_output"]["input_delivered"] is False
        assert not (d.data / "tasks" / "inbox" / quick["task_id"]).read_bytes()
        listed = d.client.call("GET", f"/ap/v1/agent/tasks/{quick['task_id']}/steps")
        assert listed["steps"][0]["additional_output"]["input_delivered"] is False
