"""`Egress`: a policy enforced in the kernel on one cgroup2 node, updated live, with counters and
denial events. Layer 1 attaches one to each task's cgroup; tests attach to scratch nodes.

`NodePrograms`: the BPF programs every task's `Egress` attaches, loaded (and verified) once per
node, with the node maps where each task's entry lives under its cgroup id, and the one ring
buffer their denials share, read here and handed to the task each names."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from agentnode import _native
from agentnode.egress.policy import EgressPolicy, PortRange, services_rules
from agentnode.errors import PolicyError

__all__ = ["PROGRAMS_PIN", "Denial", "Egress", "NodePrograms"]

#: Where the node's programs are pinned, beside its tasks' pin directories: named for this
#: build's object, so that a daemon of another build loads its own (its sweep removes the old).
PROGRAMS_PIN = f"programs-{_native.egress_programs_tag()}"
#: Denials of cgroups no `Egress` of this process owns (yet) held for their owner at most;
#: past that they go straight to the audit log.
HELD_MAX = 4096

# The node's audit log: one record per denial, whatever callbacks are registered.
audit = logging.getLogger("agentnode.audit.egress")

_IPPROTO = {0: "ip", 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 255: "raw"}


@dataclass(frozen=True)
class Denial:
    """One denied destination: what the audit log and callbacks receive."""

    time_ns: int
    cgroup_id: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    protocol: str
    reason: str
    pid: int
    #: The DNS name, for what the DNS forwarder denied (an answer's address, a query).
    name: str = ""


def _address(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped or v6


def _packed16(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def _redirect(forwarders: list[tuple[str, int]]) -> dict[str, Any]:
    """The native redirect arguments for the DNS forwarder's `(address, port)` pairs."""
    v4 = v6 = None
    port = 0
    for addr, p in forwarders:
        ip = ipaddress.ip_address(addr)
        port = p
        if isinstance(ip, ipaddress.IPv4Address):
            v4 = ip.packed
        else:
            v6 = ip.packed
    if len({p for _, p in forwarders}) > 1:
        raise PolicyError("the DNS forwarder must use one port for both address families")
    return {"dns_v4": v4, "dns_v6": v6, "dns_port": port}


