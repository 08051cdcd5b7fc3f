"""A task's network mode from its options (`NET_MODES`, `network_and_policy`), apart from the
rule parser (`egress.policy`): a task that asks for no egress rules, as most `agentnode exec`
runs do, never loads that parser (its dataclasses and `ipaddress` cost a command ~4 ms)."""

from __future__ import annotations

from types import MappingProxyType

from agentnode.errors import PolicyError

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    from agentnode.egress.policy import EgressPolicy

__all__ = ["NET_MODES", "network_and_policy"]

#: Task network modes: loopback only; own netns on the node bridge; the host's netns (weaker).
NET_MODES = ("none", "egress", "host")

#: The command-line option of each parameter of `network_and_policy`, for its errors.
_OPTIONS = {"mode": "--net", "allow": "--allow", "hosts": "--allow-host", "rate": "--egress-rate",
            "conn_rate": "--conn-rate", "publish": "--publish"}  # fmt: skip


def network_and_policy(
    mode: str | None,
    *,
    allow: Sequence[str] = (),
    hosts: Sequence[str] = (),
    rate: str | int | None = None,
    conn_rate: str | int | None = None,
    publish: Sequence[str] = (),
    names: Mapping[str, str] = MappingProxyType({}),
) -> tuple[str, EgressPolicy | None]:
    """The network mode and policy a task's options ask for. The mode defaults to `egress`
    when any rule or rate is given, else `none`. A `PolicyError` starts with the name of the
    bad value's option (`names` maps parameters to the caller's names; the rest keep the
    command line's, `--allow`...) and quotes the bad rule."""
    no_rules = rate is None and conn_rate is None
    no_rules = no_rules and all(
        isinstance(r, list | tuple) and not r for r in (allow, hosts, publish)
    )
    if no_rules and mode in (None, "", "none"):
        return "none", None  # nothing to parse (a string or other odd value goes to the parser)
    from agentnode.egress.policy import EgressPolicy

    wants_policy = bool(allow or hosts or publish or rate is not None or conn_rate is not None)

    named = {**_OPTIONS, **names}
    net_name, allow_name, hosts_name = named["mode"], named["allow"], named["hosts"]
    rate_name, conn_name, publish_name = named["rate"], named["conn_rate"], named["publish"]
    try:
        policy = EgressPolicy(
            allow=allow, hosts=hosts, rate=rate, conn_rate=conn_rate, publish=publish
        )
    except PolicyError:
        # Parse again one rule at a time, only to name the bad one (a policy may hold 10k).
        checks: list[tuple[str, str | int | None, dict[str, Any]]]
        checks = [(allow_name, r, {"allow": [r]}) for r in allow]
        checks += [(hosts_name, r, {"hosts": [r]}) for r in hosts]
        checks += [(publish_name, r, {"publish": [r]}) for r in publish]
        checks += [
            (rate_name, rate, {"rate": rate}),
            (conn_name, conn_rate, {"conn_rate": conn_rate}),
        ]
        for name, value, kwargs in checks:
            if value is None:
                continue
            try:
                EgressPolicy(**kwargs)
            except PolicyError as e:
                raise PolicyError(f"{name} {value!r}: {e}") from None
        raise
    mode = mode or ("egress" if wants_policy else "none")
    if mode not in NET_MODES:
        raise PolicyError(f"{net_name} {mode!r}: use {', '.join(NET_MODES)}")
    if publish and mode != "egress":
        raise PolicyError(
            f"{publish_name} needs {net_name} egress: only a task with its own address has ports "
            "to publish"
        )
    if mode == "none":
        if wants_policy:
            raise PolicyError(
                f"{net_name} none allows no egress (drop the allow rules and rates, or use egress)"
            )
        return mode, None
    return mode, policy
