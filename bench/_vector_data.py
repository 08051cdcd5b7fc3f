"""Seeded clustered vectors shared by bench/vector.py and tests/test_vectors.py."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["bench_data", "brute_force", "clustered", "recall"]


def clustered(
    n: int, dims: int, *, seed: int, clusters: int = 100, spread: float = 0.35
) -> npt.NDArray[np.float32]:
    """`n` unit vectors around `clusters` random centres (embeddings cluster by topic)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dims), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, clusters, n)]
    points += rng.standard_normal((n, dims), dtype=np.float32) * (spread / np.sqrt(dims))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return np.ascontiguousarray(points, dtype=np.float32)


def brute_force(
    data: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> npt.NDArray[np.int64]:
    """Exact top-k row indices by cosine (the vectors are unit length), in chunks."""
    out = []
    for start in range(0, len(queries), 256):
        sims = queries[start : start + 256] @ data.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        out.append(top)
    return np.concatenate(out)


def recall(found: list[list[int]], truth: npt.NDArray[np.int64]) -> float:
    """Mean fraction of the true top-k present in each found list."""
    k = truth.shape[1]
    hits = sum(len(set(f) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return float(hits / (k * len(found)))


def bench_data(
    n: int, dims: int, nq: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The benchmark's data set and queries: 1000 broad clusters; each query is a data point
    nudged by noise (retrieval asks about things near what is stored)."""
    data = clustered(n, dims, seed=42, clusters=1000, spread=0.8)
    rng = np.random.default_rng(7)
    noise = clustered(nq, dims, seed=43, clusters=1000, spread=0.8)
    queries = data[rng.integers(0, n, nq)] + noise * 0.1
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return data, np.ascontiguousarray(queries, dtype=np.float32)
