"""The egress options of commands that start tasks (`agentnode exec` in Layer 1): `--net`,
`--allow`, `--allow-host`, `--egress-rate`, `--conn-rate`, `--publish`. A bad value is a usage error that
names the option and the rule."""

from __future__ import annotations

from agentnode.egress.mode import NET_MODES, network_and_policy
from agentnode.errors import PolicyError, UsageError

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    import argparse

    from agentnode.egress.policy import EgressPolicy

__all__ = ["NET_MODES", "add_arguments", "network_from_args"]


def add_arguments(parser: argparse.ArgumentParser, *, mode: bool = True) -> None:
    """Adds the egress option group to `parser` (without `--net` and `--publish` when not
    `mode`: both are fixed when a task starts)."""
    g = parser.add_argument_group("network egress")
    if mode:
        g.add_argument(
            "--net",
            choices=NET_MODES,
            help="none: loopback only; egress (default with any --allow*): own netns on the node "
            "bridge, BPF-enforced; host: host netns with BPF only (weaker: host loopback "
            "reachable)",
        )
    g.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR[:PORTS]",
        help="allow a network, e.g. 203.0.113.0/24:443, [2001:db8::/32]:8000-8100/udp (repeatable)",
    )
    g.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME[:PORTS]",
        help="allow a DNS name or *.suffix, e.g. api.openai.com:443 (repeatable)",
    )
    g.add_argument("--egress-rate", metavar="RATE", help="bytes/s out, e.g. 1MiB/s")
    g.add_argument("--conn-rate", metavar="N/s", help="new connections per second, e.g. 20/s")
    if not mode:
        return
    g.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="HOSTPORT:PORT",
        help="make the task's TCP PORT reachable on the node's HOSTPORT, e.g. 8080:80; nothing "
        "else of a task is reachable from outside it (repeatable; needs --net egress)",
    )


def network_from_args(args: argparse.Namespace) -> tuple[str, EgressPolicy | None]:
    """The network mode and policy the options ask for; `UsageError` names a bad option."""
    try:
        return network_and_policy(
            getattr(args, "net", None),
            allow=args.allow,
            hosts=args.allow_host,
            rate=args.egress_rate,
            conn_rate=args.conn_rate,
            publish=getattr(args, "publish", ()),
        )
    except PolicyError as e:
        raise UsageError(str(e)) from None
