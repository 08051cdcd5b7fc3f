"""Egress programs loaded once and shared by every task of a node: each task's policy, learned
names, clocks, counters and denials stay its own, a cgroup with no entry is denied everything,
and one task's end touches no other. Real cgroups, BPF programs and network namespaces; every
address is one the test assigned inside namespaces it created."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentnode.egress import Denial, Egress, EgressPolicy
from agentnode.egress.dns import DnsForwarder
from agentnode.egress.enforce import NodePrograms
from agentnode.egress.screen import AnswerScreen
from agentnode.errors import EgressError
from support.egress_bpf import attached_programs, map_ids, program_ids, task_entries, wait_gone
from support.egress_world import HOST4, HOST6, OTHER4, TASK4, World, scratch_cgroup

pytestmark = pytest.mark.root

FWD_A, FWD_B = 5310, 5311


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    log = tmp_path_factory.mktemp("dns") / "queries.log"
    log.write_text("")
    with World() as w:
        w.serve(
            tcp=[[HOST4, 8080], [HOST4, 9090], [HOST6, 8080], [HOST6, 9090]],
            udp=[[HOST4, 7000], [OTHER4, 7000], [HOST6, 7000], [HOST6, 7001]],
            dns={
                "addrs": [HOST4],
                "records": {"a.test": [HOST4], "b.test": [HOST4]},
                "ttl": 60,
                "log": str(log),
            },
        )
        yield w


@pytest.fixture(scope="module")
def programs() -> NodePrograms:
    return NodePrograms.load()


@pytest.fixture
def cgroups() -> Iterator[tuple[Path, Path]]:
    with scratch_cgroup() as a, scratch_cgroup() as b:
        yield a, b


def connect(host: str, port: int) -> dict[str, Any]:
    return {"op": "connect", "host": host, "port": port}


def udp(host: str, port: int) -> dict[str, Any]:
    return {"op": "udp", "host": host, "port": port, "reply": True}


#: Each op is allowed by task A's policy only, or by B's only (the `AB` ops, in that order).
A_ONLY = [
    connect(HOST4, 8080),
    connect(HOST6, 8080),
    connect(f"::ffff:{HOST4}", 8080),
    udp(HOST4, 7000),
    udp(HOST6, 7000),
]
B_ONLY = [
    connect(HOST4, 9090),
    connect(HOST6, 9090),
    connect(f"::ffff:{HOST4}", 9090),
    udp(OTHER4, 7000),
    udp(HOST6, 7001),
]
POLICY_A = EgressPolicy(allow=[f"{HOST4}:8080", f"[{HOST6}]:8080", f"{HOST4}:7000/udp",
                               f"[{HOST6}]:7000/udp"])  # fmt: skip
POLICY_B = EgressPolicy(allow=[f"{HOST4}:9090", f"[{HOST6}]:9090", f"{OTHER4}:7000/udp",
                               f"[{HOST6}]:7001/udp"])  # fmt: skip


def oks(world: World, cg: Path, *ops: dict[str, Any]) -> list[bool]:
    return [bool(r["ok"]) for r in world.run(cg, *ops)]


def test_two_tasks_on_the_same_programs_are_each_denied_what_only_the_other_allows(
    world: World, programs: NodePrograms, cgroups: tuple[Path, Path]
) -> None:
    a, b = cgroups
    got: dict[str, list[Denial]] = {"a": [], "b": []}
    with (
        Egress.attach(a, POLICY_A, programs=programs, on_denial=got["a"].append) as ea,
        Egress.attach(b, POLICY_B, programs=programs, on_denial=got["b"].append) as eb,
    ):
        assert program_ids(a) == program_ids(b) and len(program_ids(a)) == 9, "loaded once"
        both = [*A_ONLY, *B_ONLY]
        n = len(A_ONLY)
        assert oks(world, a, *both) == [True] * n + [False] * n
        assert oks(world, b, *both) == [False] * n + [True] * n
        # Counters and denials are each task's own: one poll hands every record to its task.
        sa, sb = ea.stats(), eb.stats()
        assert (sa["connections_allowed"], sa["connections_denied"]) == (n, n), sa
        assert (sb["connections_allowed"], sb["connections_denied"]) == (n, n), sb
        mine = ea.poll_denials()
        assert len(mine) == n and all(d.cgroup_id == ea.cgroup_id for d in mine)
        eb.poll_denials()
        assert {(str(d.address), d.port) for d in got["a"]} == {
            (HOST4, 9090), (HOST6, 9090), (OTHER4, 7000), (HOST6, 7001),
        }  # fmt: skip
        assert len(got["b"]) == n and all(d.cgroup_id == eb.cgroup_id for d in got["b"])
        assert {d.reason for d in got["a"] + got["b"]} == {"policy"}
        # A live update of one task leaves the other's policy as it was.
        ea.update(POLICY_B)
        assert oks(world, a, *both) == [False] * n + [True] * n
        assert oks(world, b, *both) == [False] * n + [True] * n
        ea.update(POLICY_A)
        assert oks(world, a, *both) == [True] * n + [False] * n


def test_two_tasks_learn_their_own_names_through_their_own_forwarders(
    world: World, programs: NodePrograms, cgroups: tuple[Path, Path]
) -> None:
    """Port 53 of each task goes to its own forwarder (each task's config is its own), which
    learns the names it allows into that task's entry only."""
    a, b = cgroups

    class Both:
        """The two forwarders, closed together."""

        def __init__(self) -> None:
            self.fwds = [
                DnsForwarder(upstream=(HOST4, 53), screen=AnswerScreen(own=False)) for _ in range(2)
            ]

        async def close(self) -> None:
            for f in self.fwds:
                await f.close()

    async def start_both(loop: asyncio.AbstractEventLoop) -> Both:
        both = Both()
        for fwd, port in zip(both.fwds, (FWD_A, FWD_B), strict=True):
            await fwd.listen(HOST4, port)
        return both

    pa, pb = EgressPolicy(hosts=["a.test:8080"]), EgressPolicy(hosts=["b.test:9090"])
    with (
        world.in_hosts_thread(start_both) as both,
        Egress.attach(a, pa, programs=programs, dns=[(HOST4, FWD_A)]) as ea,
        Egress.attach(b, pb, programs=programs, dns=[(HOST4, FWD_B)]) as eb,
    ):
        fa, fb = both.fwds
        fa.add_task(TASK4, ea)
        fb.add_task(TASK4, eb)
        ops = [
            {"op": "resolve", "name": "a.test", "server": OTHER4},
            {"op": "resolve", "name": "b.test", "server": OTHER4},
            connect(HOST4, 8080),
            connect(HOST4, 9090),
        ]
        ra = world.run(a, *ops)
        rb = world.run(b, *ops)
        assert [r.get("rcode") for r in ra[:2]] == ["NOERROR", "REFUSED"], ra
        assert [r.get("rcode") for r in rb[:2]] == ["REFUSED", "NOERROR"], rb
        assert [r["ok"] for r in ra[2:]] == [True, False], ra
        assert [r["ok"] for r in rb[2:]] == [False, True], rb
        assert (fa.answered, fa.refused, fb.answered, fb.refused) == (1, 1, 1, 1)
        # Forgetting A's learned names leaves B's.
        ea.update(EgressPolicy(hosts=["c.test:8080"]))
        assert oks(world, a, connect(HOST4, 8080)) == [False]
        assert oks(world, b, connect(HOST4, 9090)) == [True]


def test_a_cgroup_without_an_entry_is_denied_everything(
    world: World, programs: NodePrograms, cgroups: tuple[Path, Path]
) -> None:
    """Withdrawn, a task's programs stay attached with no entry to find: every way out is
    denied, loopback included; its neighbour on the same programs goes on as before."""
    a, b = cgroups
    got: list[Denial] = []
    with (
        Egress.attach(a, POLICY_A, programs=programs, on_denial=got.append) as ea,
        Egress.attach(b, POLICY_A, programs=programs) as eb,
    ):
        ea.withdraw()
        ea.withdraw()  # idempotent
        assert len(attached_programs(a)) == 9
        assert task_entries(map_ids(a), ea.cgroup_id) == 0
        ops = [*A_ONLY, {"op": "raw_icmp", "host": HOST4}, connect("127.0.0.1", 1)]
        r = world.run(a, *ops)
        assert [x["errno"] for x in r] == [errno.EPERM] * len(ops), r
        r = world.run(b, *ops)
        assert all(x["ok"] for x in r[: len(A_ONLY)]), r
        assert [x["errno"] for x in r[-2:]] == [errno.EPERM, errno.ECONNREFUSED], r
        ea.poll_denials()
        assert got and {d.reason for d in got} == {"no_entry"}
        with pytest.raises(EgressError, match="withdrawn"):
            ea.update(POLICY_B)
        assert eb.stats()["connections_allowed"] == len(A_ONLY) + 1


def test_one_task_ending_leaves_every_other_as_it_was(
    world: World, programs: NodePrograms, cgroups: tuple[Path, Path]
) -> None:
    a, b = cgroups
    ea = Egress.attach(a, POLICY_A, programs=programs)
    with Egress.attach(b, POLICY_B, programs=programs) as eb:
        maps = map_ids(b)
        before = task_entries(maps, eb.cgroup_id)
        ea.allow_resolved(OTHER4, [], ttl=60)
        assert task_entries(maps, ea.cgroup_id) > 0 and before > 0
        ea.close()
        assert attached_programs(a) == [] and len(attached_programs(b)) == 9
        assert task_entries(maps, ea.cgroup_id) == 0
        assert task_entries(maps, eb.cgroup_id) == before
        both = [*A_ONLY, *B_ONLY]
        n = len(A_ONLY)
        assert oks(world, b, *both) == [False] * n + [True] * n
        # Without programs, the ended task's cgroup has no policy at all (as before it began).
        assert oks(world, a, connect(HOST4, 9090)) == [True]


def test_a_task_sub_cgroup_is_held_to_the_task_policy(
    world: World, programs: NodePrograms, cgroups: tuple[Path, Path]
) -> None:
    """The programs find the entry of the cgroup they are attached to, whichever descendant
    the process is in: a task that makes cgroups of its own keeps its policy in them."""
    a, _ = cgroups
    child = a / f"sub-{uuid.uuid4().hex[:6]}"
    with Egress.attach(a, POLICY_A, programs=programs) as ea:
        child.mkdir()
        try:
            assert oks(world, child, connect(HOST4, 8080), connect(HOST4, 9090)) == [True, False]
            ea.poll_denials()
            assert ea.stats()["connections_denied"] == 1
        finally:
            child.rmdir()


def test_a_forked_copy_closing_the_handle_leaves_the_task_enforced(
    world: World, programs: NodePrograms, cgroups: tuple[Path, Path]
) -> None:
    """A forked child (a zygote, a spawn before its exec) holds copies of the parent's handles:
    closing or dropping one there closes the child's descriptors and never withdraws the
    entry of the task the parent still runs."""
    a, _ = cgroups
    with Egress.attach(a, POLICY_A, programs=programs) as ea:
        pid = os.fork()
        if pid == 0:
            ea.close()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert oks(world, a, connect(HOST4, 8080), connect(HOST4, 9090)) == [True, False]
        assert ea.stats()["connections_allowed"] == 1


def test_programs_loaded_apart_go_with_their_last_holder(world: World) -> None:
    """Unpinned programs live as long as someone holds them: the last task's end and the
    programs object's leave nothing in the kernel."""
    own = NodePrograms.load()
    with scratch_cgroup() as cg:
        eg = Egress.attach(cg, POLICY_A, programs=own)
        progs, maps = program_ids(cg), map_ids(cg)
        eg.close()
    del eg, own
    gc.collect()
    assert wait_gone("prog", progs) == [] and wait_gone("map", maps) == []
