"""What the DNS forwarder lets through (issue 23, holes 4-6): upstream sees only the query the
node built from the parsed question; answers pointing into the node, the host or private space
are dropped and audited unless a CIDR rule names that range; names under wildcard rules are
bounded in length, queries in rate and record type.

Every address is one the test assigned inside namespaces it created (198.51.100.0/24,
2001:db8::/64, a random 10.x/24 node subnet); answers naming guarded addresses come from the
test's own DNS server and are never contacted."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from agentnode.egress import Denial, Egress, EgressPolicy
from agentnode.egress.dns import DnsForwarder, DnsLimits
from agentnode.egress.screen import AnswerScreen
from agentnode.errors import ConfigError
from agentnode.node.config import load_config
from support.egress_world import HOST4, OTHER4, TASK4, World, scratch_cgroup
from support.node_daemon import daemon

pytestmark = pytest.mark.root

REPO = Path(__file__).parent.parent
FWD_PORT = 5310
SUBNET = ipaddress.IPv4Network(f"10.{random.randint(1, 254)}.{random.randint(0, 254)}.0/24")
GATEWAY = str(next(SUBNET.hosts()))
RECORDS = {
    "a.wild.test": [HOST4],
    "loop.wild.test": ["127.0.0.1"],
    "meta.wild.test": ["169.254.169.254"],
    "priv.wild.test": ["10.1.2.3"],
    "mixed.wild.test": [HOST4, "192.168.1.1", "::ffff:127.0.0.1", "fd00:ec2::254"],
    "mapped.wild.test": ["::ffff:10.1.2.3"],
    "nat64.wild.test": ["64:ff9b::a9fe:a9fe"],
    "node.wild.test": [TASK4],  # the node's own address in the daemon test
    "gw.wild.test": [GATEWAY],  # the node's bridge
    "y" * 50 + ".exact.test": [HOST4],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    logs = tmp_path_factory.mktemp("dns")
    for log in ("names.log", "wire.log"):
        (logs / log).write_text("")
    with World() as w:
        w.serve(
            tcp=[[HOST4, 8080]],
            dns={
                "addrs": [HOST4],
                "records": RECORDS,
                "ttl": 60,
                "log": str(logs / "names.log"),
                "wire_log": str(logs / "wire.log"),
            },
        )
        w.logs = logs  # type: ignore[attr-defined]
        yield w


@pytest.fixture
def cgroup() -> Iterator[Path]:
    with scratch_cgroup() as cg:
        yield cg


def forwarder(world: World, port: int, limits: DnsLimits | None = None) -> Any:
    async def start(loop: asyncio.AbstractEventLoop) -> DnsForwarder:
        # Shares the hosts netns with the test upstream: its own addresses are not guarded here
        # (the daemon test guards the node's).
        fwd = DnsForwarder(upstream=(HOST4, 53), limits=limits, screen=AnswerScreen(own=False))
        await fwd.listen(HOST4, port)
        return fwd

    return world.in_hosts_thread(start)


def resolve(name: str, rdtype: str = "A", **kw: Any) -> dict[str, Any]:
    return {"op": "resolve", "name": name, "rdtype": rdtype, "server": HOST4, **kw}


def raw(msg: dns.message.Message, **kw: Any) -> dict[str, Any]:
    return {"op": "raw_dns", "wire": msg.to_wire().hex(), "server": HOST4, **kw}


def wire_log(world: World) -> list[dns.message.Message]:
    path: Path = world.logs / "wire.log"  # type: ignore[attr-defined]
    return [dns.message.from_wire(bytes.fromhex(x)) for x in path.read_text().split()]


def test_answers_into_guarded_ranges_are_dropped_and_audited(world: World, cgroup: Path) -> None:
    denials: list[Denial] = []
    policy = EgressPolicy(hosts=["*.wild.test:8080"], allow=["0.0.0.0/0:9", "[::/0]:9"])
    with (
        forwarder(world, FWD_PORT) as fwd,
        Egress.attach(cgroup, policy, dns=[(HOST4, FWD_PORT)], on_denial=denials.append) as eg,
    ):
        fwd.add_task(TASK4, eg)
        r = world.run(
            cgroup,
            resolve("a.wild.test"),
            resolve("loop.wild.test"),
            resolve("meta.wild.test", transport="tcp"),
            resolve("priv.wild.test"),
            resolve("mixed.wild.test"),
            resolve("mixed.wild.test", "AAAA"),
            resolve("mapped.wild.test", "AAAA"),
            resolve("nat64.wild.test", "AAAA", transport="tcp"),
            {"op": "connect", "host": HOST4, "port": 8080},
        )
        plain, *guarded, mixed4, mixed6, mapped, nat64, reach = r
        assert plain["addrs"] == [HOST4]
        # Wide CIDR rules (0.0.0.0/0, ::/0) open nothing guarded.
        assert all(g["ok"] and g["rcode"] == "NOERROR" and g["addrs"] == [] for g in guarded), r
        assert mixed4["addrs"] == [HOST4] and mixed6["addrs"] == []
        assert mapped["addrs"] == [] and nat64["addrs"] == []
        assert reach["ok"]
        dropped = {(d.name, d.address) for d in denials if d.reason == "dns_rebinding"}
        assert dropped == {
            (name, ipaddress.ip_address(addr))
            for name, addr in (
                ("loop.wild.test", "127.0.0.1"),
                ("meta.wild.test", "169.254.169.254"),
                ("priv.wild.test", "10.1.2.3"),
                ("mixed.wild.test", "192.168.1.1"),
                ("mixed.wild.test", "::ffff:127.0.0.1"),
                ("mixed.wild.test", "fd00:ec2::254"),
                ("mapped.wild.test", "::ffff:10.1.2.3"),
                ("nat64.wild.test", "64:ff9b::a9fe:a9fe"),
            )
        }
        # A rule that names the range (no wider than it) lets its answers through.
        eg.update(EgressPolicy(hosts=["*.wild.test:8080"], allow=["10.1.2.0/24:9999"]))
        (opened,) = world.run(cgroup, resolve("priv.wild.test"))
        assert opened["addrs"] == ["10.1.2.3"]


def test_upstream_sees_only_the_query_the_node_built(world: World, cgroup: Path) -> None:
    """Records appended to an allowed question (additional, authority, answer sections), EDNS
    options and the letters' case never reach upstream, over UDP or TCP."""
    with (
        forwarder(world, FWD_PORT + 1) as fwd,
        Egress.attach(
            cgroup, EgressPolicy(hosts=["*.wild.test:8080"]), dns=[(HOST4, FWD_PORT + 1)]
        ) as eg,
    ):
        fwd.add_task(TASK4, eg)
        smuggled = dns.rrset.from_text("exfil.evil.", 60, "IN", "TXT", '"secret-bytes"')
        extra = dns.message.make_query("A.WiLd.TeSt", "A", use_edns=0, payload=4096,
            options=[dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"secret-option")])  # fmt: skip
        extra.additional.append(smuggled)
        authority = dns.message.make_query("a.wild.test", "A")
        authority.authority.append(smuggled)
        answer = dns.message.make_query("a.wild.test", "A", use_edns=False)
        answer.answer.append(smuggled)
        two = dns.message.make_query("a.wild.test", "A")
        two.question.append(dns.message.make_query("b.wild.test", "A").question[0])
        before = len(wire_log(world))
        queries = [extra, authority, answer, extra]
        r = world.run(
            cgroup,
            *(raw(q) for q in queries[:3]),
            raw(queries[3], transport="tcp"),
            raw(two),
        )
        sent = wire_log(world)[before:]
        assert len(sent) == 4, "the two-question query was refused without going upstream"
        for reply, query in zip(r, queries, strict=False):
            assert reply["rcode"] == "NOERROR" and reply["addrs"] == [HOST4], reply
            assert reply["id"] == query.id
        # The task's question comes back as it asked it.
        assert r[0]["question"] == "A.WiLd.TeSt."
        for up in sent:
            assert up.question[0].name.to_text() == "a.wild.test."
            assert not up.answer and not up.authority and not up.additional
            assert up.edns in (-1, 0) and not up.options
            assert up.payload <= 1232
        assert [up.edns for up in sent] == [0, -1, -1, 0]  # EDNS only where the task used it
        assert b"secret" not in (world.logs / "wire.log").read_bytes()  # type: ignore[attr-defined]
        assert r[4]["rcode"] == "REFUSED"


