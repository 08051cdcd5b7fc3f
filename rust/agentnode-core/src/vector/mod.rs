//! Vector collections: an HNSW index (the `usearch` crate, pinned at 2.26.6, which carries the
//! fix of usearch PR #704 for indexes held inside a `Box`/`Arc`/struct) behind a checked layer.
//!
//! usearch is safe for concurrent `add` and `search` from many threads, but `reserve`, `save`
//! and `load` must run alone, and `add` past the reserved capacity fails. [`Collection`] keeps
//! the index behind an `RwLock`: adds and searches share it, growth and saving take it alone.
//! Upserts of one key are serialised by a striped lock so two writers never race
//! remove-then-add on the same key. Labels (tenant, namespace, task, payload) live next to
//! the index, with a key set per label value, so a filtered search knows how selective its
//! filter is and picks a plan to match (see [`Collection::search`]).
//!
//! Search speed is usearch's own: measured at equal ef and equal recall, a batch through this layer
//! runs at raw usearch's rate, and in f32 both at about half hnswlib's. perf puts half the time in
//! the distance call and an eighth in usearch's per-candidate free-slot check (a node header load);
//! both are memory stalls, not arithmetic. Two patches were measured (30k x 384-d) and gained
//! nothing, so neither is here: an f32-accumulating AVX2 metric in place of the f64-widening one of
//! `numkong` (installed through `Index::change_metric`), and prefetching neighbours' vectors in
//! search. What does pay is reading less per comparison: the `i8+f32` dtype ([`Dtype::I8F32`])
//! walks an i8 graph (on its own scale, see [`quantise::i8_scale`]) and re-ranks its candidates
//! exactly, 1.07-1.2x hnswlib's queries per second at equal recall on one thread on the bench's data.

mod collection;
mod contexts;
mod file;
mod labels;
mod options;
mod originals;
mod planner;
mod quantise;
mod search;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::RwLock;

pub use collection::Collection;
pub use labels::Label;
pub use options::{Dtype, Metric, Options};

/// Everything that can go wrong in a collection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vector has {got} dimensions but the collection expects {want} (send vectors of length {want})")]
    Dimension { got: usize, want: usize },
    #[error("key {0} is reserved by the index (use a key below 2^64-1)")]
    ReservedKey(u64),
    #[error("vector for key {0} has a NaN or infinite value (send finite numbers)")]
    NotFinite(u64),
    #[error("dims must be between 1 and {max}, got {0} (pick the embedding model's dimension)", max = MAX_DIMS)]
    BadDims(usize),
    #[error("unknown metric {0:?} (use cos, l2 or ip)")]
    BadMetric(String),
    #[error("unknown dtype {0:?} (use f32, f16, i8 or i8+f32)")]
    BadDtype(String),
    #[error("dtype i8+f32 needs metric cos, not {0:?} (its i8 graph holds vectors scaled to unit length)")]
    RescoreMetric(&'static str),
    #[error("{0} is all zeros (or its length is beyond f32's range), so it has no direction for the cos metric (send a non-zero vector of moderate scale)")]
    ZeroVector(String),
    #[error("batch has {keys} keys, {vectors} vectors and {labels} labels (send one vector and one label per key)")]
    BatchShape {
        keys: usize,
        vectors: usize,
        labels: usize,
    },
    #[error("k and expansion_search must be at least 1 (ask for one or more neighbours)")]
    ZeroK,
    #[error("usearch failed to {op}: {msg}")]
    Index { op: &'static str, msg: String },
    #[error("index file {path} is corrupt: {why} (remove it; the store rebuilds it from RocksDB)")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "cannot {op} {path}: {source} (check the data directory's permissions and free space)"
    )]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Largest accepted dimension; far above any embedding model, low enough to catch a mistake.
pub const MAX_DIMS: usize = 65_536;

/// Which keys a search may return; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub namespace: Option<String>,
    pub task: Option<String>,
    pub keys: Option<HashSet<u64>>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.tenant.is_none()
            && self.namespace.is_none()
            && self.task.is_none()
            && self.keys.is_none()
    }
}

/// One search hit: the key and its distance under the collection's metric (smaller is closer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub key: u64,
    pub distance: f32,
}

/// Maps a usearch failure during `op` to [`Error::Index`].
fn index_err<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Index {
        op,
        msg: e.to_string(),
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding the lock leaves usearch's state as consistent as usearch left it;
    // poisoning would only turn one failure into permanent ones.
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