class NodePrograms:
    """The node's egress programs and maps, loaded once; `Egress.attach` attaches them to each
    task's cgroup. Reads the denials every task shares one ring buffer for and hands each to
    the `Egress` of its task (held until that task's `Egress` exists, for one taken over)."""

    _shared: ClassVar[weakref.WeakValueDictionary[str, NodePrograms]] = (
        weakref.WeakValueDictionary()
    )
    _default: ClassVar[NodePrograms | None] = None
    _shared_lock = threading.Lock()

    def __init__(self, handle: _native.EgressPrograms) -> None:
        self.handle = handle
        self._lock = threading.RLock()
        self._owners: weakref.WeakValueDictionary[int, Egress] = weakref.WeakValueDictionary()
        #: Tasks left running for a later process: what this one reads of theirs until it
        #: exits still reaches their callbacks (read once, it is gone from the ring).
        self._left: dict[int, Egress] = {}
        self._held: dict[int, list[Denial]] = {}
        self._n_held = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching: set[int] = set()

    @classmethod
    def load(cls, *, pin: str | os.PathLike[str] | None = None) -> NodePrograms:
        """Loads the programs. With `pin` (a directory on a bpffs): takes over those pinned there
        (by an earlier process of the node, whose tasks may still use them), else loads them and
        pins them there, so tasks pinned with them outlive this process."""
        return cls(_native.EgressPrograms(pin=None if pin is None else os.fspath(pin)))

    @classmethod
    def shared(cls, pin: str | os.PathLike[str] | None = None) -> NodePrograms:
        """This process's programs pinned at `pin` (or its unpinned ones), loaded on first use:
        what `Egress.attach` uses when given none."""
        with cls._shared_lock:
            if pin is None:
                if cls._default is None:
                    cls._default = cls.load()
                return cls._default
            key = os.fspath(pin)
            node = cls._shared.get(key)
            # Pins removed since (the node stopped with no task kept): load and pin again.
            if node is None or not os.path.isdir(key):
                node = cls._shared[key] = cls.load(pin=key)
            return node

    @classmethod
    def _forget(cls) -> None:
        # A forked child reads no ring buffer of its parent's: it loads its own on first use.
        cls._default = None
        cls._shared = weakref.WeakValueDictionary()
        cls._shared_lock = threading.Lock()

    def unpin(self) -> None:
        """Removes the node's pins (no task may outlive this process any more)."""
        self.handle.unpin()

    def purge(self) -> int:
        """Removes the entries of every task no `Egress` of this process owns: what tasks that
        ended while no owner ran left in the node maps. Returns how many entries went."""
        with self._lock:
            return self.handle.purge(set(self._owners.keys()))

    def register(self, egress: Egress) -> None:
        """Makes `egress` the owner of its task's denials (one taken over replaces the one
        that left it)."""
        with self._lock:
            self._left.pop(egress.cgroup_id, None)
            self._owners[egress.cgroup_id] = egress

    def unregister(self, egress: Egress, *, left: bool = False) -> None:
        """Forgets `egress` (closed); `left`: it runs on for a later process, and its denials
        this process still reads go to it."""
        with self._lock:
            self.unwatch(egress)
            if left:
                self._left[egress.cgroup_id] = egress
            elif self._owners.get(egress.cgroup_id) is egress:
                del self._owners[egress.cgroup_id]

    def poll(self) -> list[Denial]:
        """Reads the queued denials and hands each to its task's `Egress` (`Egress.deny`), or
        holds it for one not there yet; returns those handed over, held ones included."""
        with self._lock:
            fresh = [
                Denial(t, cg, _address(a), port, _IPPROTO.get(proto, str(proto)), reason, pid)
                for (t, cg, a, port, proto, reason, pid) in self.handle.denials()
            ]
            out: list[Denial] = []
            for cg in [cg for cg in self._held if cg in self._owners]:
                held = self._held.pop(cg)
                self._n_held -= len(held)
                out.extend(held)
            for d in fresh:
                if d.cgroup_id in self._owners:
                    out.append(d)
                elif self._n_held < HELD_MAX:
                    self._held.setdefault(d.cgroup_id, []).append(d)
                    self._n_held += 1
                else:
                    _audit_unowned(d)
            for d in out:
                owner = self._owners.get(d.cgroup_id)
                if owner is not None:
                    owner.deny(d)
            return out

    def flush(self) -> None:
        """Writes the denials held for cgroups no `Egress` took over to the audit log."""
        with self._lock:
            held, self._held, self._n_held = self._held, {}, 0
        for ds in held.values():
            for d in ds:
                _audit_unowned(d)

    def watch(self, egress: Egress, loop: asyncio.AbstractEventLoop) -> None:
        """Reads denials from `loop` as they come while `egress` is watched (the first watch's
        loop serves every task of the node)."""
        with self._lock:
            if self._loop is None:
                loop.add_reader(self.handle.events_fd(), self.poll)
                self._loop = loop
            self._watching.add(egress.cgroup_id)

    def unwatch(self, egress: Egress) -> None:
        with self._lock:
            self._watching.discard(egress.cgroup_id)
            if not self._watching and self._loop is not None:
                if not self._loop.is_closed():
                    self._loop.remove_reader(self.handle.events_fd())
                self._loop = None


os.register_at_fork(after_in_child=NodePrograms._forget)


def _audit_unowned(d: Denial) -> None:
    audit.info(
        "egress denied: cgroup id %d (no task of this process) pid %d %s %s port %d (%s)",
        d.cgroup_id, d.pid, d.protocol, d.address, d.port, d.reason,
    )  # fmt: skip


