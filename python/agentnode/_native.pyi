# Hand-written stubs for the Rust extension (rust/agentnode-py); checked by mypy.stubtest.

from collections.abc import Iterable
from os import PathLike
from typing import final

from typing_extensions import Buffer

__all__ = ["VectorCollection", "__version__", "cgroup_hierarchy", "doctor", "noop"]

__version__: str

def noop() -> None:
    """Does nothing: the benchmark harness measures the cost of one call into the extension."""

def doctor() -> str:
    """Runs every doctor probe and returns the report as JSON (docs/doctor.schema.json)."""

def cgroup_hierarchy() -> str:
    """This process's cgroup layout and directories, as JSON."""

# -- vector (rust/agentnode-py/src/vector.rs) -------------------------------------------------

@final
class VectorCollection:
    """An HNSW vector collection with per-key labels (tenant, namespace, task, payload)."""

    def __new__(
        cls,
        dims: int,
        *,
        metric: str = "cos",
        dtype: str = "f32",
        connectivity: int = 0,
        expansion_add: int = 0,
        expansion_search: int = 0,
    ) -> VectorCollection: ...
    @staticmethod
    def load(
        path: str | PathLike[str],
        dims: int,
        *,
        metric: str = "cos",
        dtype: str = "f32",
        connectivity: int = 0,
        expansion_add: int = 0,
        expansion_search: int = 0,
    ) -> VectorCollection:
        """Loads a file written by `save`; raises VectorError if it is missing, corrupt or of
        another shape."""
    @property
    def dims(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def memory_usage(self) -> int: ...
    @property
    def expansion_search(self) -> int: ...
    def set_expansion_search(self, ef: int) -> None:
        """Changes the search-time candidate list size (`ef`) for later searches."""
    def __len__(self) -> int: ...
    def __contains__(self, key: int, /) -> bool: ...
    def label(self, key: int) -> tuple[str, str, str, bytes] | None:
        """`(tenant, namespace, task, payload)` of `key`, or None."""
    def upsert(
        self,
        key: int,
        vector: Buffer,
        *,
        tenant: str,
        namespace: str,
        task: str,
        payload: bytes = ...,
    ) -> None: ...
    def upsert_batch(
        self,
        keys: Iterable[int],
        vectors: Buffer,
        labels: Iterable[tuple[str, str, str, bytes]],
        *,
        threads: int = 2,
    ) -> None:
        """`vectors` holds `len(keys) * dims` float32 values; `labels` one
        `(tenant, namespace, task, payload)` per key."""
    def check_batch(self, keys: Iterable[int], vectors: Buffer) -> None:
        """Raises VectorError unless every key is usable and `vectors` holds `len(keys) * dims`
        finite float32 values; writes nothing."""
    def delete(self, key: int) -> bool: ...
    def search(
        self,
        query: Buffer,
        k: int,
        *,
        tenant: str | None = None,
        namespace: str | None = None,
        task: str | None = None,
        keys: set[int] | None = None,
    ) -> list[tuple[int, float]]:
        """The `k` nearest `(key, distance)` pairs passing the filter, closest first."""
    def search_batch(
        self,
        queries: Buffer,
        k: int,
        *,
        tenant: str | None = None,
        namespace: str | None = None,
        task: str | None = None,
        keys: set[int] | None = None,
        threads: int = 2,
    ) -> list[list[tuple[int, float]]]:
        """One result list per query row of `queries` (`n * dims` float32 values)."""
    def save(self, path: str | PathLike[str]) -> None:
        """Writes the collection to `path` atomically (temp file, fsync, rename)."""