def test_wildcard_names_types_and_rate_are_bounded(world: World, cgroup: Path) -> None:
    denials: list[Denial] = []
    policy = EgressPolicy(hosts=["*.wild.test:8080", "y" * 50 + ".exact.test:8080"])
    names: Path = world.logs / "names.log"  # type: ignore[attr-defined]
    long_name = ".".join(["x" * 30] * 4) + ".wild.test"  # 134 characters, labels of 30
    with (
        forwarder(world, FWD_PORT + 2, DnsLimits(rate=2, burst=12)) as fwd,
        Egress.attach(cgroup, policy, dns=[(HOST4, FWD_PORT + 2)], on_denial=denials.append) as eg,
    ):
        fwd.add_task(TASK4, eg)
        before = names.read_text().splitlines()
        r = world.run(
            cgroup,
            resolve("x" * 50 + ".wild.test"),
            resolve(long_name, transport="tcp"),
            resolve("y" * 50 + ".exact.test"),  # an exact rule names it: no length limit
            resolve("a.wild.test", "TXT"),
            resolve("a.wild.test", "NULL"),
            resolve("a.wild.test", "ANY", transport="tcp"),
            resolve("a.wild.test", "AXFR"),
            resolve("a.wild.test", "AAAA"),
            {"op": "resolve_loop", "name": "a.wild.test", "server": HOST4, "n": 1},
        )
        label, name, exact, txt, null, any_, axfr, aaaa, _ = r
        for refused in (label, name, txt, null, any_):
            assert refused["rcode"] == "REFUSED", refused
        assert not axfr["ok"] or axfr["rcode"] == "REFUSED"
        assert exact["addrs"] == [HOST4] and aaaa["rcode"] == "NOERROR"
        seen = names.read_text().splitlines()[len(before) :]
        assert seen == ["y" * 50 + ".exact.test", "a.wild.test", "a.wild.test"], seen
        # Now over the rate: 12 tokens, refill 2/s; a burst of 30 is cut short, audited once.
        (burst,) = world.run(
            cgroup, {"op": "resolve_loop", "name": "a.wild.test", "server": HOST4, "n": 30}
        )
        assert burst["ok"]
        audited = [d.reason for d in denials]
        assert audited.count("dns_label_length") == 1 and audited.count("dns_name_length") == 1
        assert audited.count("dns_type") >= 3 and audited.count("dns_rate") == 1, audited
        assert all(d.protocol == "dns" and d.name for d in denials)
        assert eg.stats()["dns_refused"] >= 20


