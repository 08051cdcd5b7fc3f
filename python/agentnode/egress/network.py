"""Task networking for `--net egress`: a node bridge (`agentnode0`), one veth per task into the
task's own network namespace, routing and nftables masquerade to the uplink.

Nothing reaches a task unasked: new connections forwarded into the bridge are dropped unless a
port is published (`--publish HOSTPORT:PORT`, a DNAT from the node's addresses), and each
task's bridge port is isolated, so tasks do not reach each other at layer 2 either. (The BPF
backstop drops a task's answers to peers its policy does not allow, whatever the route.)

The bridge and its nftables table are made once per node with `ip` and `nft`; a task's own
objects (netns, veth pair, address, route) are made and removed over rtnetlink by the native
extension (`_native.TaskNetwork`, `agentnode_core::tasknet`), with no process spawned: a
task's network costs a fraction of a millisecond of CPU, where four `ip` runs cost ~10 ms.

Everything is created idempotently and named with an `agentnode` prefix. Each task's veth
records its owner: the process that made it (pid and start time), so `sweep()` removes what a
crashed `agentnode exec` left without touching the tasks of one that still runs; or, for a node
daemon's, whose tasks outlive its processes, the node (`k<node>`), which only that node's own
next start sweeps, sparing the tasks it re-adopts (`adopt`).
`node_netns` puts the node side in a namespace other than the host's (tests use one they
create; the daemon uses the host's).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from agentnode import _native
from agentnode.egress.policy import Published
from agentnode.errors import EgressError, PolicyError

__all__ = ["NodeNetwork", "TaskNet"]

log = logging.getLogger(__name__)

TASK_NETNS_PREFIX = "agentnode-task-"
VETH_PREFIX = "anv"
#: Seconds `reap` waits for released tasks' veths to go with their netns (the kernel's cleanup
#: of a batch of them takes tens of ms), and between two looks.
REAP_S = 5.0
_REAP_POLL_S = 0.01
RUN_NETNS = Path("/run/netns")
#: Seconds after which a task netns name that is a plain file is a crash's leftover: making a
#: name and mounting the netns on it are microseconds apart.
_UNMOUNTED_STALE_S = 10.0


def process_identity(pid: int) -> str:
    """`pid.starttime`: names one process for good (a reused pid has another start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after it.
    return f"{pid}.{stat.rpartition(')')[2].split()[19]}"


def _netns_of(veth: str) -> str:
    """The name of the netns whose task has the host end `veth`."""
    return f"{TASK_NETNS_PREFIX}{veth.removeprefix(VETH_PREFIX)}"


def _element(address: ipaddress.IPv4Address, port: Published) -> str:
    """The publish map's element for a task's published port: host port to address . port."""
    return f"{port.host_port} : {address} . {port.port}"


def _alive(owner: str) -> bool:
    if owner.startswith("k"):
        return True  # a node's: its tasks outlive its processes, its own start sweeps them
    pid, _, _ = owner.partition(".")
    return pid.isdigit() and process_identity(int(pid)) == owner


@dataclass(frozen=True)
class TaskNet:
    """A task's network namespace, ready to join (`netns_path` for setns / Layer 1's spawn)."""

    task_id: str
    netns: str
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    host_veth: str
    published: tuple[Published, ...] = ()

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _bridge_mac(bridge: str) -> str:
    """A fixed, locally administered unicast MAC for `bridge` (the same on every start)."""
    digest = hashlib.sha256(bridge.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


class NodeNetwork:
    """The node's bridge and its tasks' veths. Call `ensure()` once, then `add_task()`."""

    def __init__(
        self,
        *,
        bridge: str = "agentnode0",
        subnet: str = "10.88.0.0/24",
        node_netns: str | None = None,
        node: str | None = None,
    ) -> None:
        if not bridge.startswith("agentnode") or len(bridge) > 15:
            raise PolicyError(
                f"bad bridge name {bridge!r}: must start with 'agentnode', 15 chars max"
            )
        try:
            self.subnet = ipaddress.IPv4Network(subnet)
        except ValueError as e:
            raise PolicyError(f"bad node subnet {subnet!r}: {e}") from None
        if self.subnet.num_addresses < 4:
            raise PolicyError(f"bad node subnet {subnet!r}: too small for a bridge and a task")
        self.bridge = bridge
        self.node_netns = node_netns
        self.gateway = next(self.subnet.hosts())
        self.table = bridge.replace("-", "_")
        #: Who the task veths made here belong to: the node `node` (`agentnode.node.restore.
        #: node_id`), whose tasks outlive this process, or else this process.
        self.owner = f"k{node}" if node else process_identity(os.getpid())
        #: `ensure` made the bridge: one missing later was removed from outside, made again.
        self._ensured = False
        #: This owner's task veths that `sweep(own=True)` spares: tasks re-adopted from an
        #: earlier process of the node, or left running for a later one.
        self.kept: set[str] = set()
        #: This owner's tasks' published ports, by veth: mapped again when the table is made
        #: again (`repair`).
        self._mapped: dict[str, tuple[ipaddress.IPv4Address, tuple[Published, ...]]] = {}
        # Held from picking a free address to recording it in the veth's alias: two spawns at
        # once (a tool's sandbox made ahead while another starts) would share an address.
        self._allocating = threading.Lock()

    def _ip(self, *args: str, check: bool = True) -> str:
        ns = self.node_netns
        argv = ["ip", *(["-n", ns] if ns else []), *args]
        return self._run(argv, check=check)

    def _in_node(self, *argv: str, check: bool = True) -> str:
        prefix = ["ip", "netns", "exec", self.node_netns] if self.node_netns else []
        return self._run([*prefix, *argv], check=check)

    @functools.cached_property
    def _rtnl(self) -> _native.TaskNetwork:
        """The rtnetlink socket in the node's netns that makes and removes tasks' networks."""
        path = f"/run/netns/{self.node_netns}" if self.node_netns else None
        return _native.TaskNetwork(node_netns=path)

    @staticmethod
    def _run(argv: list[str], *, check: bool) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and r.returncode != 0:
            raise EgressError(
                f"task networking: `{' '.join(argv)}` failed: {r.stderr.strip()} "
                "(run as root; `agentnode doctor` checks the kernel)"
            )
        return r.stdout

    def _links(self) -> list[tuple[str, str | None, str | None]]:
        """The node netns's links: `(name, alias, master)`."""
        return self._rtnl.links()

    def repair(self) -> bool:
        """Makes the node network again when part of it was removed from outside since
        `ensure` (the bridge: `ip link del`; the table with the inbound drop and masquerade:
        `nft flush ruleset`); whether it had to."""
        if not self._removed():
            return False
        log.warning("the node's network (bridge %s, table %s) was changed from outside; "
                    "making it again", self.bridge, self.table)  # fmt: skip
        with self._allocating:
            self.ensure()
            # A flushed table took the ports' map with it: the running tasks' ports again.
            mapped = ", ".join(_element(address, p)
                               for address, published in list(self._mapped.values())
                               for p in published)  # fmt: skip
            if mapped:
                r = self._nft(f"add element ip {self.table} publish {{ {mapped} }}\n", check=False)
                if r.returncode != 0:
                    log.error("cannot map the tasks' published ports again: %s", r.stderr.strip())
        return True

    def _removed(self) -> bool:
        """Whether part of what `ensure` made is gone (False before it ran)."""
        if not self._ensured:
            return False
        listed = self._nft(f"list table ip {self.table}", check=False)
        return listed.returncode != 0 or not any(n == self.bridge for n, _, _ in self._links())

    def ensure(self) -> None:
        """Creates the bridge, its address, forwarding, the masquerade rule, the inbound drop
        and the published-ports map (idempotent)."""
        self._ensured = True
        if not any(name == self.bridge for name, _, _ in self._links()):
            self._ip("link", "add", self.bridge, "type", "bridge")
        # A bridge left to itself takes the lowest MAC of its ports, so it changes whenever that
        # task's veth goes: every long-lived task's cached gateway MAC is then dead and its
        # connections stall until the entry expires. A MAC set once stays.
        self._ip("link", "set", self.bridge, "address", _bridge_mac(self.bridge))
        self._ip("addr", "replace", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        self._in_node("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # One table per bridge; chains are flushed and refilled, so re-running never duplicates
        # a rule, while the map keeps the ports other live owners published.
        t, br = f"ip {self.table}", f'"{self.bridge}"'
        chains = {
            "prerouting": (
                "type nat hook prerouting priority dstnat",
                ["fib daddr type local dnat ip to tcp dport map @publish"],
            ),
            "output": (
                "type nat hook output priority -100",
                ["fib daddr type local ip daddr != 127.0.0.0/8 dnat ip to tcp dport map @publish"],
            ),
            "forward": (
                "type filter hook forward priority filter",
                [
                    f"oifname {br} ct state established,related accept",
                    f"oifname {br} ct status dnat accept",
                    f"oifname {br} drop",
                ],
            ),
            "postrouting": (
                "type nat hook postrouting priority srcnat",
                [f"ip saddr {self.subnet} oifname != {br} masquerade"],
            ),
        }
        lines = [
            f"add table {t}",
            f"add map {t} publish {{ type inet_service : ipv4_addr . inet_service; }}",
        ]
        for name, (hook, rules) in chains.items():
            lines += [
                f"add chain {t} {name} {{ {hook}; policy accept; }}",
                f"flush chain {t} {name}",
            ]
            lines += [f"add rule {t} {name} {rule}" for rule in rules]
        self._nft("\n".join(lines) + "\n")

    def _nft(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", self.node_netns] if self.node_netns else []
        r = subprocess.run(
            [*prefix, "nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
        )
        if check and r.returncode != 0:
            raise EgressError(
                f"task networking: nft failed: {r.stderr.strip()} (is nftables installed?)"
            )
        return r

    def _publish(self, address: ipaddress.IPv4Address, published: tuple[Published, ...]) -> None:
        """Maps each host port to the task (`create`: a port another task holds is an error)."""
        for i, p in enumerate(published):
            r = self._nft(
                f"create element ip {self.table} publish {{ {_element(address, p)} }}\n",
                check=False,
            )
            if r.returncode != 0:
                self._unpublish(q.host_port for q in published[:i])
                taken = "File exists" in r.stderr
                raise EgressError(
                    f"cannot publish host port {p.host_port}: "
                    + ("another task has published it" if taken else r.stderr.strip())
                )

    def _unpublish(self, host_ports: Iterable[int]) -> None:
        ports = list(host_ports)
        if ports:
            keys = ", ".join(map(str, ports))
            self._nft(f"delete element ip {self.table} publish {{ {keys} }}\n", check=False)

    def _published_to(self, addresses: set[str]) -> list[int]:
        """The host ports mapped to any of `addresses` (what a crashed owner's tasks held)."""
        out = self._in_node("nft", "-j", "list", "map", "ip", self.table, "publish", check=False)
        ports = []
        for item in json.loads(out or "{}").get("nftables", []):
            for port, target in item.get("map", {}).get("elem", []):
                if target.get("concat", [None])[0] in addresses:
                    ports.append(int(port))
        return ports

    def _used(self) -> set[ipaddress.IPv4Address]:
        used = {self.gateway}
        for _, alias, _ in self._links():
            if alias is not None and alias.startswith("agentnode "):
                used.add(ipaddress.IPv4Address(alias.split()[1]))
        return used

    def add_task(self, task_id: str, *, publish: tuple[Published, ...] = ()) -> TaskNet:
        """Creates the task's netns with a veth on an isolated port of the bridge, an address
        and a default route, and maps the `publish` host ports to it."""
        digest = hashlib.sha256(task_id.encode()).hexdigest()[:8]
        netns = f"{TASK_NETNS_PREFIX}{digest}"
        veth = f"{VETH_PREFIX}{digest}"
        with self._allocating:
            used = self._used()
            address = next((a for a in self.subnet.hosts() if a not in used), None)
            if address is None:
                raise EgressError(f"node subnet {self.subnet} is full (configure a larger one)")
            # The alias records the address and owner: allocation and sweeps need no state
            # file. Made whole or not at all (a netns of that name that exists is refused).
            add = functools.partial(
                self._rtnl.add_task,
                netns=netns,
                veth=veth,
                alias=f"agentnode {address} {self.owner} {task_id}",
                bridge=self.bridge,
                address=int(address),
                prefix=self.subnet.prefixlen,
                gateway=int(self.gateway),
            )
            try:
                add()
            except EgressError:
                if self._stale_name(netns, any_age=True):
                    # This task's name, left by an earlier attempt's crash mid-start or
                    # mid-removal: freed, not a start that fails at every retry.
                    self._rtnl.release_task(netns=netns)
                elif self._removed():
                    # Removed from outside (`ip link del`, a network manager): made again,
                    # with its address and rules, rather than every later task failing.
                    log.warning("the node's bridge %s was removed; making it again", self.bridge)
                    self.ensure()
                else:
                    raise
                add()
        try:
            self._publish(address, publish)
        except BaseException:
            self._rtnl.remove_task(veth=veth, netns=netns)
            raise
        if publish:
            self._mapped[veth] = (address, publish)
        return TaskNet(task_id, netns, address, self.gateway, veth, publish)

    def adopt(self, pid: int, published: tuple[Published, ...] = ()) -> TaskNet:
        """The network of task process `pid`, which an earlier process of this owner made: its
        netns (found by the namespace `pid` is in), the veth on the bridge and its address.
        Kept from `sweep(own=True)` from now on. Raises `EgressError` when any part is gone."""
        try:
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError as e:
            raise EgressError(
                f"cannot read the network namespace of pid {pid}: {e.strerror}"
            ) from None
        run_netns = Path("/run/netns")
        netns = next(
            (
                ns.name
                for ns in (run_netns.iterdir() if run_netns.is_dir() else [])
                if ns.name.startswith(TASK_NETNS_PREFIX) and _inode(ns) == inode
            ),
            None,
        )
        if netns is None:
            raise EgressError(f"pid {pid} is in no task network namespace of the node")
        veth = f"{VETH_PREFIX}{netns.removeprefix(TASK_NETNS_PREFIX)}"
        link = next((x for x in self._links() if x[0] == veth), None)
        alias = str((link and link[1]) or "").split()
        if len(alias) < 4 or alias[0] != "agentnode" or alias[2] != self.owner:
            raise EgressError(f"the task veth {veth} of {netns} is gone or not the node's")
        try:
            address = ipaddress.IPv4Address(alias[1])
        except ValueError:
            raise EgressError(f"the task veth {veth} records no address: {alias[1]!r}") from None
        if link is not None and link[2] != self.bridge:
            raise EgressError(f"the task veth {veth} is not on the bridge {self.bridge}")
        if address not in self.subnet:
            raise EgressError(
                f"the task's address {address} is outside the node subnet {self.subnet} "
                "(network.subnet changed since it started)"
            )
        self.kept.add(veth)
        if published:
            self._mapped[veth] = (address, published)
        return TaskNet(alias[3], netns, address, self.gateway, veth, published)

    def leave(self, net: TaskNet) -> None:
        """Leaves the task's network in place for a later process of this owner to `adopt`."""
        self.kept.add(net.host_veth)
        self._mapped.pop(net.host_veth, None)

    def remove_task(self, net: TaskNet) -> None:
        """Removes the task's published ports, veth and netns (idempotent)."""
        self._unmap(net)
        self._rtnl.remove_task(veth=net.host_veth, netns=net.netns)

    def release_task(self, net: TaskNet) -> None:
        """`remove_task`, but the veth goes with the netns, in the kernel's namespace cleanup
        (batched: a veth's own deletion waits ~25 ms holding the rtnl lock, which every task
        start waits for); `reap` makes sure it went."""
        self._unmap(net)
        self._rtnl.release_task(netns=net.netns)

    def _unmap(self, net: TaskNet) -> None:
        """Forgets the task as this owner's and unmaps its published ports."""
        self.kept.discard(net.host_veth)
        self._mapped.pop(net.host_veth, None)
        self._unpublish(p.host_port for p in net.published)

    def reap(self, veths: Collection[str], *, timeout: float = REAP_S) -> list[str]:
        """Waits up to `timeout` for released tasks' `veths` to go with their netns, and
        deletes those still there then (something held their netns); returns their names."""
        deadline = time.monotonic() + timeout
        left = set(veths)
        while left:
            left &= {name for name, _, _ in self._links()}
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(_REAP_POLL_S)
        for veth in sorted(left):
            log.warning("the veth %s outlived its task's network namespace by %g s (something "
                        "held the namespace): deleting it", veth, timeout)  # fmt: skip
            self._rtnl.remove_task(veth=veth, netns=_netns_of(veth))
        return sorted(left)

    def sweep(self, *, own: bool = False) -> list[str]:
        """Removes the task veths and netns whose owning process is gone (start-up, after a
        crash), and with `own` this owner's too (but the `kept` ones); returns their names."""
        removed: list[str] = []
        dead: list[str] = []
        addresses: set[str] = set()
        links = self._links()
        for name, alias_text, _ in links:
            alias = (alias_text or "").split()
            if (
                name.startswith(VETH_PREFIX)
                and len(alias) >= 3
                and alias[0] == "agentnode"
                and ipaddress.IPv4Address(alias[1]) in self.subnet
                and (
                    (own and alias[2] == self.owner and name not in self.kept)
                    or (alias[2] != self.owner and not _alive(alias[2]))
                )
            ):
                dead.append(name)
                addresses.add(alias[1])
        # A host port left mapped would lead into whichever task gets the address next.
        if addresses:
            self._unpublish(self._published_to(addresses))
        netns_removed = []
        for veth in dead:
            netns = _netns_of(veth)
            try:
                _, unnamed = self._rtnl.remove_task(veth=veth, netns=netns)
            except EgressError as e:
                log.warning("%s (the next sweep tries again)", e)
                continue  # the others still go
            removed.append(veth)
            if unnamed:
                netns_removed.append(netns)
        # Task netns names no veth here leads to: those whose veth pair is gone, and names a
        # crash left unmounted. (A live task's netns whose veth is in another node's netns,
        # as in tests, still has its link: it stays.)
        veths = {name for name, _, _ in links}
        for path in sorted(RUN_NETNS.glob(TASK_NETNS_PREFIX + "*")):
            if f"{VETH_PREFIX}{path.name.removeprefix(TASK_NETNS_PREFIX)}" in veths:
                continue
            try:
                if self._stale_name(path.name) and self._rtnl.release_task(netns=path.name):
                    netns_removed.append(path.name)
            except EgressError as e:
                log.warning("%s (the next sweep tries again)", e)
        return removed + sorted(netns_removed)

    def _stale_name(self, netns: str, *, any_age: bool = False) -> bool:
        """Whether the task netns name `netns` leads to nothing a task uses: a netns whose
        veth pair is gone, or a file no netns was mounted on (older than
        `_UNMOUNTED_STALE_S` unless `any_age`: another process may be naming it now)."""
        state = self._rtnl.netns_state(netns)
        if state != "unmounted":
            return state == "orphaned"
        try:
            age = time.time() - (RUN_NETNS / netns).lstat().st_mtime
        except OSError:
            return False
        return any_age or age > _UNMOUNTED_STALE_S

    def tasks(self) -> int:
        """How many task veths (of any owner) are on the bridge."""
        return sum(
            1
            for name, _, master in self._links()
            if name.startswith(VETH_PREFIX) and master == self.bridge
        )

    def close(self) -> None:
        """Removes the bridge and the masquerade table, unless another live owner (a node, an
        `agentnode exec`) still has tasks on it. This process's own tasks go first."""
        self.sweep(own=True)
        if self.tasks():
            return
        self._ip("link", "del", self.bridge, check=False)
        self._in_node("nft", "delete", "table", "ip", self.table, check=False)
