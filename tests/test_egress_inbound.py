"""Nothing reaches a task unasked (issue 23, hole 1): its answers to peers its policy does not
allow are dropped by the kernel backstop (an accepted socket never calls connect()), new
connections forwarded into the node bridge are dropped, tasks do not reach each other, and a
port published with `--publish HOSTPORT:PORT` is reachable through the node's host port.

Every address is one the test assigned inside namespaces it created (198.51.100.0/24,
2001:db8::/64, a random 10.x/24 node subnet inside them)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentnode.egress import Denial, Egress, EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.errors import AgentnodeError, PolicyError
from support.egress_world import HOST4, HOST6, OTHER4, OTHER6, TASK4, TASK6, World, scratch_cgroup
from support.node_daemon import daemon
from test_node import swept_cgroups

pytestmark = pytest.mark.root

HERE = Path(__file__).parent
REPO = HERE.parent
CLIENT = str(HERE / "support" / "egress_client.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO / "python")}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        yield w


@pytest.fixture
def cgroup() -> Iterator[Path]:
    with scratch_cgroup() as cg:
        yield cg


def from_hosts(world: World, *ops: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs client ops in the hosts netns: a neighbour of the task (or of the node)."""
    out = subprocess.run(
        ["ip", "netns", "exec", world.hosts, sys.executable, CLIENT, json.dumps(list(ops))],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines()]


def talk(host: str, port: int, **kw: Any) -> dict[str, Any]:
    return {"op": "talk", "host": host, "port": port, **kw}


@contextlib.contextmanager
def listening(
    world: World, cgroup: Path, ports: list[int], *, seconds: float = 6, udp: bool = False
) -> Iterator[dict[str, Any]]:
    """A task process in `cgroup` serving `ports`; the dict gets its result at the end."""
    procs = cgroup / "cgroup.procs"
    op = {"op": "serve", "ports": ports, "seconds": seconds, "udp": udp}
    p = subprocess.Popen(
        ["ip", "netns", "exec", world.task, sys.executable, CLIENT, json.dumps([op])],
        preexec_fn=lambda: procs.write_text(str(os.getpid())),
        stdout=subprocess.PIPE,
        text=True,
    )
    result: dict[str, Any] = {}
    try:
        assert p.stdout is not None
        assert json.loads(p.stdout.readline())["listening"] == ports
        yield result
        out, _ = p.communicate(timeout=seconds + 10)
        result.update(json.loads(out))
    finally:
        p.kill()
        p.communicate()


def test_backstop_drops_answers_to_peers_the_policy_does_not_allow(
    world: World, cgroup: Path
) -> None:
    """Straight from a neighbour on the task's link (no forwarding, so only BPF can stop it):
    over IPv4 and IPv6, from two addresses, from a peer allowed on another port, over UDP."""
    denials: list[Denial] = []
    policy = EgressPolicy(allow=[f"{HOST4}:8080", f"{HOST6}:8080"])
    with Egress.attach(cgroup, policy, on_denial=denials.append) as eg:
        with listening(world, cgroup, [5000], seconds=8) as served:
            tries = from_hosts(
                world,
                talk(TASK4, 5000),
                talk(TASK6, 5000),
                talk(TASK4, 5000, source=OTHER4),
                talk(TASK4, 5000, timeout=3),  # SYN-ACK retransmits are dropped too
            )
        assert all(not t["ok"] and t["timeout"] for t in tries), tries
        assert served["peers"] == []
        eg.poll_denials()
        assert eg.stats()["packets_dropped"] >= 4
        dropped = {str(d.address) for d in denials if d.reason == "backstop"}
        assert {HOST4, OTHER4} <= dropped and any(":" in a for a in dropped), dropped
        with listening(world, cgroup, [5001], udp=True, seconds=3) as served:
            (udp,) = from_hosts(world, talk(TASK4, 5001, udp=True))
        assert not udp["ok"] and served["peers"] == [] and served["errors"], served