def test_daemon_drops_answers_pointing_at_the_node(world: World, tmp_path: Path) -> None:
    """Through `agentnode run`: answers naming the node's own address or its bridge are
    dropped, the task cannot connect there, and each drop is a line in the audit log."""
    config = f'[network]\nsubnet = "{SUBNET}"\ndns_upstream = "{HOST4}:53"\ndns_types = ["null"]\n'
    prefix = ("nsenter", f"--net=/run/netns/{world.task}")
    client = str(Path(__file__).parent / "support" / "egress_client.py")
    ops = [
        resolve("node.wild.test"),
        resolve("gw.wild.test", server=OTHER4),  # any resolver: redirected
        {"op": "connect", "host": TASK4, "port": 8080, "timeout": 1},
        resolve("a.wild.test", "TXT"),
        resolve("a.wild.test", "NULL"),  # the node's configuration allows this type
        resolve("a.wild.test"),
    ]
    with daemon(tmp_path, config, prefix) as d:
        task = d.submit(
            [sys.executable, client, json.dumps(ops)],
            user="0", ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")},
            allow_hosts=["*.wild.test:8080"], allow=["0.0.0.0/0:9"],
        )  # fmt: skip
        done = d.wait(task["id"], timeout=60)
        out = d.log(task["id"])
        assert done["state"] == "succeeded", (done["reason"], out)
        node, gw, connect, txt, null, plain = (json.loads(x) for x in out.splitlines())
        assert node["addrs"] == [] and gw["addrs"] == [], (node, gw)
        assert connect["errno"] == errno.EPERM
        assert txt["rcode"] == "REFUSED" and plain["addrs"] == [HOST4]
        assert null["ok"] and null["rcode"] == "NOERROR", null
        log = (d.data / "audit" / "audit.log").read_text().splitlines()
        audit = [r for r in map(json.loads, log) if r["kind"] == "egress_denied"]
        mine = {
            (a["reason"], a.get("name"), a["address"]) for a in audit if a["task"] == task["id"]
        }
        assert ("dns_rebinding", "node.wild.test", TASK4) in mine
        assert ("dns_rebinding", "gw.wild.test", GATEWAY) in mine
        assert ("dns_type", "a.wild.test", HOST4) in mine


