"""Parsing of what users type for sizes and durations (`512M`, `2G`, `30s`, `500ms`)."""

from __future__ import annotations

import re

from agentnode.errors import UsageError

__all__ = ["format_size", "parse_duration", "parse_size"]

# Compiled on first use (re's cache), not at import: a command given no size or duration
# (`agentnode exec -- CMD`) pays no compile.
_SIZE = r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)"
_DURATION = r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?"
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TIME_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Far beyond any real limit, and within what cgroup files, the kernel's timers and the task
# records' integers hold: larger values are typing mistakes, refused before they reach them.
_MAX_SIZE = 1 << 50
_MAX_DURATION = 100 * 365 * 86400.0


def parse_size(text: str, *, option: str, least: int = 1) -> int:
    """Bytes in `text` (`512M`, `2G`, `1.5GiB`, `4096`; units are powers of 1024), at least
    `least` (0 for a size where zero means none, such as swap)."""
    m = re.fullmatch(_SIZE, text.strip(), re.IGNORECASE)
    if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise UsageError(f"{option}: {text!r} is not a size (examples: 512M, 2G)")
    amount = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    value = int(min(amount, _MAX_SIZE + 1))  # int() of a float past 1e308 would overflow
    if value < least:
        raise UsageError(f"{option}: {text!r} must be more than zero bytes (examples: 512M, 2G)")
    if value > _MAX_SIZE:
        raise UsageError(f"{option}: {text!r} is too large (at most 1024T)")
    return value


def parse_duration(text: str, *, option: str) -> float:
    """Seconds in `text` (`30`, `30s`, `500ms`, `5m`, `1h`, `7d`)."""
    m = re.fullmatch(_DURATION, text.strip(), re.IGNORECASE)
    if m is None:
        raise UsageError(f"{option}: {text!r} is not a duration (examples: 30s, 500ms, 5m, 7d)")
    value = float(m.group(1)) * _TIME_UNITS[(m.group(2) or "s").lower()]
    if value <= 0:
        raise UsageError(f"{option}: {text!r} must be longer than zero (examples: 30s, 500ms)")
    if value > _MAX_DURATION:
        raise UsageError(f"{option}: {text!r} is too long (at most 876000h, 100 years)")
    return value


def format_size(n: int) -> str:
    """`n` bytes for people: `64.0MiB`."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{n}B"
        size /= 1024
    return f"{size:.1f}GiB"
