"""Egress on real sandboxed tasks: `spawn(network=EgressPolicy(...))`, `agentnode exec --allow`,
live updates, counters, and cleanup of every kernel object a task's network used.

The node side (bridge, masquerade, DNS forwarder) lives in the World's task netns, the test
hosts in its hosts netns; every address is one the test assigned (198.51.100.0/24, and a
random 10.x/24 node subnet inside the namespaces it created)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentnode.egress import EgressPolicy
from agentnode.egress.enforce import Denial
from agentnode.egress.service import EgressService
from agentnode.errors import AgentnodeError, UsageError
from agentnode.isolation import Mount, spawn
from conftest import run_cli
from support.egress_world import HOST4, OTHER4, World
from support.node_daemon import daemon

pytestmark = pytest.mark.root

HERE = Path(__file__).parent
REPO = HERE.parent
CLIENT = str(HERE / "support" / "egress_client.py")
#: The task runs this checkout's Python as root (the venv may not be readable by nobody), with
#: the checkout bound in (it may sit under /tmp, which is the task's own tmpfs).
PYTHON: dict[str, Any] = {
    "user": 0,
    "mounts": [Mount(str(REPO), str(REPO))],
    "env": {"PYTHONPATH": str(REPO / "python")},
}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        w.serve(
            tcp=[[HOST4, 8080], [HOST4, 9090], [OTHER4, 8080]],
            dns={
                "addrs": [HOST4],
                "records": {"allowed.test": [HOST4], "other.test": [OTHER4]},
                "ttl": 60,
                "log": os.devnull,
            },
        )
        yield w


def subnet() -> str:
    return f"10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"


@pytest.fixture
def node(world: World) -> Iterator[EgressService]:
    svc = EgressService(
        bridge="agentnode0", subnet=subnet(), dns_upstream=(HOST4, 53), node_netns=world.task
    )
    yield svc
    svc.close()


def ops(*items: dict[str, Any]) -> list[str]:
    return [sys.executable, CLIENT, json.dumps(list(items))]


def connect(host: str, port: int, **kw: Any) -> dict[str, Any]:
    return {"op": "connect", "host": host, "port": port, **kw}


def run_task(
    argv: list[str], *, stats: dict[str, int] | None = None, **kw: Any
) -> list[dict[str, Any]]:
    """The task's JSON results; its final network counters go into `stats` when given."""
    with spawn(argv, stdout="pipe", **PYTHON, **kw) as task:
        assert task.stdout is not None
        out = task.stdout.read().decode()
        result = task.wait(60)
        assert result is not None and result.code == 0, out
        if stats is not None:
            stats.update(task.stats().network)
    return [json.loads(line) for line in out.splitlines()]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def veths(world: World) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", world.task, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    return [
        line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": anv" in line
    ]


def test_policy_is_enforced_from_the_first_instruction(node: EgressService, world: World) -> None:
    policy = EgressPolicy(allow=[f"{HOST4}:8080"], hosts=["allowed.test:8080"])
    counters: dict[str, int] = {}
    denials: list[Denial] = []
    ok, port, host, name, refused, by_name = run_task(
        ops(
            connect(HOST4, 8080, send=5000),
            connect(HOST4, 9090),
            connect(OTHER4, 8080),
            {"op": "resolve", "name": "allowed.test", "server": OTHER4},
            {"op": "resolve", "name": "other.test", "server": OTHER4},
            connect("allowed.test", 8080),
        ),
        network=policy,
        node_network=node,
        stats=counters,
        on_denial=denials.append,
    )
    assert ok["ok"] and ok["reply"] == "5000"
    assert port["errno"] == errno.EPERM and port["ms"] < 50
    assert host["errno"] == errno.EPERM
    # The query to OTHER4 was redirected to the node's forwarder: it answered from HOST4's
    # records and wrote the address into the task's map before releasing the answer.
    assert name == {"ok": True, "rcode": "NOERROR", "addrs": [HOST4]}
    assert refused["rcode"] == "REFUSED"
    assert by_name["ok"]
    assert counters["dns_refused"] == 1 and counters["dns_answered"] >= 1, counters
    # The task's own callback saw its denials, the first one included.
    assert [(str(d.address), d.port) for d in denials[:2]] == [(HOST4, 9090), (OTHER4, 8080)]


