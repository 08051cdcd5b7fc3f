"""Layer 5's record of what tasks did: the hash-chained audit log, its verifier, exec tracing
and the per-task timeline built from them (see docs/audit.md)."""

from agentnode.audit.log import AuditLog
from agentnode.audit.verify import Verified, verify

__all__ = ["AuditLog", "Verified", "verify"]
