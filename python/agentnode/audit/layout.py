"""Where the audit log's files are and how its chain starts: shared by the writer and by
`agentnode audit verify`, which must not load the writer's RocksDB and asyncio to check a file."""

from __future__ import annotations

from pathlib import Path

__all__ = ["GENESIS", "LIVE", "segments"]

#: The `prev` of record 1.
GENESIS = "0" * 64
#: The live file's name in the log directory; rotated files are `audit-<first seq>.log`.
LIVE = "audit.log"


def segments(directory: Path) -> list[Path]:
    """The log's files in chain order: rotated ones by first seq, then the live one."""
    rotated = sorted(directory.glob("audit-*.log"))
    live = directory / LIVE
    return rotated + ([live] if live.exists() else [])
