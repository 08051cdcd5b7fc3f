"""`Egress`: a policy enforced in the kernel on one cgroup2 node, updated live, with counters and
denial events. Layer 1 attaches one to each task's cgroup; tests attach to scratch nodes."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from agentnode import _native
from agentnode.egress.policy import EgressPolicy, PortRange, services_rules
from agentnode.errors import PolicyError

__all__ = ["Denial", "Egress"]

# The node's audit log: one record per denial, whatever callbacks are registered.
audit = logging.getLogger("agentnode.audit.egress")

_IPPROTO = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 255: "raw"}


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


class Egress:
    """Egress enforcement on one cgroup2 directory. Use `Egress.attach(...)`; `close()` detaches."""

    def __init__(
        self,
        handle: _native.EgressHandle,
        cgroup_dir: str,
        policy: EgressPolicy,
        services: Sequence[tuple[str, int]],
        on_denial: Callable[[Denial], None] | None,
    ) -> None:
        self.cgroup_dir = cgroup_dir
        #: The cgroup's id, as the kernel's denial events carry it.
        self.cgroup_id = os.stat(cgroup_dir).st_ino
        self._handle = handle
        self._policy = policy
        self._services_packed = b"".join(r.packed() for r in services_rules(services))
        self._callbacks: list[Callable[[Denial], None]] = [on_denial] if on_denial else []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Counted by the DNS forwarder: queries it answered for this task, and refused.
        self.dns_answered = 0
        self.dns_refused = 0

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
    ) -> Egress:
        """Enforces `policy` on every process in `cgroup2_dir` (and its descendants).

        `services`: the node's own `(address, port)` services, always allowed. `dns`: the node's
        DNS forwarder's `(address, port)` pairs (one per family); port-53 traffic is redirected there and
        the forwarder is allowed. `on_denial`: called with each `Denial` (see `poll_denials`).
        `pin`: a new directory on a bpffs where the programs' links and the maps are pinned, so
        the enforcement outlives this object and its process (`leave`), until `unpin`. With
        `adopt`, the enforcement pinned at `pin` earlier is taken over instead, brought to
        `policy`, `services` and `dns`; what it learned from DNS, its counters and the denials
        not yet read stay.
        """
        forwarders = list(dns)
        services = [*services, *forwarders]
        handle = _native.EgressHandle(
            os.fspath(cgroup2_dir),
            cls._rules(policy, services),
            rate_bps=policy.rate_bps,
            conn_per_sec=policy.conn_per_sec,
            **_redirect(forwarders),
            pin=None if pin is None else os.fspath(pin),
            adopt=adopt,
        )
        return cls(handle, os.fspath(cgroup2_dir), policy, services, on_denial)

    def unpin(self) -> None:
        """Removes the pins (if any): `close()` then detaches the programs."""
        if not self._handle.closed:
            self._handle.unpin()

    def leave(self) -> None:
        """Closes this object but leaves a pinned enforcement in force, for a later `adopt`."""
        if self._loop is not None and not self._handle.closed:
            self._loop.remove_reader(self._handle.events_fd())
            self._loop = None
        self._handle.leave()

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
        """Reads queued denial events, writes each to the audit log (`agentnode.audit.egress`),
        calls the callbacks with it, and returns them."""
        out = [
            Denial(t, cg, _address(a), port, _IPPROTO.get(proto, str(proto)), reason, pid)
            for (t, cg, a, port, proto, reason, pid) in self._handle.denials()
        ]
        for d in out:
            self.deny(d)
        return out

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
        self._loop = loop
        loop.add_reader(self._handle.events_fd(), self.poll_denials)

    def close(self) -> None:
        """Detaches the programs and frees the maps; idempotent."""
        if self._loop is not None and not self._handle.closed:
            self._loop.remove_reader(self._handle.events_fd())
            self._loop = None
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