def test_backstop_admits_allowed_peers_and_published_ports(world: World, cgroup: Path) -> None:
    with Egress.attach(cgroup, EgressPolicy(allow=[HOST4])) as eg:
        with listening(world, cgroup, [5000, 5002]) as served:
            by_allowed, by_other = from_hosts(
                world, talk(TASK4, 5000), talk(TASK4, 5000, source=OTHER4)
            )
            # Published ports answer any peer; other ports still only allowed ones.
            eg.update(EgressPolicy(allow=[HOST4], publish=["15002:5002"]))
            published, unpublished = from_hosts(
                world, talk(TASK6, 5002, source=OTHER6), talk(TASK4, 5000, source=OTHER4)
            )
        assert by_allowed["ok"] and not by_other["ok"]
        assert published["ok"] and not unpublished["ok"]
        assert sorted(map(tuple, served["peers"])) == [(HOST4, 5000), (OTHER6, 5002)]


def test_publish_rules_are_checked() -> None:
    for bad, fragment in (
        (["80"], "HOSTPORT:PORT"),
        (["0:80"], "1-65535"),
        (["8080:70000"], "1-65535"),
        (["8080:80", "8080:81"], "a host port twice"),
        ("8080:80", "list of rules"),
    ):
        with pytest.raises(PolicyError, match=fragment):
            EgressPolicy(publish=bad)
    with pytest.raises(PolicyError, match="unspecified address"):
        EgressPolicy(allow=["::/128"])


def subnet() -> str:
    return f"10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24"


