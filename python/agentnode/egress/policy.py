"""Egress policies: parsing `--allow`, `--allow-host`, `--egress-rate`, `--conn-rate` and
`--publish` values.

Every bad rule raises one `PolicyError` that quotes the rule and says what is wrong with it.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agentnode.errors import PolicyError

__all__ = [
    "MAX_CONN_RATE",
    "MAX_RATE",
    "PROTO_TCP",
    "PROTO_UDP",
    "EgressPolicy",
    "HostRule",
    "NetRule",
    "PortRange",
    "Published",
]

#: Rate bounds (the BPF maps hold u64 token buckets; these keep their arithmetic exact).
MAX_RATE = 1 << 40
MAX_CONN_RATE = 1 << 20

PROTO_TCP = 1
PROTO_UDP = 2
_PROTOS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}
_ANY_PORT = (1, 65535)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*(?:/s)?\s*$", re.IGNORECASE)
_CONN_RATE = re.compile(r"^\s*(\d+)\s*(?:/s)?\s*$")
# address, prefix, low port, high port, protocol bits: see EgressHandle.set_rules_packed.
_PACKED = struct.Struct("<16sBHHB")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class PortRange:
    """Ports `lo`..`hi` (inclusive) for the protocols in `proto` (PROTO_TCP | PROTO_UDP bits)."""

    lo: int
    hi: int
    proto: int = PROTO_TCP | PROTO_UDP

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.lo, self.hi, self.proto)


@dataclass(frozen=True)
class NetRule:
    """Destinations in `network` on `ports`."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    ports: PortRange

    def native(self) -> tuple[bytes, int, list[tuple[int, int, int]]]:
        """The kernel form: IPv4 as IPv4-mapped IPv6 with the prefix moved by 96."""
        net = self.network
        if isinstance(net, ipaddress.IPv4Network):
            mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + net.network_address.packed)
            return (mapped.packed, net.prefixlen + 96, [self.ports.as_tuple()])
        return (net.network_address.packed, net.prefixlen, [self.ports.as_tuple()])

    def packed(self) -> bytes:
        """The kernel form as one record for `EgressHandle.set_rules_packed`."""
        addr, prefix, ((lo, hi, proto),) = self.native()
        return _PACKED.pack(addr, prefix, lo, hi, proto)


@dataclass(frozen=True)
class HostRule:
    """A DNS name (exact, or `*.suffix` for any name under suffix) on `ports`."""

    pattern: str
    ports: PortRange

    def matches(self, name: str) -> bool:
        """Whether `name` (any case, trailing dot optional) is covered by this rule."""
        name = name.lower().rstrip(".")
        if self.pattern.startswith("*."):
            return name.endswith(self.pattern[1:])
        return name == self.pattern


@dataclass(frozen=True)
class Published:
    """A task's TCP `port` reachable from outside the node on the node's `host_port`."""

    host_port: int
    port: int

    def kernel_rule(self) -> NetRule:
        """The backstop's form: an entry for `::`, which no destination rule may name (see
        `parse_allow`), whose ports are the task's published ones."""
        return NetRule(ipaddress.IPv6Network("::/128"), PortRange(self.port, self.port, PROTO_TCP))


def parse_publish(rule: str) -> Published:
    """Parses `HOSTPORT:PORT` (TCP), e.g. `8080:80`."""
    text = rule.strip() if isinstance(rule, str) else ""
    host_s, sep, port_s = text.partition(":")
    try:
        host_port, port = int(host_s), int(port_s)
    except ValueError:
        raise PolicyError(
            f"bad publish rule {rule!r}: use HOSTPORT:PORT with two port numbers, e.g. 8080:80"
        ) from None
    if not sep or not (1 <= host_port <= 65535 and 1 <= port <= 65535):
        raise PolicyError(f"bad publish rule {rule!r}: ports must be 1-65535")
    return Published(host_port, port)


def _ports(rule: str, text: str) -> PortRange:
    proto = PROTO_TCP | PROTO_UDP
    if "/" in text:
        text, _, pname = text.partition("/")
        if pname.lower() not in _PROTOS:
            raise PolicyError(f"bad rule {rule!r}: protocol {pname!r} is not tcp or udp")
        proto = _PROTOS[pname.lower()]
    if text in ("", "*"):
        return PortRange(*_ANY_PORT, proto)
    lo_s, _, hi_s = text.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else lo
    except ValueError:
        raise PolicyError(
            f"bad rule {rule!r}: port {text!r} is not a number or range like 8000-8100"
        ) from None
    if not (1 <= lo <= hi <= 65535):
        raise PolicyError(f"bad rule {rule!r}: ports must be 1-65535 with low <= high")
    return PortRange(lo, hi, proto)