def test_update_applies_to_the_next_connection_and_counters(
    node: EgressService, world: World
) -> None:
    go = "/workspace/go"
    code = (
        "import json, os, subprocess, sys, time\n"
        "run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True)"
        ".stdout\n"
        f"print(run({CLIENT!r}, json.dumps([{json.dumps(connect(HOST4, 9090))}])), end='', "
        "flush=True)\n"
        f"while not os.path.exists({go!r}): time.sleep(0.01)\n"
        f"print(run({CLIENT!r}, json.dumps([{json.dumps(connect(HOST4, 9090, send=10000))}])), "
        "end='', flush=True)\n"
    )
    with spawn(
        [sys.executable, "-c", code],
        stdout="pipe",
        network=EgressPolicy(allow=[f"{HOST4}:8080"]),
        node_network=node,
        **PYTHON,
    ) as task:
        assert task.stdout is not None
        before = json.loads(task.stdout.readline())
        assert before["errno"] == errno.EPERM
        task.update_egress(EgressPolicy(allow=[f"{HOST4}:9090"]))
        assert task.egress == EgressPolicy(allow=[f"{HOST4}:9090"])
        (task.workspace / "go").touch()
        after = json.loads(task.stdout.readline())
        assert after["ok"] and after["reply"] == "10000"
        live = task.stats().network
        result = task.wait(30)
    assert result is not None and result.code == 0
    net = result.stats.network
    assert live["connections_denied"] >= 1 and net["connections_allowed"] >= 1
    # 10,000 bytes of payload plus TCP/IP headers, in packets the backstop counted.
    assert 10_000 < net["bytes_out"] < 20_000 and net["packets_out"] > 1
    with pytest.raises(UsageError, match="need --net egress"):
        node.prepare("host", EgressPolicy(hosts=["allowed.test"]))


def cgroup_links() -> list[int]:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True)
    return [link["cgroup_id"] for link in json.loads(out.stdout or "[]") if "cgroup_id" in link]


def test_nothing_of_a_task_network_remains(node: EgressService, world: World) -> None:
    before = veths(world)
    with spawn(["sleep", "30"], network=EgressPolicy(), node_network=node) as task:
        cg, net = task.cgroup_dir, task._net.net if task._net else None
        assert cg is not None and net is not None
        progs = subprocess.run(
            ["bpftool", "-j", "cgroup", "show", str(cg)], capture_output=True, text=True, check=True
        ).stdout
        assert len(json.loads(progs)) >= 5
        cgroup_id = os.stat(cg).st_ino
        assert cgroup_id in cgroup_links()
        assert net.netns in netns_names() and veths(world) == [*before, net.host_veth]
    assert net.netns not in netns_names() and veths(world) == before
    assert not cg.exists()
    assert cgroup_id not in cgroup_links()


def test_bad_network_arguments(node: EgressService) -> None:
    with pytest.raises(UsageError, match="takes no egress policy"):
        spawn(["true"], network="none", egress=EgressPolicy())
    with pytest.raises(UsageError, match="'/nope'"):
        spawn(["true"], network="/nope")


EXEC_CRASHES = """
import json, sys
from agentnode.egress import EgressPolicy
from agentnode.egress.enforce import Denial
from agentnode.egress.service import EgressService
from agentnode.isolation import spawn
svc = EgressService(subnet=sys.argv[1], node_netns=sys.argv[2], dns_upstream=(sys.argv[3], 53))
task = spawn(["sleep", "60"], network=EgressPolicy(), node_network=svc)
print(json.dumps({"netns": task._net.net.netns, "veth": task._net.net.host_veth}), flush=True)
sys.stdin.read()
"""


def test_sweep_removes_what_a_killed_owner_left(world: World) -> None:
    net = subnet()
    owner = subprocess.Popen(
        [sys.executable, "-c", EXEC_CRASHES, net, world.task, HOST4],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "python")},
    )
    assert owner.stdout is not None
    left = json.loads(owner.stdout.readline())
    # A second owner's sweep leaves a live owner's task network alone...
    other = EgressService(subnet=net, node_netns=world.task, dns_upstream=(HOST4, 53))
    other.start()
    assert left["netns"] in netns_names() and left["veth"] in veths(world)
    owner.send_signal(signal.SIGKILL)
    owner.communicate()
    # ...and removes it once that owner is gone (its task died with it: PDEATHSIG).
    deadline = time.monotonic() + 10
    other.network.sweep()
    while left["veth"] in veths(world) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left["netns"] not in netns_names() and left["veth"] not in veths(world)
    other.close()
    assert (
        "agentnode0"
        not in subprocess.run(
            ["ip", "-n", world.task, "-o", "link"], capture_output=True, text=True, check=True
        ).stdout
    )


