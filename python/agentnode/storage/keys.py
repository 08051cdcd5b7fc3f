"""Validation of the names that become storage keys: tenants, namespaces, tasks, ids, objects.

Names are joined with NUL into RocksDB keys, so a name may never contain NUL or anything that
would let one tenant's prefix reach into another's; the allowed alphabet is small on purpose.
"""

from __future__ import annotations

import re

from agentnode.errors import MemoryKeyError

__all__ = ["NAMESPACE_SEPARATOR", "check_id", "check_name", "check_namespace"]

#: Separates the levels of a hierarchical namespace ("users:alice:notes").
NAMESPACE_SEPARATOR = ":"

_NAME = re.compile(r"[A-Za-z0-9._@+=-]{1,128}")
_NAMESPACE = re.compile(r"[A-Za-z0-9._@+=-]{1,128}(:[A-Za-z0-9._@+=-]{1,128}){0,15}")
_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,256}")


def check_name(kind: str, value: object) -> str:
    """Returns `value` if it is a valid tenant, task or object name, else raises MemoryKeyError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise MemoryKeyError(
            f"invalid {kind} {value!r} (use 1-128 characters from A-Z a-z 0-9 . _ @ + = -)"
        )
    return value


def check_namespace(value: object) -> str:
    """Returns `value` if it is a valid namespace (up to 16 names joined by ':')."""
    if not isinstance(value, str) or not _NAMESPACE.fullmatch(value):
        raise MemoryKeyError(
            f"invalid namespace {value!r} (use up to 16 names of A-Z a-z 0-9 . _ @ + = - "
            "joined by ':')"
        )
    return value


def check_id(value: object) -> str:
    """Returns `value` if it is a valid record id."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise MemoryKeyError(
            f"invalid record id {value!r} (use 1-256 characters from A-Z a-z 0-9 . _ : @ + = -)"
        )
    return value