def parse_allow(rule: str) -> NetRule:
    """Parses `CIDR[:PORTS[/tcp|/udp]]`; IPv6 with a port is written `[2001:db8::/32]:443`."""
    if not isinstance(rule, str) or not rule.strip():
        raise PolicyError(
            f"bad allow rule {rule!r}: empty (use CIDR[:PORTS], e.g. 203.0.113.0/24:443)"
        )
    text = rule.strip()
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise PolicyError(
                f"bad allow rule {rule!r}: write IPv6 with ports as [2001:db8::/32]:443"
            )
        ports = rest[1:]
    elif text.count(":") >= 2:
        addr, ports = text, ""
    else:
        addr, _, ports = text.partition(":")
    try:
        network = ipaddress.ip_network(addr, strict=False)
    except ValueError as e:
        raise PolicyError(f"bad allow rule {rule!r}: {e}") from None
    if network == ipaddress.IPv6Network("::/128"):
        # Published ports live under this key; `::` is no destination anyway.
        raise PolicyError(f"bad allow rule {rule!r}: the unspecified address is no destination")
    return NetRule(network, _ports(rule, ports))


def parse_host(rule: str) -> HostRule:
    """Parses `NAME[:PORTS[/tcp|/udp]]`, NAME exact or `*.suffix`."""
    if not isinstance(rule, str) or not rule.strip():
        raise PolicyError(
            f"bad host rule {rule!r}: empty (use NAME[:PORTS], e.g. api.example.com:443)"
        )
    name, _, ports = rule.strip().partition(":")
    name = name.lower().rstrip(".")
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise PolicyError(
            f"bad host rule {rule!r}: {name!r} is not a DNS name or *.suffix wildcard"
        )
    return HostRule(name, _ports(rule, ports))


def parse_rate(text: str | int) -> int:
    """Bytes per second from `1MiB/s`, `500kb/s`, `2000` or an int."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        m = _RATE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise PolicyError(
                f"bad egress rate {text!r}: use bytes per second like 1MiB/s or 500KB/s"
            )
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 1 <= value <= MAX_RATE:
        raise PolicyError(
            f"bad egress rate {text!r}: must be at least 1 byte/s and at most 1 TiB/s"
        )
    return int(value)


def parse_conn_rate(text: str | int) -> int:
    """New connections per second from `20/s`, `20` or an int."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _CONN_RATE.match(str(text))
        if not m:
            raise PolicyError(f"bad connection rate {text!r}: use connections per second like 20/s")
        value = int(m.group(1))
    if not 1 <= value <= MAX_CONN_RATE:
        raise PolicyError(
            f"bad connection rate {text!r}: must be at least 1/s and at most {MAX_CONN_RATE}/s"
        )
    return value


@dataclass(frozen=True)
class EgressPolicy:
    """What a task may reach. Deny by default; loopback and the node's services always work.

    `allow`: `CIDR[:PORTS[/tcp|/udp]]` rules; `hosts`: `NAME[:PORTS]` DNS rules (resolved through
    the node's forwarder); `rate`: bytes/s out (`1MiB/s`); `conn_rate`: new connections/s;
    `publish`: `HOSTPORT:PORT` TCP ports reachable from outside the node (nothing else is).
    """

    allow: Sequence[str] = ()
    hosts: Sequence[str] = ()
    rate: str | int | None = None
    conn_rate: str | int | None = None
    publish: Sequence[str] = ()
    nets: tuple[NetRule, ...] = field(init=False, repr=False)
    published: tuple[Published, ...] = field(init=False, repr=False)
    host_rules: tuple[HostRule, ...] = field(init=False, repr=False)
    rate_bps: int = field(init=False, repr=False)
    conn_per_sec: int = field(init=False, repr=False)
    # The kernel form of `nets`, computed once so a live update only moves bytes.
    native_packed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("allow", "hosts", "publish"):
            if isinstance(getattr(self, name), str):
                raise PolicyError(f"EgressPolicy({name}=...) takes a list of rules, not one string")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "nets", tuple(parse_allow(r) for r in self.allow))
        published = tuple(parse_publish(r) for r in self.publish)
        taken = [p.host_port for p in published]
        if len(set(taken)) < len(taken):
            raise PolicyError(f"bad publish rules {list(self.publish)!r}: a host port twice")
        object.__setattr__(self, "published", published)
        object.__setattr__(self, "native_packed", b"".join(r.packed() for r in self.kernel_rules))
        object.__setattr__(self, "host_rules", tuple(parse_host(r) for r in self.hosts))
        object.__setattr__(self, "rate_bps", 0 if self.rate is None else parse_rate(self.rate))
        object.__setattr__(
            self,
            "conn_per_sec",
            0 if self.conn_rate is None else parse_conn_rate(self.conn_rate),
        )

    @property
    def kernel_rules(self) -> tuple[NetRule, ...]:
        """What the kernel maps hold: the CIDR rules and the published ports."""
        return (*self.nets, *(p.kernel_rule() for p in self.published))

    def host_ports(self, name: str) -> list[PortRange]:
        """The ports `name` may be reached on (empty: the name is not allowed)."""
        return [r.ports for r in self.host_rules if r.matches(name)]


def services_rules(services: Iterable[tuple[str, int]]) -> list[NetRule]:
    """Rules for the node's own services, `(address, port)` pairs."""
    out = []
    for addr, port in services:
        ip = ipaddress.ip_address(addr)
        out.append(NetRule(ipaddress.ip_network(ip), PortRange(port, port)))
    return out
