"""The exceptions agentnode raises. Rust errors map onto these classes (see `rust/agentnode-py`).

Every message says what went wrong and what to do about it, so the CLI can print it as one line.
"""

__all__ = [
    "AgentnodeError",
    "CgroupError",
    "ConfigError",
    "EgressError",
    "PolicyError",
    "SandboxError",
    "UnknownCollectionError",
    "UsageError",
    "VectorError",
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


class VectorError(AgentnodeError):
    """A vector collection rejected input (dimension, key, value, name) or failed to persist."""


class UnknownCollectionError(VectorError):
    """No vector collection has the requested name."""
