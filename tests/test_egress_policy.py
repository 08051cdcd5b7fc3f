"""Egress policy parsing: good rules compile, bad rules raise one PolicyError naming the rule."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys

import pytest

from agentnode.cli import ArgumentParser
from agentnode.egress import EgressPolicy
from agentnode.egress import cli as egress_cli
from agentnode.egress.mode import network_and_policy
from agentnode.egress.policy import PROTO_TCP, PROTO_UDP, PortRange
from agentnode.errors import PolicyError, UsageError


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


def _parse(*argv: str) -> tuple[str, EgressPolicy | None]:
    parser = ArgumentParser(prog="agentnode exec")
    egress_cli.add_arguments(parser)
    return egress_cli.network_from_args(parser.parse_args(argv))


def test_cli_options_build_the_policy() -> None:
    assert _parse() == ("none", None)
    mode, policy = _parse(
        "--allow", "203.0.113.0/24:443", "--allow-host", "api.openai.com:443",
        "--allow-host", "*.githubusercontent.com", "--egress-rate", "1MiB/s", "--conn-rate", "20/s",
    )  # fmt: skip
    assert mode == "egress" and policy is not None
    assert policy.rate_bps == 1 << 20 and policy.conn_per_sec == 20 and len(policy.host_rules) == 2
    assert _parse("--net", "host", "--allow", "10.0.0.1")[0] == "host"
    assert _parse("--net", "egress")[1] == EgressPolicy()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--allow", "10.0.0.0/33"], "--allow '10.0.0.0/33'"),
        (["--allow-host", ""], "--allow-host ''"),
        (["--egress-rate", "fast"], "--egress-rate 'fast'"),
        (["--net", "none", "--allow", "10.0.0.1"], "--net none"),
    ],
)
def test_cli_bad_options_are_usage_errors(argv: list[str], fragment: str) -> None:
    with pytest.raises(UsageError, match=re.escape(fragment)):
        _parse(*argv)


@pytest.mark.parametrize(
    "kwargs",
    [{"allow": ""}, {"hosts": "x.io"}, {"publish": "8080:80"}, {"allow": [], "rate": 0}],
    ids=repr,
)
def test_a_mode_without_rules_still_refuses_odd_values(kwargs: dict[str, object]) -> None:
    """`network_and_policy` skips the rule parser only when there is truly nothing to parse:
    empty lists and no rates. A string where a list belongs, or a bad rate, still fails."""
    with pytest.raises(PolicyError):
        network_and_policy(None, **kwargs)  # type: ignore[arg-type]


def test_no_rules_load_no_rule_parser() -> None:
    """A task without rules (most `agentnode exec` runs) never imports `egress.policy`."""
    code = (
        "import sys; from agentnode.egress.mode import network_and_policy as n; "
        "assert n(None) == n('none', allow=[], hosts=()) == ('none', None); "
        "print('agentnode.egress.policy' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False", r.stderr
