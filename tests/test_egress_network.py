"""Task networking: bridge, veth per task, masquerade, idempotence and the start-up sweep. The
node side lives in a netns the test creates (the World's task netns), never the host's."""

from __future__ import annotations

import errno
import json
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from agentnode.egress import Egress, EgressPolicy
from agentnode.egress.network import NodeNetwork
from agentnode.errors import PolicyError
from support.egress_world import HOST4, World, scratch_cgroup

pytestmark = pytest.mark.root


@pytest.fixture
def world() -> Iterator[World]:
    with World() as w:
        w.serve(tcp=[[HOST4, 8080], [HOST4, 9090]])
        yield w


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def nft_tables(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "tables"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def links(ns: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout


def test_task_reaches_uplink_through_bridge_and_masquerade(world: World) -> None:
    bridge = f"agentnode{uuid.uuid4().hex[:6]}"
    node = NodeNetwork(bridge=bridge, subnet="192.0.2.0/26", node_netns=world.task)
    try:
        node.ensure()
        node.ensure()  # idempotent: one bridge, one table, one rule
        assert nft_tables(world.task).count(node.table) == 1
        net = node.add_task(uuid.uuid4().hex)
        other = node.add_task(uuid.uuid4().hex)
        assert net.address != other.address and net.gateway == node.gateway
        with scratch_cgroup() as cg, Egress.attach(cg, EgressPolicy(allow=[f"{HOST4}:8080"])):
            # The hosts netns has no route to 192.0.2.0/26: only a masqueraded connection works.
            ok, denied = world.run(cg, {"op": "connect", "host": HOST4, "port": 8080, "send": 1000},
                                   {"op": "connect", "host": HOST4, "port": 9090}, netns=net.netns)  # fmt: skip
            assert ok["reply"] == "1000"
            assert denied["errno"] == errno.EPERM
        node.remove_task(net)
        node.remove_task(net)
        assert net.netns not in netns_names() and net.host_veth not in links(world.task)
        assert other.netns in netns_names()
    finally:
        node.close()
    assert other.netns not in netns_names()
    assert bridge not in links(world.task) and node.table not in nft_tables(world.task)


def bridge_mac(ns: str, bridge: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", bridge], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    mac: str = json.loads(out)[0]["address"]
    return mac


def test_tasks_started_at_once_get_their_own_addresses_and_the_gateway_mac_holds(
    world: World,
) -> None:
    # A bridge takes the lowest MAC of its ports unless one is set: a task leaving would change
    # the gateway's MAC under every long-lived task (their connections then stall).
    bridge = f"agentnode{uuid.uuid4().hex[:6]}"
    node = NodeNetwork(bridge=bridge, subnet="192.0.2.0/26", node_netns=world.task)
    try:
        node.ensure()
        mac = bridge_mac(world.task, bridge)
        keep = node.add_task(uuid.uuid4().hex)
        with ThreadPoolExecutor(8) as pool:
            nets = list(pool.map(lambda _: node.add_task(uuid.uuid4().hex), range(8)))
        addresses = {n.address for n in [keep, *nets]}
        assert len(addresses) == 9 and node.gateway not in addresses
        for net in nets:
            node.remove_task(net)
            assert bridge_mac(world.task, bridge) == mac
        with scratch_cgroup() as cg, Egress.attach(cg, EgressPolicy(allow=[f"{HOST4}:8080"])):
            for _ in range(2):  # before and after the gateway's MAC is cached
                (ok,) = world.run(cg, {"op": "connect", "host": HOST4, "port": 8080, "send": 10},
                                  netns=keep.netns)  # fmt: skip
                assert ok["reply"] == "10"
                extra = node.add_task(uuid.uuid4().hex)
                node.remove_task(extra)
        node.close()
        node.ensure()  # made again: the same MAC
        assert bridge_mac(world.task, bridge) == mac
    finally:
        node.close()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"bridge": "br0"}, "'br0'"),
        ({"subnet": "10.0.0.0/33"}, "'10.0.0.0/33'"),
        ({"subnet": "10.0.0.0/31"}, "too small"),
    ],
)
def test_bad_configuration(kwargs: dict[str, str], fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment):
        NodeNetwork(**kwargs)


#: Run in the test's netns as a node is (`nsenter --net`, no `node_netns`): a task's netns is
#: made in the same `ip -batch` as its veth there; what it printed is checked by the test.
_IN_NODE = """
import hashlib, json, os, subprocess, sys, uuid
from agentnode.egress.network import TASK_NETNS_PREFIX, NodeNetwork
from agentnode.errors import EgressError

node = NodeNetwork(bridge=sys.argv[1], subnet="192.0.2.64/26")
out = {}
try:
    node.ensure()
    nets = [node.add_task(uuid.uuid4().hex) for _ in range(3)]
    out["addresses"] = sorted({str(n.address) for n in nets})
    out["eth0"] = [subprocess.run(["ip", "-n", n.netns, "-o", "-4", "addr", "show", "eth0"],
                                  capture_output=True, text=True).stdout for n in nets]
    out["mine"] = os.readlink("/proc/self/ns/net")
    for n in nets:
        node.remove_task(n)
        node.remove_task(n)  # idempotent: both are gone, no error
    out["left"] = [os.path.exists(f"/run/netns/{n.netns}") for n in nets]
    task = uuid.uuid4().hex
    taken = TASK_NETNS_PREFIX + hashlib.sha256(task.encode()).hexdigest()[:8]
    subprocess.run(["ip", "netns", "add", taken], check=True)
    try:
        node.add_task(task)
    except EgressError as e:
        out["taken"] = str(e)
    out["kept"] = os.path.exists(f"/run/netns/{taken}")
    subprocess.run(["ip", "netns", "del", taken], check=True)
finally:
    node.close()
print(json.dumps(out))
"""


def test_a_task_netns_made_in_the_veth_batch_is_whole_and_goes_whole(world: World) -> None:
    """Without `node_netns` (a node's own case) a task's netns is made by the `ip -batch`
    that makes its veth: the batch stays in the node's netns, each task's netns has its
    address, removal takes both (twice is fine), and a netns of the same name that exists
    already is refused by name and left alone."""
    import sys

    from support.agent_env import REPO

    bridge = f"agentnode{uuid.uuid4().hex[:6]}"
    r = subprocess.run(
        ["nsenter", f"--net=/run/netns/{world.task}", sys.executable, "-c", _IN_NODE, bridge],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO / "python")},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["addresses"]) == 3
    for address in out["addresses"]:
        assert sum(f"inet {address}/26 " in eth0 for eth0 in out["eth0"]) == 1
    assert out["left"] == [False, False, False]
    assert "exists" in out["taken"] and out["kept"]
    world_ns = subprocess.run(["ip", "netns", "exec", world.task, "readlink", "/proc/self/ns/net"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert out["mine"] == world_ns
    assert bridge not in links(world.task)  # closed
