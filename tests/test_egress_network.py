"""Task networking: bridge, veth per task, masquerade, idempotence and the start-up sweep. The
node side lives in a netns the test creates (the World's task netns), never the host's."""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from agentnode import _native
from agentnode.egress import Egress, EgressPolicy
from agentnode.egress.network import RUN_NETNS, TASK_NETNS_PREFIX, VETH_PREFIX, NodeNetwork
from agentnode.errors import EgressError, PolicyError
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


def test_released_task_networks_go_with_their_namespaces_and_a_held_one_is_deleted(
    world: World,
) -> None:
    """`release_task` unnames the netns and leaves the veth pair to the kernel's batched
    namespace cleanup: `reap` sees every one of a burst go by itself (the addresses free for
    the next tasks), and deletes the veth of a netns something still holds, which the task
    side then loses too; a released network is released again without an error."""
    bridge = f"agentnode{uuid.uuid4().hex[:6]}"
    node = NodeNetwork(bridge=bridge, subnet="192.0.2.0/26", node_netns=world.task)
    try:
        node.ensure()
        nets = [node.add_task(uuid.uuid4().hex) for _ in range(12)]
        held = nets.pop()
        fd = os.open(f"/run/netns/{held.netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for net in [*nets, held]:
                node.release_task(net)
                node.release_task(net)
            assert not {n.netns for n in [*nets, held]} & netns_names()
            assert node.reap([n.host_veth for n in nets], timeout=10) == []
            assert node.reap([held.host_veth], timeout=0.3) == [held.host_veth]
            assert not any(n.host_veth in links(world.task) for n in [*nets, held])
            inside = subprocess.run(["nsenter", f"--net=/proc/self/fd/{fd}", "ip", "-o", "link"],
                                    capture_output=True, text=True, check=True, pass_fds=(fd,))  # fmt: skip
            assert "eth0" not in inside.stdout  # the pair went with its host end
        finally:
            os.close(fd)
        again = [node.add_task(uuid.uuid4().hex) for _ in range(12)]
        assert {a.address for a in again} == {n.address for n in [*nets, held]}
        for net in again:
            node.remove_task(net)
    finally:
        node.close()


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
    subprocess.run(["ip", "-n", taken, "link", "add", "eth0", "type", "bridge"], check=True)
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


# --- A task's network over rtnetlink: what it is made of, and nothing left on any failure ---


def task_names(task_id: str) -> tuple[str, str]:
    """The netns and veth names `add_task` gives `task_id`."""
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:8]
    return f"{TASK_NETNS_PREFIX}{digest}", f"{VETH_PREFIX}{digest}"


