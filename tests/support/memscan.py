"""Searching processes for a secret, for the tests that show one sandbox holds nothing of
another's call: from inside a sandbox (`SCAN_VISIBLE`, Python source a probe script runs
after defining its own `scan(blob, where)`) and from the host (`memory_holds`), with one
reading of a process's memory for both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["SCAN_VISIBLE", "memory_holds"]

#: `regions(pid)`: each readable mapping of process `pid`'s memory ("self": the caller's), as
#: bytes. Source text, so that a probe inside a sandbox runs the same code as the host.
_REGIONS = """
def regions(pid):
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vsyscall]" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            yield chunk
"""

#: Calls the probe's `scan(blob, where)` on every process's environment and command line the
#: probe can see, then on its own memory ("memory"). Needs `os` imported.
SCAN_VISIBLE = (
    _REGIONS
    + """
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for name in ("environ", "cmdline"):
        try:
            scan(open(f"/proc/{pid}/{name}", "rb").read(), f"/proc/{pid}/{name}")
        except OSError:
            pass
for chunk in regions("self"):
    scan(chunk, "memory")
"""
)

_namespace: dict[str, Any] = {}
exec(_REGIONS, _namespace)


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether `needle` is anywhere in process `pid`'s readable memory (read from the host)."""
    regions: Iterator[bytes] = _namespace["regions"](pid)
    return any(needle in chunk for chunk in regions)
