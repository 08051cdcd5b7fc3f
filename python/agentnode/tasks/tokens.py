"""Per-task bearer tokens: a task proves who it is (to its checkpoint, heartbeat and memory) with one.

A token is `<task id>.<attempt>.<HMAC-SHA256 of both under the node's key>`, so a retried
attempt gets a new token, the previous attempt's token stops working, and nothing per task needs
storing: the daemon re-derives any token after a restart. Comparison is constant-time.

A running task shows its token at every request of every door (memory socket, task API, proxy),
so the key remembers the last few thousand tokens it found genuine: what a token names never
changes, and whether that attempt still runs is its caller's check, made every time
(`TaskManager.task_of_token`). Only genuine tokens are remembered, and a lookup finds one only
for that same string (a different one reaches a string comparison only if its 64-bit hash
equals a remembered token's), so the memory tells nothing to someone who does not hold the
token already.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["TokenKey"]

#: How many genuine tokens a key remembers (then it forgets them all and starts again).
_REMEMBERED = 4096


class TokenKey:
    """The node's secret for issuing and checking task tokens."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        # Tokens verified genuine -> what they name: one HMAC per token, not per request.
        self._genuine: dict[str, tuple[str, int]] = {}

    @classmethod
    def load(cls, path: Path) -> TokenKey:
        """The key at `path`, created (mode 0600, fsynced) on first use and kept across restarts."""
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another opener won the race: use its key
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return cls(key)

    def issue(self, task_id: str, attempt: int) -> str:
        """The token of `task_id`'s attempt number `attempt`."""
        mac = hmac.new(self._key, f"{task_id}.{attempt}".encode(), hashlib.sha256)
        return f"{task_id}.{attempt}.{mac.hexdigest()}"

    def verify(self, token: str) -> tuple[str, int] | None:
        """(task id, attempt) if `token` is genuine, else None."""
        known = self._genuine.get(token)
        if known is not None:
            return known
        task_id, _, rest = token.partition(".")
        attempt, _, _ = rest.partition(".")
        # ASCII digits only (int() takes '²' and other scripts' digits too), and few of them.
        if not (attempt.isascii() and attempt.isdigit() and len(attempt) <= 9):
            return None
        # A header's bytes that are not UTF-8 arrive as lone surrogates: compared as bytes.
        given = token.encode(errors="surrogateescape")
        if not hmac.compare_digest(self.issue(task_id, int(attempt)).encode(), given):
            return None
        if len(self._genuine) >= _REMEMBERED:
            self._genuine.clear()  # not one by one: callers on other threads share the dict
        found = self._genuine[token] = (task_id, int(attempt))
        return found