def link_names(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return {str(link["ifname"]) for link in json.loads(out)}


def ip_j(ns: str, *argv: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", ns, "-j", *argv], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return list(json.loads(out))


def assert_no_trace(world: World, task_id: str, links_before: set[str]) -> None:
    """Neither netns name nor veth of `task_id`, and no link more in the node's netns."""
    netns, veth = task_names(task_id)
    assert not os.path.lexists(f"/run/netns/{netns}")
    assert netns not in netns_names()
    assert link_names(world.task) == links_before
    assert veth not in link_names(world.task)


@pytest.fixture
def node(world: World) -> Iterator[NodeNetwork]:
    n = NodeNetwork(bridge=f"agentnode{uuid.uuid4().hex[:6]}", subnet="192.0.2.0/26",
                    node_netns=world.task)  # fmt: skip
    n.ensure()
    yield n
    n.close()


_CONNECT = """
import errno, socket, sys
s = socket.socket()
s.settimeout(8)
try:
    s.connect((sys.argv[1], 9))
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"""


def connect_errno(netns: str, address: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _CONNECT, address],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()  # fmt: skip


def test_a_task_network_is_made_as_the_ip_runs_made_it(world: World, node: NodeNetwork) -> None:
    """Netns with lo up and eth0 (the address, MTU 1500, up, IPv6 link-local as the kernel
    makes it), the default route via the bridge; the veth on the bridge, up, isolated, with
    the owner alias. An isolated port: one task does not reach another at layer 2."""
    task_id = uuid.uuid4().hex
    net = node.add_task(task_id)
    other = node.add_task(uuid.uuid4().hex)
    try:
        assert (net.netns, net.host_veth) == task_names(task_id)
        inside = {link["ifname"]: link for link in ip_j(net.netns, "-d", "addr", "show")}
        assert set(inside) == {"lo", "eth0"}
        assert "UP" in inside["lo"]["flags"] and "UP" in inside["eth0"]["flags"]
        assert inside["eth0"]["mtu"] == 1500
        eth0 = {(a["family"], a["local"], a["prefixlen"]) for a in inside["eth0"]["addr_info"]}
        assert ("inet", str(net.address), 26) in eth0
        assert any(family == "inet6" and a.startswith("fe80:") for family, a, _ in eth0)
        (default,) = [r for r in ip_j(net.netns, "route", "show") if r["dst"] == "default"]
        assert default["gateway"] == str(node.gateway) and default["dev"] == "eth0"
        (veth,) = ip_j(world.task, "-d", "link", "show", net.host_veth)
        assert veth["master"] == node.bridge and "UP" in veth["flags"]
        assert veth["linkinfo"]["info_slave_data"]["isolated"] is True
        assert veth["ifalias"] == f"agentnode {net.address} {node.owner} {task_id}"
        assert connect_errno(net.netns, str(node.gateway)) == "ECONNREFUSED"
        assert connect_errno(net.netns, str(other.address)) == "EHOSTUNREACH"
    finally:
        node.remove_task(net)
        node.remove_task(other)


def test_task_netns_names_nothing_uses_are_swept_and_a_start_frees_its_own(
    world: World, node: NodeNetwork
) -> None:
    """A task netns whose veth pair is gone (deleted by hand, or with a node netns that was
    not the host's), and a name a crash left between making it and mounting the netns on it:
    no veth leads to either, so the sweep finds them by name. A start of a task whose name is
    such a leftover frees it. A name that leads to a live netns stays, and so does a fresh
    unmounted one (another process may be naming it now)."""
    links = link_names(world.task)
    lost = node.add_task(uuid.uuid4().hex)
    subprocess.run(["ip", "-n", world.task, "link", "del", lost.host_veth], check=True)
    stale, fresh = (RUN_NETNS / f"{TASK_NETNS_PREFIX}{uuid.uuid4().hex[:8]}" for _ in range(2))
    for name in (stale, fresh):
        name.touch(mode=0)
    os.utime(stale, (time.time() - 60, time.time() - 60))
    live = f"{TASK_NETNS_PREFIX}{uuid.uuid4().hex[:8]}"  # another node's task, say
    subprocess.run(["ip", "netns", "add", live], check=True)
    subprocess.run(["ip", "-n", live, "link", "add", "eth0", "type", "bridge"], check=True)
    try:
        assert {_native.TaskNetwork.netns_state(n) for n in (lost.netns, stale.name)} == {
            "orphaned", "unmounted"}  # fmt: skip
        assert _native.TaskNetwork.netns_state(live) == "live"
        node.sweep()
        assert not os.path.lexists(RUN_NETNS / lost.netns) and not stale.exists()
        assert fresh.exists() and os.path.ismount(RUN_NETNS / live)
        assert _native.TaskNetwork.netns_state(lost.netns) == "absent"
        for leftover in ("orphaned", "unmounted"):
            task_id = uuid.uuid4().hex
            netns, _ = task_names(task_id)
            if leftover == "orphaned":
                subprocess.run(["ip", "netns", "add", netns], check=True)
            else:
                (RUN_NETNS / netns).touch(mode=0)  # just made: a start frees its own at once
            net = node.add_task(task_id)
            assert "eth0" in {link["ifname"] for link in ip_j(net.netns, "link", "show")}
            node.remove_task(net)
            assert_no_trace(world, task_id, links)
    finally:
        fresh.unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", live], check=True)
    assert link_names(world.task) == links


@pytest.mark.parametrize("clash", ["netns", "veth"])
def test_a_name_that_exists_is_refused_and_kept(
    world: World, node: NodeNetwork, clash: str
) -> None:
    task_id = uuid.uuid4().hex
    netns, veth = task_names(task_id)
    if clash == "netns":  # a live one: an orphaned one would be freed (above)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "bridge"], check=True)
    else:
        subprocess.run(["ip", "-n", world.task, "link", "add", veth, "type", "bridge"], check=True)
    links = link_names(world.task)
    try:
        with pytest.raises(EgressError, match=f"{netns} exists" if clash == "netns" else veth):
            node.add_task(task_id)
        assert link_names(world.task) == links
        if clash == "netns":
            assert os.path.ismount(f"/run/netns/{netns}")  # the other one's, untouched
            assert veth not in links
        else:
            assert not os.path.lexists(f"/run/netns/{netns}")
            (dummy,) = ip_j(world.task, "-d", "link", "show", veth)
            assert dummy["linkinfo"]["info_kind"] == "bridge" and "master" not in dummy
    finally:
        if clash == "netns":
            subprocess.run(["ip", "netns", "del", netns], check=True)
        else:
            subprocess.run(["ip", "-n", world.task, "link", "del", veth], check=True)
    assert_no_trace(world, task_id, links - {veth})


def test_a_missing_bridge_is_named_and_leaves_nothing(world: World) -> None:
    node = NodeNetwork(bridge=f"agentnode{uuid.uuid4().hex[:6]}", subnet="192.0.2.0/26",
                       node_netns=world.task)  # fmt: skip
    links = link_names(world.task)
    task_id = uuid.uuid4().hex
    with pytest.raises(EgressError, match=f"bridge {node.bridge} does not exist"):
        node.add_task(task_id)
    assert_no_trace(world, task_id, links)


@pytest.mark.parametrize(
    ("prefix", "gateway", "step"),
    [
        (26, "203.0.113.1", "adding the default route via 203.0.113.1"),  # off-link gateway
        (33, "192.0.2.1", "adding 192.0.2.9/33 to eth0"),
    ],
)
def test_a_failure_mid_way_leaves_nothing(
    world: World, node: NodeNetwork, prefix: int, gateway: str, step: str
) -> None:
    """A step after the veth exists fails (its alias, port options and part of the netns
    made): the veth goes and the netns is never named."""
    task_id = uuid.uuid4().hex
    netns, veth = task_names(task_id)
    links = link_names(world.task)
    tasks = _native.TaskNetwork(node_netns=f"/run/netns/{world.task}")
    with pytest.raises(EgressError, match=step):
        tasks.add_task(netns=netns, veth=veth, alias=f"agentnode 192.0.2.9 {node.owner} {task_id}",
                       bridge=node.bridge, address=int(ipaddress.IPv4Address("192.0.2.9")),
                       prefix=prefix, gateway=int(ipaddress.IPv4Address(gateway)))  # fmt: skip
    assert_no_trace(world, task_id, links)
    assert tasks.remove_task(veth=veth, netns=netns) == (False, False)


def test_a_netns_gone_mid_way(world: World, node: NodeNetwork) -> None:
    """A task's netns removed by someone else before its end: the end removes the veth all
    the same, twice is fine. A node netns that is gone is named, and nothing is made."""
    links = link_names(world.task)
    task_id = uuid.uuid4().hex
    net = node.add_task(task_id)
    subprocess.run(["ip", "netns", "del", net.netns], check=True)
    node.remove_task(net)
    node.remove_task(net)
    assert_no_trace(world, task_id, links)
    gone = NodeNetwork(bridge=node.bridge, subnet="192.0.2.64/26",
                       node_netns=f"agentnode-gone-{uuid.uuid4().hex[:6]}")  # fmt: skip
    with pytest.raises(EgressError, match="cannot enter the node's network namespace"):
        gone.add_task(task_id)
    assert_no_trace(world, task_id, links)


#: Makes and removes task networks until killed (each lives a few ms, as if a task ran);
#: prints each task id before its `add_task`.
_CHURN = """
import random, sys, time, uuid
from agentnode.egress.network import NodeNetwork
node = NodeNetwork(bridge=sys.argv[1], subnet="192.0.2.0/26", node_netns=sys.argv[2])
print("owner", node.owner, flush=True)
while True:
    task_id = uuid.uuid4().hex
    print(task_id, flush=True)
    net = node.add_task(task_id)
    time.sleep(random.uniform(0, 0.005))
    node.remove_task(net)
"""


def test_a_kill_at_any_point_leaves_only_what_the_sweep_removes(
    world: World, node: NodeNetwork
) -> None:
    """An owner killed with -9 anywhere in a task's set-up or tear-down: what it leaves is a
    veth the sweep finds by its alias (and the netns name that goes with it), or a netns held
    by no one, which the kernel takes down with its veth pair."""
    from support.agent_env import REPO

    links = link_names(world.task)
    rng = random.Random()
    for _ in range(6):
        churn = subprocess.Popen(
            [sys.executable, "-c", _CHURN, node.bridge, world.task],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "python")},
        )  # fmt: skip
        assert churn.stdout is not None
        assert churn.stdout.readline().startswith("owner ")
        first = churn.stdout.readline().strip()  # its first task is under way
        time.sleep(rng.uniform(0, 0.2))
        churn.send_signal(signal.SIGKILL)
        ids = [first, *(line.strip() for line in churn.communicate()[0].splitlines())]
        node.sweep()
        deadline = time.monotonic() + 20
        while link_names(world.task) != links and time.monotonic() < deadline:
            time.sleep(0.05)
        for task_id in ids:
            assert_no_trace(world, task_id, links)
