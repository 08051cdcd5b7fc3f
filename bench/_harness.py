"""The shared benchmark runner: ours and a peer in the same run, interleaved, repeated.

Each figure prints one line, `name: ours X unit, peer Y unit (peer name), ratio Z`, and
`Bench.save()` writes them all to `bench/results/<bench>.json` (git-ignored). Benchmarks report;
they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Bench", "Figure", "percentile"]

RESULTS = Path(__file__).parent / "results"


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Figure:
    name: str
    ours: float
    peer: float
    unit: str
    peer_name: str
    higher_is_better: bool
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.ours / self.peer if self.peer else float("inf")

    def line(self) -> str:
        better = "higher" if self.higher_is_better else "lower"
        return (
            f"{self.name}: ours {self.ours:.4g} {self.unit}, peer {self.peer:.4g} {self.unit} "
            f"({self.peer_name}), ratio {self.ratio:.3g} ({better} is better)"
        )


class Bench:
    """One benchmark script's figures. Create with `Bench.from_args("name")`."""

    def __init__(self, name: str, *, quick: bool, only: str | None = None) -> None:
        self.name = name
        self.quick = quick
        #: The one part to run (`--only`), None: all of them.
        self.only = only
        self.figures: list[Figure] = []

    @classmethod
    def from_args(
        cls, name: str, argv: list[str] | None = None, *, parts: tuple[str, ...] = ()
    ) -> Bench:
        """Parses `--quick` and, for a bench in `parts`, `--only PART`."""
        parser = argparse.ArgumentParser(description=f"agentnode benchmark: {name}")
        parser.add_argument("--quick", action="store_true", help="fewer repeats (CI)")
        if parts:
            parser.add_argument("--only", choices=parts, help="run this part alone")
        args = parser.parse_args(argv)
        return cls(name, quick=args.quick, only=getattr(args, "only", None))

    def runs(self, part: str) -> bool:
        """Whether `part` runs (no `--only`, or `--only part`)."""
        return self.only in (None, part)

    def record(
        self,
        figure: str,
        ours: float,
        peer: float,
        unit: str,
        *,
        peer_name: str,
        higher_is_better: bool = False,
    ) -> Figure:
        """Records and prints one figure measured elsewhere in the same run."""
        f = Figure(f"{self.name}.{figure}", ours, peer, unit, peer_name, higher_is_better)
        self.figures.append(f)
        print(f.line(), flush=True)
        return f

    def compare_calls(
        self,
        figure: str,
        ours: Callable[[], object],
        peer: Callable[[], object],
        *,
        peer_name: str,
        number: int,
        rounds: int,
    ) -> Figure:
        """Median time per call of `ours` and `peer`, in rounds that alternate which goes first."""
        if self.quick:
            rounds = max(3, rounds // 4)
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        for r in range(rounds):
            pair = [("ours", ours), ("peer", peer)]
            for key, fn in pair if r % 2 == 0 else reversed(pair):
                t0 = time.perf_counter_ns()
                for _ in range(number):
                    fn()
                times[key].append((time.perf_counter_ns() - t0) / number)
        return self.record(
            figure,
            statistics.median(times["ours"]),
            statistics.median(times["peer"]),
            "ns/call",
            peer_name=peer_name,
        )

    def save(self) -> Path:
        """Writes the figures to bench/results/<name>.json and returns the path."""
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        path.write_text(
            json.dumps(
                {
                    "bench": self.name,
                    "quick": self.quick,
                    "time": time.time(),
                    "host": {"cpus": os.cpu_count(), "kernel": platform.release()},
                    "figures": [asdict(f) for f in self.figures],
                },
                indent=2,
            )
        )
        return path
