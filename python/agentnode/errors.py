"""The exceptions agentnode raises. Rust errors map onto these classes (see `rust/agentnode-py`).

Every message says what went wrong and what to do about it, so the CLI can print it as one line.
"""

__all__ = [
    "AgentnodeError",
    "CgroupError",
    "ConfigError",
    "EgressError",
    "PolicyError",
    "QueueFullError",
    "SandboxError",
    "SchedulerError",
    "TaskError",
    "UsageError",
]


class AgentnodeError(Exception):
    """Base class of every error agentnode raises on purpose."""


class UsageError(AgentnodeError):
    """A command-line or API argument is malformed (the CLI exits 2)."""


class ConfigError(AgentnodeError):
    """The configuration is invalid; the message names the key and where it was set."""


class CgroupError(AgentnodeError):
    """A cgroup could not be read, created, limited or removed."""


class SandboxError(AgentnodeError):
    """A task's isolated environment (namespaces, mounts, seccomp) could not be set up."""


class EgressError(AgentnodeError):
    """Egress enforcement (BPF programs, maps, task networking) failed."""


class PolicyError(AgentnodeError):
    """An egress or resource policy is invalid."""


class SchedulerError(AgentnodeError):
    """A scheduler call was invalid: unknown class, duplicate or unknown task id, bad weight."""


class TaskError(AgentnodeError):
    """A task operation was invalid: illegal state transition, bad spec, unknown task, bad token."""


class QueueFullError(TaskError):
    """A tenant's queue is at its cap; the daemon answers 429. Retry later or raise the cap."""
