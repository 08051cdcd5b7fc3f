"""The exceptions agentnode raises. Rust errors map onto these classes (see `rust/agentnode-py`).

Every message says what went wrong and what to do about it, so the CLI can print it as one line.
"""

__all__ = [
    "AgentnodeError",
    "AuditError",
    "AuthError",
    "CgroupError",
    "CollectionExistsError",
    "ConfigError",
    "DiskFullError",
    "EgressError",
    "MemoryKeyError",
    "NodeUnreachable",
    "NotFoundError",
    "PolicyError",
    "QueueFullError",
    "QuotaExceededError",
    "SandboxError",
    "SchedulerError",
    "StorageError",
    "StoreFullError",
    "StoreWriteError",
    "TaskEndedError",
    "TaskError",
    "UnknownCollectionError",
    "UsageError",
    "ValueTooLargeError",
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


class SchedulerError(AgentnodeError):
    """A scheduler call was invalid: unknown class, duplicate or unknown task id, bad weight."""


class TaskError(AgentnodeError):
    """A task operation was invalid: illegal state transition, bad spec, unknown task, bad token."""


class NodeUnreachable(TaskError):
    """The node's API or MCP endpoint could not be reached: the node may be restarting (its
    tasks run on), so a call with an idempotency key may be sent again."""


class QueueFullError(TaskError):
    """A tenant's queue is at its cap; the daemon answers 429. Retry later or raise the cap."""


class DiskFullError(TaskError):
    """The task store cannot write for want of disk space; the daemon answers 507 and resumes by
    itself once space is freed."""


class StorageError(AgentnodeError):
    """Agent memory (episodic records, objects, vectors) could not be read or written."""

    #: The HTTP status the memory API answers with when this error reaches a request.
    status = 400


class StoreWriteError(StorageError):
    """One of the node's databases could not be written (see the message for which and why)."""

    status = 500


class StoreFullError(StoreWriteError):
    """A database's disk is full; its writes resume by themselves once space is freed."""

    status = 507


class MemoryKeyError(StorageError):
    """A tenant, namespace, task, record id or object name is malformed."""


class ValueTooLargeError(StorageError):
    """A record value or request body is larger than the configured limit."""

    status = 413


class NotFoundError(StorageError):
    """The record, object or reference does not exist (or has expired)."""

    status = 404


class QuotaExceededError(StorageError):
    """A tenant's object-store quota would be exceeded; nothing was written."""

    status = 413


class TaskEndedError(StorageError):
    """The task has ended: its records are expiring and it takes no new ones."""

    status = 409


class AuthError(StorageError):
    """The credential is missing, unknown, or not allowed to reach this data."""

    status = 401


class VectorError(StorageError):
    """A vector collection rejected input (dimension, key, value, name) or failed to persist."""


class UnknownCollectionError(VectorError):
    """No vector collection has the requested name."""

    status = 404


class CollectionExistsError(VectorError):
    """A vector collection of that name already exists (over HTTP: with another configuration)."""

    status = 409


class AuditError(AgentnodeError):
    """The audit log cannot be written, or a record or the chain is invalid."""
