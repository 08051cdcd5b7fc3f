"""Egress enforcement on real cgroups, BPF programs and network namespaces. Every address is one
the test assigned inside namespaces it created (198.51.100.0/24, 2001:db8::/64)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest

from agentnode import _native
from agentnode.egress import Denial, Egress, EgressPolicy
from agentnode.egress.dns import DnsForwarder
from agentnode.egress.screen import AnswerScreen
from agentnode.errors import EgressError
from agentnode.node.restore import pin_dir, release_pins
from support.egress_bpf import attached_programs, map_ids, task_entries
from support.egress_world import HOST4, HOST6, OTHER4, OTHER6, TASK4, TASK6, World, scratch_cgroup

pytestmark = pytest.mark.root

FWD_PORT = 5300
#: These forwarders share the hosts netns with the test upstreams, whose addresses are then the
#: forwarder's own: guarding those would drop every answer.
TEST_SCREEN = AnswerScreen(own=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    log = tmp_path_factory.mktemp("dns") / "queries.log"
    log.write_text("")
    with World() as w:
        w.serve(
            tcp=[
                [HOST4, 8080],
                [HOST4, 9090],
                [OTHER4, 8080],
                [HOST6, 8080],
                [HOST6, 9090],
                [HOST4, 7777],
            ],
            udp=[[HOST4, 7000], [OTHER4, 7000]],
            dns={
                "addrs": [HOST4],
                "records": {
                    "allowed.test": [HOST4],
                    "six.test": [HOST4, HOST6],
                    "short.test": [HOST4],
                    "blocked.test": [HOST4],
                    "tcp.test": [HOST4],
                    "big.test": [HOST6],
                },
                "truncate": ["big.test"],
                "ttl": 1,
                "log": str(log),
            },
        )
        w.dns_log = log  # type: ignore[attr-defined]
        yield w


@pytest.fixture
def cgroup() -> Iterator[Path]:
    with scratch_cgroup() as cg:
        yield cg


def connect(host: str, port: int, **kw: Any) -> dict[str, Any]:
    return {"op": "connect", "host": host, "port": port, **kw}


def test_deny_by_default_cidr_port_ipv6_and_counters(
    world: World, cgroup: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="agentnode.audit.egress")
    denials: list[Denial] = []
    policy = EgressPolicy(allow=[f"{HOST4}/32:8080", f"[{HOST6}/128]:8080"])
    with Egress.attach(cgroup, policy, on_denial=denials.append) as eg:
        assert len(attached_programs(cgroup)) == 9
        maps = map_ids(cgroup)
        assert len(maps) >= 5
        assert task_entries(maps, eg.cgroup_id) == 2
        size = 2_000_000
        r = world.run(
            cgroup,
            connect(HOST4, 8080, send=size),
            connect(HOST4, 9090),
            connect(OTHER4, 8080),
            {"op": "udp", "host": HOST4, "port": 7000},
            {"op": "raw_icmp", "host": HOST4},
            connect(HOST6, 8080),
            connect(HOST6, 9090),
            connect(OTHER6, 8080),
            connect(f"::ffff:{HOST4}", 8080),
            connect(f"::ffff:{HOST4}", 9090),
            {"op": "fastopen", "host": HOST4, "port": 9090},
        )
        ok, port, host, udp, icmp, v6, v6port, v6host, mapped, mapped_port, tfo = r
        assert ok["ok"] and ok["reply"] == str(size)
        for denied in (port, host, udp, v6port, v6host, mapped_port, tfo):
            assert not denied["ok"] and denied["errno"] == errno.EPERM, denied
        assert port["ms"] < 1.0 and host["ms"] < 1.0  # at once, never a timeout
        assert not icmp["ok"] and icmp["errno"] == errno.EPERM
        assert v6["ok"] and mapped["ok"]
        stats = eg.stats()
        # Counted per packet sent, retransmissions included (a loaded host retransmits a few %).
        assert size <= stats["bytes_out"] <= size * 1.1 + 20_000
        assert stats["connections_denied"] == 7
        assert stats["connections_allowed"] == 3
        assert stats["packets_dropped"] >= 1
        assert stats["bytes_in"] > 0 and stats["packets_out"] > 0
        eg.poll_denials()
    reasons = {(str(d.address), d.port, d.protocol, d.reason) for d in denials}
    assert (HOST4, 9090, "tcp", "policy") in reasons
    assert (HOST4, 7000, "udp", "policy") in reasons
    assert (HOST4, 0, "icmp", "backstop") in reasons
    assert (HOST6, 9090, "tcp", "policy") in reasons
    assert f"{HOST4} port 9090 (policy)" in caplog.text
    # Closed: no program on the cgroup, and no entry of the task in the node's maps.
    assert attached_programs(cgroup) == []
    assert task_entries(maps, eg.cgroup_id) == 0


def test_live_update_applies_to_next_connection(world: World, cgroup: Path) -> None:
    with Egress.attach(cgroup, EgressPolicy(allow=[f"{HOST4}:8080"])) as eg:
        assert [x["ok"] for x in world.run(cgroup, connect(HOST4, 8080), connect(HOST4, 9090))] == [
            True,
            False,
        ]
        eg.update(EgressPolicy(allow=[f"{HOST4}:9090"]))
        assert [x["ok"] for x in world.run(cgroup, connect(HOST4, 8080), connect(HOST4, 9090))] == [
            False,
            True,
        ]
        eg.update(EgressPolicy(allow=["198.51.100.0/24:8000-9999", f"{HOST4}:7777"]))
        r = world.run(cgroup, connect(HOST4, 8080), connect(OTHER4, 8080), connect(HOST4, 7777))
        assert [x["ok"] for x in r] == [True, True, True]


def test_pinned_enforcement_outlives_its_handle_and_is_taken_over(
    world: World, cgroup: Path, tmp_path: Path
) -> None:
    """Pinned, the policy holds with no handle (the node agent gone); a new handle takes it over
    with the recorded policy, its counters and the denials queued meanwhile; unpinned, nothing
    stays. Missing pins are a one-line error, never a silent unenforced task."""
    root = pin_dir(tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    pin = root / "c1"
    try:
        eg = Egress.attach(cgroup, EgressPolicy(allow=[f"{HOST4}:8080"]), pin=pin)
        maps = map_ids(cgroup)
        eg.leave()
        assert eg.closed and len(attached_programs(cgroup)) == 9, "the pins hold it"
        assert [
            x["ok"] for x in world.run(cgroup, connect(HOST4, 8080), connect(OTHER4, 8080))
        ] == [
            True,
            False,
        ]
        denials: list[Denial] = []
        policy = EgressPolicy(allow=[f"{HOST4}:9090"], conn_rate=100)
        again = Egress.attach(cgroup, policy, pin=pin, adopt=True, on_denial=denials.append)
        assert map_ids(cgroup) == maps, "the same maps, not a fresh load"
        assert again.stats()["connections_denied"] == 1, "counters went on"
        again.poll_denials()
        assert [(str(d.address), d.port) for d in denials] == [(OTHER4, 8080)], "the gap's denial"
        r = world.run(cgroup, connect(HOST4, 8080), connect(HOST4, 9090))
        assert [x["ok"] for x in r] == [False, True], "the policy given at the takeover holds"
        again.unpin()
        again.close()
        assert attached_programs(cgroup) == [] and not pin.exists()
        with pytest.raises(EgressError, match=r"no pinned egress enforcement at .*c1"):
            Egress.attach(cgroup, policy, pin=pin, adopt=True)
        # A failed attach (its pin directory exists already) leaves nothing either.
        pin.mkdir()
        with pytest.raises(EgressError, match="cannot pin the egress enforcement"):
            Egress.attach(cgroup, policy, pin=pin)
        assert attached_programs(cgroup) == [] and list(pin.iterdir()) == []
        assert _native.EgressHandle.remove_pins(pin) and not pin.exists()
    finally:
        release_pins(tmp_path)
    assert not (tmp_path / "bpf").exists()


def test_live_updates_never_deny_what_both_policies_allow(world: World, cgroup: Path) -> None:
    """While a task connects in a loop, policies of 10k entries replace each other: every key
    changes, and HOST4:8080 moves between a host rule, a CIDR rule and a port range. Allowed
    before and after, it must never be denied in between."""

    def hosts(net: int, port: int) -> list[str]:
        return [f"10.{net}.{i >> 8 & 255}.{i & 255}:{port}" for i in range(10_000)]

    policies = [
        EgressPolicy(allow=[*hosts(0, 443), f"{HOST4}:8080"]),
        EgressPolicy(allow=[*hosts(1, 444), "198.51.100.0/24:8080"]),
        EgressPolicy(allow=[*hosts(2, 443), f"{HOST4}:8000-8090/udp", "198.51.100.0/24:9"]),
    ]
    with Egress.attach(cgroup, policies[0]) as eg:
        result: list[dict[str, Any]] = []
        loop = threading.Thread(
            target=lambda: result.extend(
                world.run(cgroup, {"op": "udp_connect_until", "host": HOST4, "port": 8080,
                                   "seconds": 3})
            )
        )  # fmt: skip
        loop.start()
        updates = 0
        while loop.is_alive():
            eg.update(policies[updates % len(policies)])
            updates += 1
        loop.join()
        (r,) = result
        assert r["errors"] == {} and r["n"] > 1000, r
        assert updates > 20
        # The loop would have seen a denial: the hook is live.
        eg.update(EgressPolicy(allow=hosts(0, 443)))
        assert (
            world.run(cgroup, {"op": "udp", "host": HOST4, "port": 8080})[0]["errno"] == errno.EPERM
        )


def test_an_update_that_does_not_fit_leaves_the_old_policy(world: World, cgroup: Path) -> None:
    def hosts(net: int, port: int) -> list[str]:
        return [f"{net}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:{port}" for i in range(40_000)]

    old = EgressPolicy(allow=[*hosts(10, 443), f"{HOST4}:8080"])
    # 40k new addresses on top of 40k old ones do not fit the 64Ki-entry map at once.
    new = EgressPolicy(allow=[*hosts(11, 443), f"{HOST4}:9090"])
    with Egress.attach(cgroup, old) as eg:
        with pytest.raises(EgressError, match=r"allow_host is full .* in steps"):
            eg.update(new)
        assert eg.policy is old
        r = world.run(cgroup, connect(HOST4, 8080), connect(HOST4, 9090))
        assert r[0]["ok"] and r[1]["errno"] == errno.EPERM
        eg.update(EgressPolicy(allow=[f"{HOST4}:9090"]))  # a later update diffs from the truth
        r = world.run(cgroup, connect(HOST4, 8080), connect(HOST4, 9090))
        assert r[0]["errno"] == errno.EPERM and r[1]["ok"]


def test_update_forgets_dns_learned_addresses_when_host_rules_change(
    world: World, cgroup: Path
) -> None:
    with Egress.attach(cgroup, EgressPolicy(hosts=["a.test:8080"])) as eg:
        eg.allow_resolved(HOST4, eg.policy.host_ports("a.test"), ttl=60)
        assert world.run(cgroup, connect(HOST4, 8080))[0]["ok"]
        eg.update(EgressPolicy(hosts=["a.test:8080"], rate="10MiB/s"))  # same names: kept
        assert world.run(cgroup, connect(HOST4, 8080))[0]["ok"]
        eg.update(EgressPolicy(hosts=["b.test:8080"]))
        assert world.run(cgroup, connect(HOST4, 8080))[0]["errno"] == errno.EPERM


def test_two_tasks_do_not_leak_into_each_other(world: World) -> None:
    with (
        scratch_cgroup() as a,
        scratch_cgroup() as b,
        Egress.attach(a, EgressPolicy(allow=[f"{HOST4}:8080"])) as ea,
        Egress.attach(b, EgressPolicy(allow=[f"{HOST4}:9090"])) as eb,
    ):
        assert [x["ok"] for x in world.run(a, connect(HOST4, 8080), connect(HOST4, 9090))] == [
            True,
            False,
        ]
        assert [x["ok"] for x in world.run(b, connect(HOST4, 8080), connect(HOST4, 9090))] == [
            False,
            True,
        ]
        assert ea.stats()["connections_allowed"] == 1 and eb.stats()["connections_allowed"] == 1


def test_node_services_reachable_from_empty_policy(world: World, cgroup: Path) -> None:
    with Egress.attach(cgroup, EgressPolicy(), services=[(HOST4, 7777)]):
        r = world.run(cgroup, connect(HOST4, 7777), connect(HOST4, 8080), connect("127.0.0.1", 1))
        assert r[0]["ok"] and r[1]["errno"] == errno.EPERM
        assert r[2]["errno"] == errno.ECONNREFUSED  # loopback is the task's own: not filtered


def test_conn_rate(world: World, cgroup: Path) -> None:
    with Egress.attach(cgroup, EgressPolicy(allow=[f"{HOST4}:8080"], conn_rate="5/s")) as eg:
        r = world.run(cgroup, *[connect(HOST4, 8080) for _ in range(10)])
        assert sum(x["ok"] for x in r) == 5
        assert all(x["errno"] == errno.EPERM for x in r if not x["ok"])
        assert eg.stats()["connections_denied"] == 5
        assert {d.reason for d in eg.poll_denials()} == {"conn_rate"}


def test_rate_limit_transfer_time(world: World, cgroup: Path) -> None:
    size, rate = 20 * 1000 * 1000, 1024 * 1024
    with Egress.attach(cgroup, EgressPolicy(allow=[f"{HOST4}:8080"], rate="1MiB/s")) as eg:
        (r,) = world.run(cgroup, connect(HOST4, 8080, send=size))
        assert r["reply"] == str(size)
        expected = size / rate
        assert expected * 0.9 <= r["seconds"] <= expected * 1.1, r
        # TCP paces itself at the rate and backs off on the congestion bit: few retransmits.
        assert r["retrans"] < 100, r
        assert eg.stats()["bytes_out"] >= size


def test_dns_names_redirect_refusal_and_expiry(world: World, cgroup: Path) -> None:
    log: Path = world.dns_log  # type: ignore[attr-defined]

    async def start(loop: asyncio.AbstractEventLoop) -> DnsForwarder:
        fwd = DnsForwarder(upstream=(HOST4, 53), floor=0, grace=0.5, screen=TEST_SCREEN)
        await loop.create_datagram_endpoint(lambda: fwd, local_addr=(HOST4, FWD_PORT))
        return fwd

    policy = EgressPolicy(hosts=["allowed.test:8080", "*.short.test"])
    with (
        world.in_hosts_thread(start) as fwd,
        Egress.attach(cgroup, policy, dns=[(HOST4, FWD_PORT)]) as eg,
    ):
        fwd.add_task(TASK4, eg)
        before = log.read_text().splitlines()
        r = world.run(
            cgroup,
            connect(HOST4, 8080),
            {"op": "resolve", "name": "allowed.test", "server": HOST4},
            connect(HOST4, 8080),
            connect(HOST4, 9090),
            {"op": "resolve", "name": "blocked.test", "server": HOST4},
            # Sent straight to another resolver: still answered by the forwarder, and the answer
            # appears to come from the address asked (dnspython rejects any other source).
            {"op": "resolve", "name": "allowed.test", "server": OTHER4},
            {"op": "sleep", "seconds": 1.8},
            connect(HOST4, 8080),
        )
        before_dns, resolved, after_dns, other_port, blocked, redirected, expired = r
        assert before_dns["errno"] == errno.EPERM
        assert resolved == {"ok": True, "rcode": "NOERROR", "addrs": [HOST4]}
        assert after_dns["ok"] and other_port["errno"] == errno.EPERM
        assert blocked["rcode"] == "REFUSED"
        assert redirected["ok"] and redirected["addrs"] == [HOST4]
        assert expired["errno"] == errno.EPERM  # TTL 1 s + 0.5 s grace has passed
        seen = log.read_text().splitlines()[len(before) :]
        assert "blocked.test" not in seen and seen.count("allowed.test") == 2
        assert fwd.refused == 1 and fwd.answered == 2
        assert eg.stats()["dns_redirected"] == 3
        assert eg.expire() == 1


def test_dns_over_tcp_and_truncated_answers(world: World, cgroup: Path) -> None:
    log: Path = world.dns_log  # type: ignore[attr-defined]

    async def start(loop: asyncio.AbstractEventLoop) -> DnsForwarder:
        fwd = DnsForwarder(upstream=(HOST4, 53), screen=TEST_SCREEN)
        await fwd.listen(HOST4, FWD_PORT + 2)
        return fwd

    policy = EgressPolicy(hosts=["tcp.test:8080", "big.test:8080"])
    with (
        world.in_hosts_thread(start) as fwd,
        Egress.attach(cgroup, policy, dns=[(HOST4, FWD_PORT + 2)]) as eg,
    ):
        fwd.add_task(TASK4, eg)
        before = log.read_text().splitlines()
        tcp = {"op": "resolve", "transport": "tcp", "server": OTHER4}
        r = world.run(
            cgroup,
            connect(HOST4, 8080),
            {**tcp, "name": "tcp.test"},
            connect(HOST4, 8080),
            {**tcp, "name": "blocked.test"},
            connect(HOST6, 8080),
            # Truncated over UDP: the client retries over TCP, redirected to the forwarder too.
            {"op": "resolve", "transport": "fallback", "name": "big.test", "rdtype": "AAAA",
             "server": HOST4},
            connect(HOST6, 8080),
        )  # fmt: skip
        before_dns, resolved, after_dns, blocked, before_big, big, after_big = r
        assert before_dns["errno"] == errno.EPERM
        assert resolved == {"ok": True, "rcode": "NOERROR", "addrs": [HOST4]}
        assert after_dns["ok"]
        assert blocked["ok"] and blocked["rcode"] == "REFUSED"
        assert before_big["errno"] == errno.EPERM
        assert big == {"ok": True, "rcode": "NOERROR", "addrs": [HOST6], "tcp": True}
        assert after_big["ok"]
        seen = log.read_text().splitlines()[len(before) :]
        # Upstream saw each allowed name over the task's transport, and never the refused one.
        assert sorted(seen) == ["big.test", "tcp:big.test", "tcp:tcp.test"]
        assert fwd.refused == 1 and fwd.answered == 3 and fwd.truncated == 1
        assert eg.stats()["dns_redirected"] == 4


def test_dns_tcp_pipelining_bad_input_and_close() -> None:
    """On loopback, for a source that is no task: every query is refused without upstream."""

    async def main() -> None:
        fwd = DnsForwarder(upstream=("127.0.0.1", 9))
        port = await fwd.listen_tcp("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        queries = [dns.message.make_query(n, "A") for n in ("a.test", "b.test")]
        writer.write(
            b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries))
        )
        for q in queries:
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = dns.message.from_wire(await reader.readexactly(size))
            assert reply.id == q.id and reply.rcode() == dns.rcode.REFUSED
        assert fwd.refused == 2
        bad_reader, bad_writer = await asyncio.open_connection("127.0.0.1", port)
        bad_writer.write(b"\x00\x03abc")
        assert await asyncio.wait_for(bad_reader.read(), 2) == b""  # closed on a non-DNS message
        bad_writer.close()
        # `writer`'s connection is still open and idle: close() ends it at once.
        t = time.monotonic()
        await asyncio.wait_for(fwd.close(), 2)
        assert time.monotonic() - t < 1
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()

    asyncio.run(main())


class Forwarders:
    """One forwarder per address family, as the node runs them on the bridge."""

    def __init__(self) -> None:
        self.all = [DnsForwarder(upstream=(HOST4, 53), screen=TEST_SCREEN) for _ in range(2)]

    async def close(self) -> None:
        for f in self.all:
            await f.close()


def test_dns_ipv6_redirect_and_aaaa(world: World, cgroup: Path) -> None:
    async def start(loop: asyncio.AbstractEventLoop) -> Forwarders:
        fw = Forwarders()
        for fwd, addr in zip(fw.all, (HOST4, HOST6), strict=True):

            def protocol(f: DnsForwarder = fwd) -> DnsForwarder:
                return f

            await loop.create_datagram_endpoint(protocol, local_addr=(addr, FWD_PORT + 1))
        return fw

    policy = EgressPolicy(hosts=["six.test:8080"])
    dns = [(HOST4, FWD_PORT + 1), (HOST6, FWD_PORT + 1)]
    with world.in_hosts_thread(start) as fw, Egress.attach(cgroup, policy, dns=dns) as eg:
        for fwd in fw.all:
            fwd.add_task(TASK4, eg)
            fwd.add_task(TASK6, eg)
        before, resolved, after, port, v4 = world.run(
            cgroup,
            connect(HOST6, 8080),
            {"op": "resolve", "name": "six.test", "rdtype": "AAAA", "server": OTHER6},
            connect(HOST6, 8080),
            connect(HOST6, 9090),
            connect(HOST4, 8080),  # only the AAAA answer was learned
        )
        assert before["errno"] == errno.EPERM
        assert resolved == {"ok": True, "rcode": "NOERROR", "addrs": [HOST6]}
        assert after["ok"] and port["errno"] == errno.EPERM and v4["errno"] == errno.EPERM
        assert fw.all[1].answered == 1 and fw.all[0].answered == 0


def test_sigkill_of_owner_detaches_everything(world: World, cgroup: Path) -> None:
    code = (
        "import sys; from agentnode.egress import Egress, EgressPolicy;"
        f"e = Egress.attach({str(cgroup)!r}, EgressPolicy()); print('up', flush=True); sys.stdin.read()"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
    assert len(attached_programs(cgroup)) == 9
    assert world.run(cgroup, connect(HOST4, 8080))[0]["errno"] == errno.EPERM
    os.kill(owner.pid, signal.SIGKILL)
    owner.communicate()
    deadline = time.monotonic() + 5
    while attached_programs(cgroup) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert attached_programs(cgroup) == []
    assert world.run(cgroup, connect(HOST4, 8080))[0]["ok"]


def test_errors_are_clear(cgroup: Path) -> None:
    with pytest.raises(EgressError, match="cannot open cgroup2 directory"):
        Egress.attach(cgroup / "missing", EgressPolicy())
    eg = Egress.attach(cgroup, EgressPolicy())
    eg.close()
    eg.close()
    with pytest.raises(EgressError, match="closed"):
        eg.stats()
