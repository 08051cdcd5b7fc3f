"""The cost of one call into agentnode._native (a no-op) against a no-op Python function.

This proves the harness and bounds the fixed overhead every Rust hot path pays per call.
"""

from __future__ import annotations

from _harness import Bench
from agentnode import _native


def python_noop() -> None:
    pass


def main() -> None:
    bench = Bench.from_args("native_call")
    bench.compare_calls(
        "noop",
        _native.noop,
        python_noop,
        peer_name="python no-op function",
        number=200_000,
        rounds=20,
    )
    bench.save()


if __name__ == "__main__":
    main()
