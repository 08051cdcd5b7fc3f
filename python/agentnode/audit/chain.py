"""`verify`: checks an audit log's hash chain and names the first record that breaks it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from agentnode.audit.layout import GENESIS, segments
from agentnode.errors import AuditError

__all__ = ["Verified", "verify"]

# `,"hash":"` + 64 hex digits + `"}`
_HASH_TAIL = 75


@dataclass(frozen=True, slots=True)
class Verified:
    """An intact chain: how many records in how many files, and the last record's hash."""

    records: int
    files: int
    first_seq: int
    last_seq: int
    head: str


def verify(path: Path) -> Verified:
    """Checks the log at `path` (a log directory: every file in chain order; or one file, whose
    first record's link to an earlier file is taken on trust). Raises AuditError naming the
    first broken record: altered, missing, out of order, or no longer linked to its predecessor.
    """
    if path.is_dir():
        files = segments(path)
        if not files:
            raise AuditError(f"{path} holds no audit log (expected audit.log or audit-*.log)")
    elif path.is_file():
        files = [path]
    else:
        raise AuditError(f"{path} does not exist (give an audit log file or directory)")
    expected_seq: int | None = None
    prev: str | None = None
    first = count = 0
    for file in files:
        lines = file.read_text(encoding="utf-8").split("\n")
        if lines[-1] != "":
            raise AuditError(f"{file}: the last line is incomplete (a torn or truncated write)")
        lines.pop()
        for n, line in enumerate(lines, 1):
            seq, line_prev, digest = _check_line(file, n, line)
            if expected_seq is None:
                expected_seq, first = seq, seq
                if seq == 1 and line_prev != GENESIS:
                    raise AuditError(
                        f"{file}:{n}: record 1 does not start the chain (its prev hash is not all zeros)"
                    )
            if seq != expected_seq:
                raise AuditError(_misplaced(file, n, lines, seq, expected_seq))
            if prev is not None and line_prev != prev:
                raise AuditError(
                    f"{file}:{n}: record {seq - 1} was rewritten: record {seq} does not chain "
                    "to it (its prev hash differs)"
                )
            prev, expected_seq = digest, seq + 1
            count += 1
    if prev is None or expected_seq is None:
        raise AuditError(f"{path} holds no audit records (an empty log: nothing to verify)")
    return Verified(count, len(files), first, expected_seq - 1, prev)


def _check_line(file: Path, n: int, line: str) -> tuple[int, str, str]:
    """The record's seq, prev and hash, after checking that the hash matches the record."""
    where = f"{file}:{n}"
    try:
        record = json.loads(line)
        seq, prev, digest = record["seq"], record["prev"], record["hash"]
    except (ValueError, KeyError, TypeError):
        raise AuditError(f"{where}: not an audit record (damaged JSON or chain fields)") from None
    if not isinstance(seq, int) or not line.endswith(f',"hash":"{digest}"}}'):
        raise AuditError(f"{where}: record {seq} was altered (its chain fields are malformed)")
    if hashlib.sha256((line[:-_HASH_TAIL] + "}").encode()).hexdigest() != digest:
        raise AuditError(f"{where}: record {seq} was altered (its hash does not match it)")
    return seq, str(prev), str(digest)


def _misplaced(file: Path, n: int, lines: list[str], seq: int, expected: int) -> str:
    """Why `seq` stands where `expected` should: moved, missing or repeated."""
    needle = f'"seq":{expected},"prev":'
    for m, other in enumerate(lines, 1):
        if m != n and needle in other:
            return (
                f"{file}:{n}: record {expected} is out of order (it is at line {m}; "
                f"line {n} holds record {seq})"
            )
    if seq > expected:
        return f"{file}:{n}: record {expected} is missing (line {n} holds record {seq})"
    return f"{file}:{n}: record {seq} is repeated or out of order (expected record {expected})"