def task_addresses(world: World) -> list[str]:
    """The addresses of the task veths on the node bridge (from their aliases)."""
    out = subprocess.run(
        ["ip", "-n", world.task, "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return [
        link["ifalias"].split()[1]
        for link in json.loads(out)
        if link.get("ifname", "").startswith("anv") and "ifalias" in link
    ]


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def serve_ops(*ports: int, seconds: float) -> list[str]:
    return [sys.executable, CLIENT, json.dumps([{"op": "serve", "ports": list(ports),
                                                 "seconds": seconds}])]  # fmt: skip


def test_exec_task_is_unreachable_unless_published(world: World) -> None:
    """`agentnode exec --publish 18080:5000`: a neighbour that routes the node's task subnet
    through the node reaches neither port directly; the node's port 18080 leads to port 5000."""
    net = subnet()
    base = ["nsenter", f"--net=/run/netns/{world.task}", sys.executable, "-m", "agentnode", "exec"]
    py = ["--user", "0", "--ro", str(REPO), "--env", f"PYTHONPATH={REPO / 'python'}"]
    subprocess.run(["ip", "-n", world.hosts, "route", "add", net, "via", TASK4], check=True)
    try:
        task = subprocess.Popen(
            [*base, *py, "--publish", "18080:5000", "--allow", f"{HOST4}:8080", "--",
             *serve_ops(5000, 5001, seconds=8)],
            stdout=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        assert task.stdout is not None
        assert json.loads(task.stdout.readline())["listening"] == [5000, 5001]
        (addr,) = task_addresses(world)
        direct, direct_published, published = from_hosts(
            world, talk(addr, 5001), talk(addr, 5000), talk(TASK4, 18080)
        )
        out, _ = task.communicate(timeout=30)
        assert task.returncode == 0
        assert not direct["ok"] and not direct_published["ok"] and published["ok"]
        # The published connection arrives from the neighbour itself (DNAT, no masquerade).
        assert json.loads(out)["peers"] == [[HOST4, 5000]]
        bad = subprocess.run(
            [*base, "--net", "host", "--publish", "18080:5000", "--", "true"],
            capture_output=True, text=True, env=ENV,
        )  # fmt: skip
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert "--publish needs --net egress" in bad.stderr
    finally:
        subprocess.run(["ip", "-n", world.hosts, "route", "del", net], check=False)


def test_daemon_tasks_reach_neither_each_other_nor_are_reached(
    world: World, tmp_path: Path
) -> None:
    """Through `agentnode run`: a task's published port works through the node, its other
    ports are unreachable from a neighbour, and another task that may reach the whole task
    subnet reaches neither port (isolated bridge ports; the backstop). A host port two tasks
    ask for is refused for the second."""
    net = subnet()
    config = f'[network]\nsubnet = "{net}"\ndns_upstream = "{HOST4}:53"\n'
    prefix = ("nsenter", f"--net=/run/netns/{world.task}")
    py: dict[str, Any] = {
        "user": "0",
        "ro": [str(REPO)],
        "env": {"PYTHONPATH": str(REPO / "python")},
    }
    subprocess.run(["ip", "-n", world.hosts, "route", "add", net, "via", TASK4], check=True)
    try:
        with daemon(tmp_path, config, prefix) as d:
            server = d.submit(serve_ops(5000, 5001, seconds=10), publish=["18081:5000"], **py)
            assert server["network"] == "egress" and server["publish"] == ["18081:5000"]
            log = d.data / "logs" / f"{server['id']}.1.log"
            wait_for(lambda: log.exists() and "listening" in log.read_text())
            (addr,) = task_addresses(world)
            client = d.submit(
                [sys.executable, CLIENT, json.dumps([talk(addr, 5001), talk(addr, 5000)])],
                allow=[net], **py,
            )  # fmt: skip
            twin = d.submit(["sleep", "5"], publish=["18081:6000"], **py)
            published, direct = from_hosts(world, talk(TASK4, 18081), talk(addr, 5001))
            done = d.wait(client["id"], timeout=60)
            assert done["state"] == "succeeded", (done["reason"], d.log(client["id"]))
            to_other, to_published = (json.loads(x) for x in d.log(client["id"]).splitlines())
            assert not to_other["ok"] and not to_published["ok"]
            assert published["ok"] and not direct["ok"]
            failed = d.wait(twin["id"], timeout=60)
            assert failed["state"] != "succeeded"
            assert "host port 18081" in failed["reason"], failed["reason"]
            served = d.wait(server["id"], timeout=60)
            assert served["state"] == "succeeded", served["reason"]
            assert json.loads(d.log(server["id"]).splitlines()[-1])["peers"] == [[HOST4, 5000]]
            with pytest.raises(AgentnodeError, match="publish"):
                d.client.call("POST", "/v1/tasks", {"command": ["true"], "publish": ["x"]})
    finally:
        subprocess.run(["ip", "-n", world.hosts, "route", "del", net], check=False)
    # Nothing of the published ports stays behind.
    assert "18081" not in subprocess.run(
        ["ip", "netns", "exec", world.task, "nft", "list", "ruleset"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip


OWNER = """
import json, sys
from agentnode.egress import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.isolation import spawn
svc = EgressService(subnet=sys.argv[1], node_netns=sys.argv[2], dns_upstream=(sys.argv[3], 53))
task = spawn(["sleep", "60"], network=EgressPolicy(publish=["18090:80"]), node_network=svc)
print(json.dumps({"address": str(task._net.net.address)}), flush=True)
sys.stdin.read()
"""


def published_ports(world: World) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", world.task, "nft", "list", "map", "ip", "agentnode0", "publish"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip


def test_a_crashed_owner_leaves_no_published_port(world: World) -> None:
    """A host port left mapped would lead into whichever task gets its address next: the next
    owner's sweep removes it with the dead task's veth."""
    net = subnet()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, net, world.task, HOST4],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert owner.stdout is not None
    left = json.loads(owner.stdout.readline())
    assert f"18090 : {left['address']} . 80" in published_ports(world)
    owner.kill()
    owner.communicate()
    other = EgressService(subnet=net, node_netns=world.task, dns_upstream=(HOST4, 53))
    try:
        other.start()  # sweeps first
        wait_for(
            lambda: other.network.sweep() is not None and "18090" not in published_ports(world)
        )
    finally:
        other.close()
    assert swept_cgroups(owner.pid) == []  # its task's cgroups, as the next start sweeps them
