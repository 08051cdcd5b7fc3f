"""Egress policy parsing: good rules compile, bad rules raise one PolicyError naming the rule."""

from __future__ import annotations

import ipaddress

import pytest

from agentnode.egress import EgressPolicy
from agentnode.egress.policy import PROTO_TCP, PROTO_UDP, PortRange
from agentnode.errors import PolicyError


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"allow": ["10.0.0.0/33"]}, "'10.0.0.0/33'"),
        ({"allow": [""]}, "empty"),
        ({"allow": ["10.0.0.1:0"]}, "1-65535"),
        ({"allow": ["10.0.0.1:http"]}, "'http'"),
        ({"allow": ["10.0.0.1:443/sctp"]}, "'sctp'"),
        ({"allow": ["[2001:db8::/129]:443"]}, "2001:db8::/129"),
        ({"allow": "10.0.0.1"}, "list of rules"),
        ({"hosts": [""]}, "bad host rule ''"),
        ({"hosts": ["bad_name!.com"]}, "bad_name!.com"),
        ({"hosts": ["*."]}, "'*.'"),
        ({"rate": "fast"}, "bad egress rate 'fast'"),
        ({"rate": 0}, "at least 1"),
        ({"conn_rate": "lots"}, "bad connection rate 'lots'"),
    ],
)
def test_bad_rules_name_the_rule(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(PolicyError) as e:
        EgressPolicy(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_rules_parse() -> None:
    p = EgressPolicy(
        allow=[
            "203.0.113.0/24:443",
            "198.51.100.7",
            "[2001:db8::/32]:8000-8100/udp",
            "2001:db8::1",
        ],
        hosts=["API.example.com:443", "*.githubusercontent.com"],
        rate="1MiB/s",
        conn_rate="20/s",
    )
    assert p.nets[0].network == ipaddress.ip_network("203.0.113.0/24")
    assert p.nets[0].ports == PortRange(443, 443)
    assert p.nets[1].ports == PortRange(1, 65535)
    assert p.nets[2].ports == PortRange(8000, 8100, PROTO_UDP)
    assert p.nets[3].network.prefixlen == 128
    assert p.rate_bps == 1024 * 1024
    assert p.conn_per_sec == 20
    assert p.host_ports("api.example.com.") == [PortRange(443, 443)]
    assert p.host_ports("raw.githubusercontent.com") == [PortRange(1, 65535)]
    assert p.host_ports("githubusercontent.com") == []
    assert p.host_ports("evil.com") == []
    mapped, prefix, ports = p.nets[0].native()
    assert mapped[:12] == b"\0" * 10 + b"\xff\xff" and prefix == 120
    assert ports == [(443, 443, PROTO_TCP | PROTO_UDP)]


def test_empty_policy_allows_nothing() -> None:
    p = EgressPolicy()
    assert p.nets == () and p.host_rules == () and p.rate_bps == 0
