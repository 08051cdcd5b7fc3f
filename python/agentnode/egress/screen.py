"""Which DNS answers a task may learn: no name a host rule allows may lead a task to the node, the
host, its neighbours or the cloud's metadata service (DNS rebinding).

An answer's address is dropped when it lies in a guarded range — loopback, link-local (and so
the 169.254.169.254 metadata service), private and shared (CGNAT) ranges, multicast and reserved
space, the node's task subnet, and every address of the node's own interfaces — unless a CIDR
rule of the task names an address there and is no wider than that range: `--allow 10.0.0.0/8`
opens private 10/8 to DNS, `--allow 0.0.0.0/0` opens nothing guarded. IPv6 addresses that
embed an IPv4 address (v4-mapped, v4-compatible, NAT64) are judged by that address too.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable, Sequence

import psutil

from agentnode.egress.policy import NetRule

__all__ = ["GUARDED", "AnswerScreen"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Ranges no DNS answer may point into unless a CIDR rule opens them (besides the node's own).
GUARDED: tuple[_Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the task's own host
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space; also Alibaba's metadata (100.100.100.200)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, and the metadata service of most clouds
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments (DS-Lite, NAT64 discovery)
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking, used inside providers' networks
        "224.0.0.0/4",
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",
        "::1/128",
        "fc00::/7",  # unique local (AWS's IPv6 metadata is fd00:ec2::254)
        "fe80::/10",
        "fec0::/10",  # site-local, deprecated but still routed by some stacks
        "ff00::/8",
    )
)

# IPv6 forms that carry an IPv4 address in their last 32 bits.
_EMBEDDING = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("64:ff9b::/96"))


def _embedded(ip: _Address) -> _Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in n for n in _EMBEDDING) and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def own_addresses() -> set[_Address]:
    """Every address of this network namespace's interfaces (the calling thread's netns)."""
    out: set[_Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(ipaddress.ip_address(a.address.split("%")[0]))
    return out


class AnswerScreen:
    """Decides which answer addresses a task may learn. `extra`: further guarded networks (the
    node's task subnet); the node's own addresses are read from its netns, at most every
    `refresh` seconds (so one added while running is guarded soon after). `own=False` leaves
    them out: only for a forwarder that shares a netns with test upstreams, never the node's."""

    def __init__(
        self, *, extra: Iterable[str | _Network] = (), refresh: float = 2.0, own: bool = True
    ) -> None:
        self.guarded = (*GUARDED, *(ipaddress.ip_network(n) for n in extra))
        self.refresh = refresh
        self.own = own
        self._own: frozenset[_Address] = frozenset()
        self._read_at = -refresh

    def _own_addresses(self) -> frozenset[_Address]:
        if not self.own:
            return self._own
        now = time.monotonic()
        if now - self._read_at >= self.refresh:
            self._own, self._read_at = frozenset(own_addresses()), now
        return self._own

    def blocked(self, ip: _Address, nets: Sequence[NetRule]) -> str | None:
        """Why `ip` may not be learned by a task with CIDR rules `nets` (the guarded range it
        lies in), or None when it may."""
        for addr in (ip, _embedded(ip)):
            if addr is None:
                continue
            ranges: list[_Network] = [
                n for n in self.guarded if addr.version == n.version and addr in n
            ]
            if addr in self._own_addresses():
                ranges.append(ipaddress.ip_network(addr))
            for rng in ranges:
                if not any(
                    r.network.version == rng.version
                    and addr in r.network
                    and r.network.subnet_of(rng)  # type: ignore[arg-type]
                    for r in nets
                ):
                    return f"{addr} is in {rng}"
        return None
