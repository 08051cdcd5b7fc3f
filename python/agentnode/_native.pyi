# Hand-written stubs for the Rust extension (rust/agentnode-py); checked by mypy.stubtest.

__all__ = ["__version__", "cgroup_hierarchy", "doctor", "noop"]

__version__: str

def noop() -> None:
    """Does nothing: the benchmark harness measures the cost of one call into the extension."""

def doctor() -> str:
    """Runs every doctor probe and returns the report as JSON (docs/doctor.schema.json)."""

def cgroup_hierarchy() -> str:
    """This process's cgroup layout and directories, as JSON."""
