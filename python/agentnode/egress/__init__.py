"""Layer 2: kernel-enforced egress. A task's policy lives in BPF maps on its cgroup2 node:
deny by default, CIDR/port rules, DNS-name rules through the node's forwarder, rate limits,
counters and denial events."""

from agentnode import _lazy

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from agentnode.egress.dns import DnsForwarder
    from agentnode.egress.enforce import Denial, Egress
    from agentnode.egress.network import NodeNetwork, TaskNet
    from agentnode.egress.policy import EgressPolicy, HostRule, NetRule, PortRange

__all__ = [
    "Denial",
    "DnsForwarder",
    "Egress",
    "EgressPolicy",
    "HostRule",
    "NetRule",
    "NodeNetwork",
    "PortRange",
    "TaskNet",
]

__getattr__ = _lazy.exports(
    __name__,
    {
        "DnsForwarder": "dns",
        "Denial": "enforce",
        "Egress": "enforce",
        "NodeNetwork": "network",
        "TaskNet": "network",
        "EgressPolicy": "policy",
        "HostRule": "policy",
        "NetRule": "policy",
        "PortRange": "policy",
    },
)
