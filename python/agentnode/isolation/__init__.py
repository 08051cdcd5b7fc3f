"""Layer 1: isolated task execution (namespaces, cgroups, limits, accounting, lifecycle).

`Sandbox` (`isolation.spec`) is a task's whole isolation spec, shared by every way to start one.
`spawn()` starts a command in new pid, mount, uts, ipc, net and cgroup namespaces on a read-only
root, without capabilities, under a seccomp filter, in its own cgroups; the returned `Task` is
waited on, signalled, frozen and killed through its pidfd and cgroup2 node.
"""

from agentnode import _lazy

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from agentnode.isolation.spec import Limits, Mount, Sandbox, SpecError
    from agentnode.isolation.task import (
        USERNS_BASE,
        ExitReason,
        Result,
        Stats,
        Task,
        spawn,
        use_data_dir,
    )
    from agentnode.isolation.units import format_size, parse_duration, parse_size

__all__ = [
    "USERNS_BASE",
    "ExitReason",
    "Limits",
    "Mount",
    "Result",
    "Sandbox",
    "SpecError",
    "Stats",
    "Task",
    "format_size",
    "parse_duration",
    "parse_size",
    "spawn",
    "use_data_dir",
]

__getattr__ = _lazy.exports(
    __name__,
    {
        "USERNS_BASE": "task",
        "ExitReason": "task",
        "Limits": "spec",
        "Mount": "spec",
        "Sandbox": "spec",
        "SpecError": "spec",
        "Result": "task",
        "Stats": "task",
        "Task": "task",
        "spawn": "task",
        "use_data_dir": "task",
        "format_size": "units",
        "parse_duration": "units",
        "parse_size": "units",
    },
)