def test_exec_allow_and_bad_rule(world: World) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    base = ["nsenter", f"--net=/run/netns/{world.task}", sys.executable, "-m", "agentnode", "exec"]
    py = ["--user", "0", "--ro", str(REPO), "--env", f"PYTHONPATH={REPO / 'python'}"]
    out = subprocess.run(
        [*base, *py, "--allow", f"{HOST4}:8080", "--stats", "--json", "--",
         *ops(connect(HOST4, 8080, send=100), connect(HOST4, 9090))],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ok, denied = (json.loads(line) for line in out.stdout.splitlines())
    assert ok["reply"] == "100" and denied["errno"] == errno.EPERM
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    assert stats["net_connections_denied"] >= 1 and stats["net_bytes_out"] > 100
    bad = subprocess.run(
        [*base, "--allow", "10.0.0.0/33", "--", "true"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--allow '10.0.0.0/33'" in bad.stderr


def test_daemon_tasks_get_their_egress_policy(world: World, tmp_path: Path) -> None:
    """`agentnode run` gives submitted tasks their rules, counts their traffic, writes each
    denial with the task's id to its audit log, and removes the bridge when it stops."""
    config = f'[network]\nsubnet = "{subnet()}"\ndns_upstream = "{HOST4}:53"\n'
    prefix = ("nsenter", f"--net=/run/netns/{world.task}")
    with daemon(tmp_path, config, prefix) as d:
        with pytest.raises(AgentnodeError, match=r"allow '1\.2\.3\.0/33'"):
            d.client.call("POST", "/v1/tasks", {"command": ["true"], "allow": ["1.2.3.0/33"]})
        task = d.submit(
            ops(
                connect(HOST4, 8080, send=100),
                connect(OTHER4, 8080),
                {"op": "resolve", "name": "allowed.test", "server": OTHER4},
                connect("allowed.test", 9090),
            ),
            user="0",
            ro=[str(REPO)],
            env={"PYTHONPATH": str(REPO / "python")},
            allow=[f"{HOST4}:8080"],
            allow_hosts=["allowed.test:9090"],
        )
        assert task["network"] == "egress" and task["allow_hosts"] == ["allowed.test:9090"]
        done = d.wait(task["id"], timeout=60)
        out = d.log(task["id"])
        assert done["state"] == "succeeded", (done["reason"], out)
        ok, denied, name, by_name = (json.loads(line) for line in out.splitlines())
        assert ok["reply"] == "100" and denied["errno"] == errno.EPERM
        assert name["addrs"] == [HOST4] and by_name["ok"]
        log = (d.data / "audit" / "audit.log").read_text().splitlines()
        audit = [r for r in map(json.loads, log) if r["kind"] == "egress_denied"]
        assert {"task": task["id"], "address": OTHER4, "port": 8080} in [
            {k: a[k] for k in ("task", "address", "port")} for a in audit
        ]
        # The end is recorded first; its network goes on the egress service's thread.
        deadline = time.monotonic() + 10
        while veths(world) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not veths(world), "the ended task's veth is removed while the node runs"
        assert (
            "agentnode0"
            in subprocess.run(
                ["ip", "-n", world.task, "-o", "link"], capture_output=True, text=True, check=True
            ).stdout
        )
    assert not veths(world)
    assert (
        "agentnode0"
        not in subprocess.run(
            ["ip", "-n", world.task, "-o", "link"], capture_output=True, text=True, check=True
        ).stdout
    )


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
import json, os, urllib.request
import openai

client = openai.OpenAI()
reply = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
stream = client.chat.completions.create(
    model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
req = urllib.request.Request(
    os.environ["OPENAI_BASE_URL"] + "/usage?group_by=task",
    headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]},
)
usage = json.load(urllib.request.urlopen(req))
print(json.dumps({"reply": reply.choices[0].message.content, "streamed": streamed,
                  "usage": usage["data"]}))
"""


def test_daemon_serves_the_inference_proxy_to_its_tasks(world: World, tmp_path: Path) -> None:
    """With [inference] configured, `agentnode run` serves the proxy on the bridge: a task that
    may reach nothing else calls it with the official SDK, unconfigured, and is billed for it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    netns = ("nsenter", f"--net=/run/netns/{world.task}")
    mock = subprocess.Popen(
        [*netns, sys.executable, "-c", MOCK_UPSTREAM], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert mock.stdout is not None
        base_url = mock.stdout.readline().strip()
        config = (
            f'[network]\nsubnet = "{subnet()}"\n'
            f'[inference]\nlisten = "127.0.0.1:{random.randint(20000, 30000)}"\n'
            f'[inference.deployments.gpt]\nkind = "openai"\nbase_url = "{base_url}"\n'
            'models = ["gpt-test"]\nprice = { input = 2.5, output = 10 }\n'
        )
        with daemon(tmp_path, config, netns) as d:
            assert any("inference http://127.0.0.1:" in line for line in d.lines), d.lines
            task = d.submit(
                [sys.executable, "-c", AGENT],
                tenant="acme",
                network="egress",
                memory="256M",
                user="0",
                ro=[str(REPO)],
                env={"PYTHONPATH": str(REPO / "python")},
            )
            done = d.wait(task["id"], timeout=60)
            out = d.log(task["id"])
            assert done["state"] == "succeeded", (done["reason"], out)
            result = json.loads(out.splitlines()[-1])
            assert result["reply"] and result["streamed"]
            (row,) = result["usage"]
            assert row["task"] == task["id"] and row["requests"] == 2
            assert float(row["cost"]) > 0, "the streamed request was priced too"
    finally:
        mock.kill()
        mock.communicate()


def test_daemon_changes_a_running_task_egress_live(world: World, tmp_path: Path) -> None:
    """`agentnode egress ID --allow …` opens a destination for a running task's next
    connection and keeps the rules in its record; bad rules and network-none tasks are refused."""
    config = f'[network]\nsubnet = "{subnet()}"\ndns_upstream = "{HOST4}:53"\n'
    prefix = ("nsenter", f"--net=/run/netns/{world.task}")
    with daemon(tmp_path, config, prefix) as d:
        task = d.submit(
            ops(connect(OTHER4, 8080), {"op": "wait_for", "path": "/workspace/go"},
                connect(OTHER4, 8080, send=10)),
            user="0", ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")},
            allow=[f"{HOST4}:8080"],
        )  # fmt: skip
        log = d.data / "logs" / f"{task['id']}.1.log"
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        socket = ["--socket", str(d.socket)]
        bad = run_cli(["egress", task["id"], "--allow", "10.0.0.0/33", *socket])
        assert bad.returncode == 2 and "--allow '10.0.0.0/33'" in bad.stderr, bad.stderr
        ok = run_cli(["egress", task["id"], "--allow", f"{OTHER4}:8080", *socket])
        assert ok.returncode == 0 and f"{OTHER4}:8080 allowed" in ok.stdout, ok.stderr
        (d.data / "workspaces" / task["id"] / "go").touch()
        done = d.wait(task["id"], timeout=60)
        before, after = (json.loads(line) for line in d.log(task["id"]).splitlines())
        assert before["errno"] == errno.EPERM and after["reply"] == "10", (before, after)
        assert done["allow"] == [f"{OTHER4}:8080"], "the record keeps the new rules"
        quiet = d.submit(["sleep", "30"])
        with pytest.raises(AgentnodeError, match="network none"):
            d.client.call("PUT", f"/v1/tasks/{quiet['id']}/egress", {"allow": [f"{HOST4}:80"]})
        with pytest.raises(AgentnodeError, match="unknown field"):
            d.client.call("PUT", f"/v1/tasks/{task['id']}/egress", {"network": "host"})


@pytest.mark.root
def test_host_mode_keeps_the_host_network_namespace() -> None:
    """`--net host` joins the spawner's network namespace (its loopback and interfaces), while
    `--net none` gets an empty one of its own."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        probe = (
            "import socket, sys\n"
            "s = socket.socket()\ns.settimeout(2)\n"
            f"print(s.connect_ex(('127.0.0.1', {port})))\n"
            "print(len(open('/proc/net/dev').read().splitlines()) - 2)\n"
        )
        host = run_cli(["exec", "--net", "host", "--", "/usr/bin/python3", "-c", probe])
        none = run_cli(["exec", "--net", "none", "--", "/usr/bin/python3", "-c", probe])
    assert host.returncode == 0, host.stderr
    connected, interfaces = host.stdout.split()
    # The host's interfaces (the node's bridge may come and go meanwhile), not loopback alone.
    assert connected == "0" and int(interfaces) >= min(2, len(socket.if_nameindex()))
    assert none.returncode == 0, none.stderr
    assert none.stdout.split() == [str(errno.ECONNREFUSED), "1"]