def test_exec_task_gets_the_same_dns_guard(world: World, tmp_path: Path) -> None:
    """`agentnode exec --allow-host '*.wild.test:8080'` (its forwarder asks the test's DNS
    server: a private mount namespace binds a resolv.conf naming it)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {HOST4}\n")
    client = str(Path(__file__).parent / "support" / "egress_client.py")
    smuggled = dns.message.make_query("a.wild.test", "A")
    smuggled.additional.append(dns.rrset.from_text("x.evil.", 60, "IN", "TXT", '"exec-secret"'))
    ops = [
        resolve("node.wild.test"),
        resolve("x" * 50 + ".wild.test", transport="tcp"),
        resolve("a.wild.test", "NULL"),
        raw(smuggled),
        {"op": "connect", "host": TASK4, "port": 8080, "timeout": 1},
    ]
    exec_ = [sys.executable, "-m", "agentnode", "exec", "--user", "0", "--ro", str(REPO),
             "--env", f"PYTHONPATH={REPO / 'python'}", "--allow-host", "*.wild.test:8080",
             "--", sys.executable, client, json.dumps(ops)]  # fmt: skip
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec nsenter --net="$@"'
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(resolv),
         f"/run/netns/{world.task}", *exec_],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO / "python")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    node, label, null, smuggle, connect = (json.loads(x) for x in out.stdout.splitlines())
    assert node["ok"] and node["addrs"] == []
    assert label["rcode"] == "REFUSED" and null["rcode"] == "REFUSED"
    assert smuggle["addrs"] == [HOST4]
    assert connect["errno"] == errno.EPERM
    assert b"exec-secret" not in (world.logs / "wire.log").read_bytes()  # type: ignore[attr-defined]


def test_node_configuration_of_the_dns_limits(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[network]\ndns_rate = 5\ndns_max_label = 20\ndns_types = ["txt"]\n')
    config = load_config(cfg)
    assert (config.dns_rate, config.dns_max_label, config.dns_max_name) == (5, 20, 120)
    limits = DnsLimits.configured(
        rate=config.dns_rate, max_label=20, max_name=120, extra_types=config.dns_types
    )
    assert limits.burst == 10 and dns.rdatatype.TXT in limits.types
    assert dns.rdatatype.NULL not in limits.types
    for text, fragment in (
        ('dns_types = ["BOGUS"]', "network.dns_types: 'BOGUS' is not a DNS record type"),
        ('dns_types = "TXT"', "network.dns_types: must be a list"),
        ("dns_rate = 0", "network.dns_rate: must be a number >= 1"),
        ("dns_max_name = -1", "network.dns_max_name: must be an integer >= 1"),
    ):
        cfg.write_text(f"[network]\n{text}\n")
        with pytest.raises(ConfigError, match=fragment):
            load_config(cfg)
