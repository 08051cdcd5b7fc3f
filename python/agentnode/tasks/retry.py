"""When and how soon a task that ended badly runs again."""

from __future__ import annotations

import random
from dataclasses import dataclass

from agentnode.errors import TaskError
from agentnode.tasks.model import State

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Up to `max_attempts` runs; the delay before attempt n+1 is `base_s * 2**(n-1)`, capped at
    `max_s`, then scaled by a random factor in [1 - jitter, 1] so retries do not stampede."""

    max_attempts: int = 3
    base_s: float = 1.0
    max_s: float = 300.0
    jitter: float = 0.5
    retry_on: frozenset[State] = frozenset({State.FAILED, State.TIMED_OUT, State.LOST})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise TaskError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_s < 0 or self.max_s < self.base_s:
            raise TaskError("retry delays need 0 <= base_s <= max_s")
        if not 0 <= self.jitter <= 1:
            raise TaskError(f"jitter must be within 0..1, got {self.jitter}")
        if bad := self.retry_on - {State.FAILED, State.TIMED_OUT, State.LOST}:
            raise TaskError(f"only failed, timed_out and lost can retry, not {sorted(bad)}")

    def should_retry(self, outcome: State, attempt: int, retries: int | None = None) -> bool:
        """Whether a task whose attempt `attempt` ended in `outcome` runs again; `retries`, the
        task's own number of retries, overrides `max_attempts`."""
        limit = self.max_attempts if retries is None else retries + 1
        return outcome in self.retry_on and attempt < limit

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt `attempt` (1-based) before the next one."""
        raw = min(self.max_s, self.base_s * 2.0 ** (attempt - 1))
        u: float = rng.random() if rng else random.random()
        return raw * (1 - self.jitter * u)
