"""Which answer addresses a task may learn (`AnswerScreen`), for each kind of guarded range and
for the rules that open one."""

from __future__ import annotations

import ipaddress
import socket

import psutil
import pytest

from agentnode.egress import EgressPolicy
from agentnode.egress.screen import AnswerScreen, own_addresses


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1", "127.9.9.9", "0.0.0.0", "169.254.169.254", "10.0.0.1", "172.16.5.4",
        "192.168.0.1", "100.100.100.200", "224.0.0.1", "255.255.255.255", "::1", "::",
        "fe80::1", "fd00:ec2::254", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.1.1.1",
        "::a9fe:a9fe", "64:ff9b::7f00:1", "10.250.3.1",
    ],
)  # fmt: skip
def test_guarded_addresses_are_blocked_even_under_wide_rules(addr: str) -> None:
    screen = AnswerScreen(extra=["10.250.3.0/24"], own=False)
    wide = EgressPolicy(allow=["0.0.0.0/0", "[::/0]:1-65535"]).nets
    assert screen.blocked(ipaddress.ip_address(addr), wide) is not None


@pytest.mark.parametrize("addr", ["198.51.100.7", "2001:db8::7", "8.8.8.8", "::ffff:8.8.8.8"])
def test_public_addresses_pass(addr: str) -> None:
    assert AnswerScreen(own=False).blocked(ipaddress.ip_address(addr), ()) is None


def test_a_rule_no_wider_than_the_range_opens_it() -> None:
    screen = AnswerScreen(own=False)
    ip = ipaddress.ip_address("10.1.2.3")
    assert screen.blocked(ip, EgressPolicy(allow=["10.1.2.0/24:443"]).nets) is None
    assert screen.blocked(ip, EgressPolicy(allow=["10.9.0.0/16"]).nets) is not None
    # A v4-mapped answer is the IPv4 destination (the kernel's rules see it so): same verdicts.
    mapped = ipaddress.ip_address("::ffff:10.1.2.3")
    assert screen.blocked(mapped, EgressPolicy(allow=["10.0.0.0/8"]).nets) is None
    assert screen.blocked(mapped, EgressPolicy(allow=["[::/0]"]).nets) is not None


def _stable_own_address() -> ipaddress.IPv4Address:
    """An IPv4 address of this host that other tests do not add and remove meanwhile (their
    bridges and veths come and go): the default route's interface's, else any non-loopback."""
    with open("/proc/net/route") as f:
        default = [line.split()[0] for line in f.readlines()[1:] if line.split()[1] == "00000000"]
    for a in psutil.net_if_addrs().get(default[0], []) if default else []:
        if a.family == socket.AF_INET:
            return ipaddress.IPv4Address(a.address)
    own = next(a for a in own_addresses() if a.version == 4 and not a.is_loopback)
    assert isinstance(own, ipaddress.IPv4Address)
    return own


def test_own_addresses_are_guarded_and_only_a_rule_naming_one_opens_it() -> None:
    screen = AnswerScreen()
    own = _stable_own_address()
    reason = screen.blocked(own, EgressPolicy(allow=["0.0.0.0/0"]).nets)
    assert reason is not None and f"{own}/32" in reason
    assert screen.blocked(own, EgressPolicy(allow=[f"{own}/32"]).nets) is None
