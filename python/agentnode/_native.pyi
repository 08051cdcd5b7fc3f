# Hand-written stubs for the Rust extension (rust/agentnode-py); checked by mypy.stubtest.

from typing import final

__all__ = ["EgressHandle", "__version__", "cgroup_hierarchy", "doctor", "noop"]

__version__: str

def noop() -> None:
    """Does nothing: the benchmark harness measures the cost of one call into the extension."""

def doctor() -> str:
    """Runs every doctor probe and returns the report as JSON (docs/doctor.schema.json)."""

def cgroup_hierarchy() -> str:
    """This process's cgroup layout and directories, as JSON."""

# --- egress (agentnode.egress) ---

_Ports = list[tuple[int, int, int]]
_Rule = tuple[bytes, int, _Ports]

@final
class EgressHandle:
    """Egress enforcement attached to one cgroup2 directory; `close()` detaches it."""

    def __new__(
        cls,
        cgroup_dir: str,
        rules_: list[_Rule],
        *,
        rate_bps: int = 0,
        conn_per_sec: int = 0,
        dns_v4: bytes | None = None,
        dns_v6: bytes | None = None,
        dns_port: int = 0,
    ) -> EgressHandle: ...
    def set_rules(self, rules_: list[_Rule]) -> None:
        """Replaces the CIDR rules (live map update)."""
    def set_limits(self, *, rate_bps: int, conn_per_sec: int) -> None:
        """Replaces the rate limits (0: unlimited)."""
    def allow_exact(self, addr: bytes, ports_: _Ports, ttl: float) -> None:
        """Allows one address (16 bytes) on `ports` for `ttl` seconds."""
    def expire_exact(self) -> int:
        """Removes expired exact-IP entries; returns how many."""
    def clear_exact(self) -> int:
        """Forgets every DNS-learned address; returns how many."""
    def rule_entries(self) -> int:
        """The number of CIDR entries in the kernel trie."""
    def counters(self) -> dict[str, int]:
        """Counters summed over CPUs, as a dict of ints."""
    def denials(self) -> list[tuple[int, int, bytes, int, int, str, int]]:
        """Denials queued since the last call: (time_ns, cgroup_id, addr16, port, proto, reason, pid)."""
    def events_fd(self) -> int:
        """A file descriptor that polls readable when denials are queued."""
    def close(self) -> None:
        """Detaches every program and frees the maps; idempotent."""
    @property
    def closed(self) -> bool:
        """Whether `close()` has run."""
