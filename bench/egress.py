"""Egress enforcement cost, each against the same topology in the same run without it:
iperf3 throughput from a task with a 10k-entry policy, connect() latency added by the hooks,
DNS answer latency through the forwarder vs straight to the resolver, and a 10k-entry policy
update: every entry's ports changed, every address replaced, and one entry added (against the
issue's 10 ms goal); a task's attach and detach (wall and CPU) with the node's programs loaded
once against loading them for each task, what pinning a task's enforcement (so it outlives the
node agent) adds, and what taking it over again costs; a task's network set-up and tear-down
(netns, veth, address, route; CPU with the children's and wall) over rtnetlink against the
`ip` runs the previous design spawned. Needs root; builds its own netns world."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import ipaddress
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from _harness import Bench, percentile

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from agentnode.egress import Egress, EgressPolicy
from agentnode.egress.dns import DnsForwarder, DnsLimits
from agentnode.egress.enforce import PROGRAMS_PIN, NodePrograms
from agentnode.egress.network import TASK_NETNS_PREFIX, VETH_PREFIX, NodeNetwork, TaskNet
from agentnode.egress.screen import AnswerScreen
from agentnode.node.restore import pin_dir, release_pins
from support.egress_world import HOST4, TASK4, World, scratch_cgroup


def big_policy(n: int, port: int, net: int = 10) -> EgressPolicy:
    """`n` distinct /32 rules in `net`.0.0.0/8 (never contacted) plus the bench's own host."""
    rules = [f"{net}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:{port}" for i in range(n - 1)]
    return EgressPolicy(allow=[*rules, f"{HOST4}:5201", f"{HOST4}:8080"], hosts=["bench.test"])


def measure_updates(eg: Egress, repeats: int) -> tuple[float, float, float]:
    """Median ms of live updates of the 10k policy in force: every entry's ports change; every
    address is replaced by another; one entry is added. Policies are parsed beforehand, as a
    caller holds them."""
    base = eg.policy
    ports = big_policy(10_000, 444)
    moved = big_policy(10_000, 443, net=11)
    grown = EgressPolicy(allow=[*base.allow, "10.255.255.255:1"], hosts=base.hosts)
    times: dict[str, list[float]] = {"ports": [], "moved": [], "grown": []}
    for _ in range(repeats):
        for name, policy in (("ports", ports), ("moved", moved), ("grown", grown)):
            t = time.perf_counter()
            eg.update(policy)
            times[name].append((time.perf_counter() - t) * 1000)
            eg.update(base)
    return tuple(statistics.median(times[k]) for k in ("ports", "moved", "grown"))  # type: ignore[return-value]


def measure_attach(cg: Path, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms of this process) of a task's attach and then detach, rounds
    alternating: with the node's programs loaded once (`shared`); loading them for the task as
    the previous design did (`fresh`: load and verify, attach, detach, free); the shared ones
    pinned (attach, then unpin and close); and taking a pinned task over (`adopt`)."""
    policy = EgressPolicy(allow=[f"{HOST4}:8080", "10.1.0.0/16:443"], hosts=["bench.test"])
    dns = [(HOST4, 5300)]
    times: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("shared", "fresh", "pinned", "adopt")
    }

    def timed(name: str, fn: Callable[[], object]) -> None:
        t, c = time.perf_counter(), time.process_time()
        fn()
        times[name].append(((time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000))

    def fresh() -> None:
        programs = NodePrograms.load()
        Egress.attach(cg, policy, dns=dns, programs=programs).close()
        del programs  # the last holder: the kernel frees the programs and maps

    with tempfile.TemporaryDirectory() as tmp:
        root = pin_dir(Path(tmp))
        root.mkdir(parents=True, exist_ok=True)
        node = NodePrograms.load()
        pinned_node = NodePrograms.load(pin=root / PROGRAMS_PIN)
        try:
            for i in range(rounds):
                timed("shared", lambda: Egress.attach(cg, policy, dns=dns, programs=node).close())
                timed("fresh", fresh)
                pin = root / f"c{i}"

                def pinned(pin: Path = pin) -> None:
                    eg = Egress.attach(cg, policy, dns=dns, pin=pin, programs=pinned_node)
                    eg.unpin()
                    eg.close()

                timed("pinned", pinned)
                Egress.attach(cg, policy, dns=dns, pin=pin, programs=pinned_node).leave()

                def adopt(pin: Path = pin) -> None:
                    eg = Egress.attach(
                        cg, policy, dns=dns, pin=pin, adopt=True, programs=pinned_node
                    )
                    eg.unpin()
                    eg.close()

                timed("adopt", adopt)
        finally:
            pinned_node.unpin()
            release_pins(Path(tmp))
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in times.items()
    }


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (the `ip` runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _ip(*argv: str, script: str | None = None) -> str:
    return subprocess.run(["ip", *argv], input=script, capture_output=True, text=True,
                          check=script is None).stdout  # fmt: skip


def ip_add_task(node: NodeNetwork, task_id: str) -> TaskNet:
    """The previous design's `add_task`, for comparison: the address picked from `ip -j link`'s
    aliases, then an `ip -batch` for the netns and the veth and one inside the netns."""
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:8]
    netns, veth = f"{TASK_NETNS_PREFIX}{digest}", f"{VETH_PREFIX}{digest}"
    used = {node.gateway} | {
        ipaddress.IPv4Address(str(link["ifalias"]).split()[1])
        for link in json.loads(_ip("-j", "link", "show"))
        if str(link.get("ifalias", "")).startswith("agentnode ")
    }
    address = next(a for a in node.subnet.hosts() if a not in used)
    alias = f'"agentnode {address} {node.owner} {task_id}"'
    _ip("-batch", "-", script=(
        f"netns add {netns}\nlink add {veth} type veth peer name eth0 netns {netns}\n"
        f"link set {veth} alias {alias}\nlink set {veth} master {node.bridge}\n"
        f"link set {veth} type bridge_slave isolated on\nlink set {veth} up\n"
    ))  # fmt: skip
    _ip("-n", netns, "-batch", "-", script=(
        f"link set lo up\naddr add {address}/{node.subnet.prefixlen} dev eth0\n"
        f"link set eth0 up\nroute add default via {node.gateway}\n"
    ))  # fmt: skip
    return TaskNet(task_id, netns, address, node.gateway, veth)


def ip_remove_task(net: TaskNet) -> None:
    """The previous design's `remove_task`: one `ip -force -batch`."""
    _ip("-force", "-batch", "-", script=f"link del {net.host_veth}\nnetns del {net.netns}\n")