class Egress:
    """Egress enforcement on one cgroup2 directory. Use `Egress.attach(...)`; `close()` detaches."""

    def __init__(
        self,
        handle: _native.EgressHandle,
        node: NodePrograms,
        cgroup_dir: str,
        policy: EgressPolicy,
        services: Sequence[tuple[str, int]],
        on_denial: Callable[[Denial], None] | None,
    ) -> None:
        self.cgroup_dir = cgroup_dir
        #: The task's id (its cgroup's), as the kernel's denial events carry it.
        self.cgroup_id = handle.id()
        self.node = node
        self._handle = handle
        self._policy = policy
        self._services_packed = b"".join(r.packed() for r in services_rules(services))
        self._callbacks: list[Callable[[Denial], None]] = [on_denial] if on_denial else []
        #: Counted by the DNS forwarder: queries it answered for this task, and refused.
        self.dns_answered = 0
        self.dns_refused = 0
        node.register(self)

    @classmethod
    def attach(
        cls,
        cgroup2_dir: str | os.PathLike[str],
        policy: EgressPolicy,
        *,
        services: Iterable[tuple[str, int]] = (),
        dns: Iterable[tuple[str, int]] = (),
        on_denial: Callable[[Denial], None] | None = None,
        pin: str | os.PathLike[str] | None = None,
        adopt: bool = False,
        programs: NodePrograms | None = None,
    ) -> Egress:
        """Enforces `policy` on every process in `cgroup2_dir` (and its descendants).

        `services`: the node's own `(address, port)` services, always allowed. `dns`: the node's
        DNS forwarder's `(address, port)` pairs (one per family); port-53 traffic is redirected there and
        the forwarder is allowed. `on_denial`: called with each `Denial` (see `poll_denials`).
        `pin`: a new directory on a bpffs where the programs' links and the maps are pinned, so
        the enforcement outlives this object and its process (`leave`), until `unpin`. With
        `adopt`, the enforcement pinned at `pin` earlier is taken over instead, brought to
        `policy`, `services` and `dns`; what it learned from DNS, its counters and the denials
        not yet read stay. `programs`: the node's (default: this process's, pinned in
        `PROGRAMS_PIN` beside `pin` when pinned).
        """
        forwarders = list(dns)
        services = [*services, *forwarders]
        if programs is None:
            programs = NodePrograms.shared(None if pin is None else Path(pin).parent / PROGRAMS_PIN)
        handle = _native.EgressHandle(
            programs.handle,
            os.fspath(cgroup2_dir),
            cls._rules(policy, services),
            rate_bps=policy.rate_bps,
            conn_per_sec=policy.conn_per_sec,
            **_redirect(forwarders),
            pin=None if pin is None else os.fspath(pin),
            adopt=adopt,
        )
        return cls(handle, programs, os.fspath(cgroup2_dir), policy, services, on_denial)

    def unpin(self) -> None:
        """Removes the pins (if any): `close()` then detaches the programs."""
        if not self._handle.closed:
            self._handle.unpin()

    def leave(self) -> None:
        """Closes this object but leaves a pinned enforcement in force, for a later `adopt`."""
        self.node.unregister(self, left=True)
        self._handle.leave()

    def withdraw(self) -> None:
        """Withdraws the task's entry from the node's maps: its programs stay attached and deny
        it everything (even loopback) until `close()`; no update applies any more."""
        self._handle.withdraw()

    @staticmethod
    def _rules(
        policy: EgressPolicy, services: Sequence[tuple[str, int]]
    ) -> list[tuple[bytes, int, list[tuple[int, int, int]]]]:
        return [r.native() for r in (*policy.kernel_rules, *services_rules(services))]

    @property
    def policy(self) -> EgressPolicy:
        """The policy in force."""
        return self._policy

    def update(self, policy: EgressPolicy) -> None:
        """Replaces the policy live (map updates only); applies to the next connection.

        When the host rules change, addresses learned from DNS are forgotten: one learned for a
        name the new policy drops must not stay reachable until its TTL runs out."""
        self._handle.set_rules_packed(policy.native_packed + self._services_packed)
        if policy.host_rules != self._policy.host_rules:
            self._handle.clear_exact()
        if (policy.rate_bps, policy.conn_per_sec) != (
            self._policy.rate_bps,
            self._policy.conn_per_sec,
        ):
            self._handle.set_limits(rate_bps=policy.rate_bps, conn_per_sec=policy.conn_per_sec)
        self._policy = policy

    def allow_resolved(
        self,
        ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        ports: Sequence[PortRange],
        ttl: float,
    ) -> None:
        """Allows one address learned from DNS on `ports` for `ttl` seconds."""
        self._handle.allow_exact(_packed16(ip), [p.as_tuple() for p in ports], ttl)

    def expire(self) -> int:
        """Drops expired DNS-learned addresses from the map; returns how many."""
        return self._handle.expire_exact()

    def stats(self) -> dict[str, int]:
        """Counters: bytes/packets out and in, connections allowed/denied, drops, DNS."""
        return {
            **self._handle.counters(),
            "dns_answered": self.dns_answered,
            "dns_refused": self.dns_refused,
        }

    def poll_denials(self) -> list[Denial]:
        """Reads queued denial events (of every task of the node: each goes to its own task),
        writes each to the audit log (`agentnode.audit.egress`), calls the callbacks with it,
        and returns this task's."""
        return [d for d in self.node.poll() if d.cgroup_id == self.cgroup_id]

    def deny(self, d: Denial) -> None:
        """Writes one denial to the audit log and calls the callbacks with it (the DNS forwarder
        reports what it drops this way)."""
        audit.info(
            "egress denied: cgroup %s pid %d %s %s port %d (%s)%s",
            self.cgroup_dir, d.pid, d.protocol, d.address, d.port, d.reason,
            f" for {d.name}" if d.name else "",
        )  # fmt: skip
        for cb in self._callbacks:
            cb(d)

    def on_denial(self, callback: Callable[[Denial], None]) -> None:
        """Adds a callback for denial events."""
        self._callbacks.append(callback)

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Delivers denials to the callbacks from `loop` as they happen (until `close()`)."""
        self.node.watch(self, loop)

    def close(self) -> None:
        """Detaches the programs and withdraws the task's entry; idempotent."""
        self.node.unregister(self)
        self._handle.close()

    @property
    def closed(self) -> bool:
        """Whether `close()` has run."""
        return self._handle.closed

    def __enter__(self) -> Egress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
