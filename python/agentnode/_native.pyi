# Hand-written stubs for the Rust extension (rust/agentnode-py); checked by mypy.stubtest.

from typing import final

__all__ = ["Scheduler", "__version__", "cgroup_hierarchy", "doctor", "noop"]

__version__: str

def noop() -> None:
    """Does nothing: the benchmark harness measures the cost of one call into the extension."""

def doctor() -> str:
    """Runs every doctor probe and returns the report as JSON (docs/doctor.schema.json)."""

def cgroup_hierarchy() -> str:
    """This process's cgroup layout and directories, as JSON."""

# --- scheduler (rust/agentnode-py/src/sched.rs) ---

@final
class Scheduler:
    """Priority classes, weighted fair share between tenants, limits, aging, capacity admission.

    Classes: critical, high, normal, low, batch. Limits of 0 mean unlimited; `aging` is the
    number of pops served by higher classes after which a waiting lower class goes next (0: off).
    """

    def __new__(
        cls,
        *,
        tenant_limit: int = 0,
        class_limits: dict[str, int] | None = None,
        aging: int = 0,
    ) -> Scheduler: ...
    def set_tenant(self, tenant: str, *, weight: int = 1, limit: int | None = None) -> None:
        """Sets a tenant's fair-share weight and optionally its own running limit."""
    def push(self, id: int, tenant: str, cls: str, cpu: int = 0, mem: int = 0) -> None:
        """Queues one task requesting `cpu` millicores and `mem` bytes."""
    def push_many(self, tasks: list[tuple[int, str, str, int, int]]) -> None:
        """Queues (id, tenant, class, cpu, mem) tuples, all or none."""
    def pop(self, free_cpu: int, free_mem: int) -> int | None:
        """The id of the next task that fits the free capacity, or None."""
    def pop_many(self, n: int, free_cpu: int, free_mem: int) -> list[int]:
        """Up to n ids, deducting each task's requests from the free capacity."""
    def cancel(self, id: int) -> None:
        """Removes a queued task."""
    def complete(self, id: int) -> None:
        """Frees a running task's concurrency slots."""
    def complete_many(self, ids: list[int]) -> None:
        """`complete` for several ids."""
    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...