def measure_tasknet(world: World, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Medians of a task's network made and removed: (CPU ms of this process and its children
    for both, wall ms of the set-up, wall ms of the tear-down), rounds alternating: over
    rtnetlink (`NodeNetwork.add_task`, `remove_task`) and with the `ip` runs of the previous
    design. Run on a thread moved into the World's task netns, which plays the node's (as a
    daemon's own netns is: no `ip -n`)."""
    times: dict[str, list[tuple[float, float, float]]] = {"netlink": [], "ip": []}
    failed: list[BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{world.task}") as ns:
            if libc.setns(ns.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
        node = NodeNetwork(bridge="agentnodebench", subnet="192.0.2.0/26")
        node.ensure()
        # Tasks already on the bridge: allocation reads every link's alias.
        others = [node.add_task(uuid.uuid4().hex) for _ in range(8)]
        paths: dict[str, tuple[Callable[[str], TaskNet], Callable[[TaskNet], None]]] = {
            "netlink": (node.add_task, node.remove_task),
            "ip": (lambda task_id: ip_add_task(node, task_id), ip_remove_task),
        }
        try:
            for i in range(rounds):
                for name in sorted(paths, reverse=i % 2 == 1):
                    add, remove = paths[name]
                    t, c = time.perf_counter(), _cpu()
                    net = add(uuid.uuid4().hex)
                    t1 = time.perf_counter()
                    remove(net)
                    t2 = time.perf_counter()
                    times[name].append(((_cpu() - c) * 1000, (t1 - t) * 1000, (t2 - t1) * 1000))
        finally:
            for net in others:
                node.remove_task(net)
            node.close()

    def guarded() -> None:
        try:
            run()
        except BaseException as e:
            failed.append(e)

    # The thread ends in the World's netns: no other code runs there.
    thread = threading.Thread(target=guarded, name="bench-tasknet")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return {
        k: (
            statistics.median(x[0] for x in v),
            statistics.median(x[1] for x in v),
            statistics.median(x[2] for x in v),
        )
        for k, v in times.items()
    }


def main() -> None:
    bench = Bench.from_args("egress")
    seconds = 1 if bench.quick else 5
    connects = 20_000 if bench.quick else 200_000
    queries = 200 if bench.quick else 2000
    with World() as world, scratch_cgroup() as cg:
        net = measure_tasknet(world, 20 if bench.quick else 100)
        ip_runs = "the `ip` runs of the previous design"
        bench.record("task_network_cpu_ms", net["netlink"][0], net["ip"][0], "ms CPU",
                     peer_name=f"{ip_runs}, theirs included; set-up and tear-down")  # fmt: skip
        bench.record("task_network_setup_ms", net["netlink"][1], net["ip"][1], "ms",
                     peer_name=ip_runs)  # fmt: skip
        bench.record("task_network_teardown_ms", net["netlink"][2], net["ip"][2], "ms",
                     peer_name=ip_runs)  # fmt: skip
        world.serve(
            dns={
                "addrs": [HOST4],
                "records": {"bench.test": [HOST4]},
                "ttl": 60,
                "log": "/dev/null",
            }
        )
        iperf = subprocess.Popen(
            ["ip", "netns", "exec", world.hosts, "iperf3", "-s", "-B", HOST4, "-p", "5201"],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            run_benches(bench, world, cg, seconds, connects, queries, 1 if bench.quick else 3)
        finally:
            iperf.kill()
            iperf.wait()
    bench.save()


def run_benches(
    bench: Bench, world: World, cg: Path, seconds: int, connects: int, queries: int, rounds: int
) -> None:
    policy = big_policy(10_000, 443)

    async def start(loop: asyncio.AbstractEventLoop) -> DnsForwarder:
        fwd = DnsForwarder(
            upstream=(HOST4, 53),
            screen=AnswerScreen(own=False),
            # Every check still runs; a rate no query reaches keeps the answers real ones.
            limits=DnsLimits(rate=float("inf"), burst=float("inf")),
        )
        await fwd.listen(HOST4, 5300)
        return fwd

    def measure() -> tuple[float, float, list[float]]:
        tput, conn, dns_ = world.run(
            cg,
            {"op": "iperf", "host": HOST4, "port": 5201, "seconds": seconds},
            {"op": "udp_connect_loop", "host": HOST4, "port": 8080, "n": connects},
            {"op": "resolve_loop", "name": "bench.test", "server": HOST4, "n": queries},
            timeout=120,
        )
        return tput["bps"], conn["ns"], dns_["ms"]

    # Rounds alternate bare and enforced runs, so load from the shared machine hits both alike.
    bare: list[tuple[float, float, list[float]]] = []
    ours: list[tuple[float, float, list[float]]] = []
    with world.in_hosts_thread(start) as fwd:
        for _ in range(rounds):
            bare.append(measure())
            with Egress.attach(cg, policy, dns=[(HOST4, 5300)]) as eg:
                fwd.add_task(TASK4, eg)
                ours.append(measure())
        with Egress.attach(cg, policy, dns=[(HOST4, 5300)]) as eg:
            update_ms, new_keys_ms, add_one_ms = measure_updates(eg, 5 * rounds)

    def tput(runs: list[tuple[float, float, list[float]]]) -> float:
        return statistics.median(r[0] for r in runs) / 1e9

    def conn(runs: list[tuple[float, float, list[float]]]) -> float:
        return statistics.median(r[1] for r in runs)

    def dns_p(runs: list[tuple[float, float, list[float]]], q: float) -> float:
        return percentile([ms for r in runs for ms in r[2]], q)

    bench.record("throughput", tput(ours), tput(bare), "Gbit/s",
                 peer_name="same netns, no programs", higher_is_better=True)  # fmt: skip
    bench.record(
        "connect_ns", conn(ours), conn(bare), "ns/connect", peer_name="UDP connect() without hooks"
    )
    bench.record("connect_added_ns", conn(ours) - conn(bare), 1000.0, "ns",
                 peer_name="issue goal for what the hooks add")  # fmt: skip
    bench.record("dns_p50_ms", dns_p(ours, 50), dns_p(bare, 50), "ms",
                 peer_name="straight to the resolver, no forwarder")  # fmt: skip
    bench.record("dns_p99_ms", dns_p(ours, 99), dns_p(bare, 99), "ms",
                 peer_name="straight to the resolver, no forwarder")  # fmt: skip
    bench.record("dns_p99_added_ms", dns_p(ours, 99) - dns_p(bare, 99), 1.0, "ms",
                 peer_name="issue goal for what the forwarder adds")  # fmt: skip
    bench.record(
        "update_10k_ms", update_ms, 10.0, "ms", peer_name="issue goal; every entry's ports change"
    )
    bench.record(
        "update_10k_new_keys_ms", new_keys_ms, 10.0, "ms",
        peer_name="issue goal; 10k new addresses replace 10k old ones",
    )  # fmt: skip
    bench.record(
        "update_add1_of_10k_ms", add_one_ms, 10.0, "ms", peer_name="issue goal; one entry added"
    )
    m = measure_attach(cg, 10 if rounds == 1 else 40)
    bench.record("attach_detach_cpu_ms", m["shared"][1], m["fresh"][1], "ms CPU",
                 peer_name="loading the programs for each task (the previous design)")  # fmt: skip
    bench.record("attach_detach_ms", m["shared"][0], m["fresh"][0], "ms",
                 peer_name="loading the programs for each task (the previous design)")  # fmt: skip
    bench.record("attach_detach_pinned_ms", m["pinned"][0], m["shared"][0], "ms",
                 peer_name="the same unpinned (dies with its owner)")  # fmt: skip
    bench.record("adopt_pinned_ms", m["adopt"][0], m["shared"][0], "ms",
                 peer_name="an unpinned attach and detach")  # fmt: skip


if __name__ == "__main__":
    main()
