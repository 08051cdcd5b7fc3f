"""Layer 5's record of what tasks did: the hash-chained audit log, its verifier, exec tracing
and the per-task timeline built from them (see docs/audit.md)."""

from typing import TYPE_CHECKING

from agentnode import _lazy

if TYPE_CHECKING:
    from agentnode.audit.chain import Verified, verify
    from agentnode.audit.log import AuditLog

__all__ = ["AuditLog", "Verified", "verify"]

__getattr__ = _lazy.exports(__name__, {"AuditLog": "log", "Verified": "chain", "verify": "chain"})
