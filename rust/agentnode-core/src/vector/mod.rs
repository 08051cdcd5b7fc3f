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
//! walks an i8 graph (on its own scale, see [`i8_scale`]) and re-ranks its candidates exactly,
//! 1.07-1.2x hnswlib's queries per second at equal recall on one thread on the bench's data.

mod file;
mod labels;
mod originals;

use std::cell::Cell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

pub use labels::Label;
use labels::{Compiled, KeySet, Labels};
use originals::Originals;

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
/// The key usearch reserves to mark free slots.
const RESERVED_KEY: u64 = u64::MAX;
/// Capacity reserved for a new collection; it then doubles as needed.
const INITIAL_CAPACITY: usize = 1024;
/// Stripes of the per-key upsert lock; enough that unrelated keys rarely wait on each other.
const KEY_STRIPES: usize = 64;
/// Most queries a batch search hands a thread at a time (fewer in a small batch, so each thread
/// takes several blocks): small enough that threads finish together, large enough that taking
/// one is rare next to searching it.
const SEARCH_BLOCK: usize = 16;
/// usearch serves at most this many concurrent adds/searches (one scratch context each, a few
/// KiB); callers beyond it wait on [`Contexts`] instead of failing inside usearch.
const CONTEXTS: usize = 32;

/// A counting semaphore over usearch's per-thread contexts.
struct Contexts {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

struct ContextGuard<'a>(&'a Contexts);

impl Contexts {
    fn new() -> Self {
        Self {
            free: Mutex::new(CONTEXTS),
            freed: std::sync::Condvar::new(),
        }
    }

    fn acquire(&self) -> ContextGuard<'_> {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *free == 0 {
            free = self
                .freed
                .wait(free)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *free -= 1;
        ContextGuard(self)
    }
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        *self
            .0
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}

/// Distance between vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Cos,
    L2,
    Ip,
}

impl FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cos" => Ok(Self::Cos),
            "l2" => Ok(Self::L2),
            "ip" => Ok(Self::Ip),
            _ => Err(Error::BadMetric(s.to_owned())),
        }
    }
}

impl Metric {
    /// The distance usearch reports under this metric, for the exact plan's scan.
    fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Self::Ip => 1.0 - lanes(a, b, |x, y| x * y),
            Self::L2 => lanes(a, b, |x, y| (x - y) * (x - y)),
            Self::Cos => {
                let ab = lanes(a, b, |x, y| x * y);
                let norms = (lanes(a, a, |x, y| x * y) * lanes(b, b, |x, y| x * y)).sqrt();
                if norms > 0.0 {
                    1.0 - ab / norms
                } else {
                    1.0
                }
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Cos => "cos",
            Self::L2 => "l2",
            Self::Ip => "ip",
        }
    }

    fn kind(self) -> MetricKind {
        match self {
            Self::Cos => MetricKind::Cos,
            Self::L2 => MetricKind::L2sq,
            Self::Ip => MetricKind::IP,
        }
    }
}

/// The sum of `f(a[i], b[i])`, in eight independent partial sums so the compiler vectorises
/// it (floating-point addition is not associative, so one running sum would stay scalar).
fn lanes(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| f(*x, *y))
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += f(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// How the index stores each scalar; vectors always arrive as f32 and are quantised on add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    I8,
    /// The graph in i8 and an exact f32 copy of every vector beside it: a search walks the
    /// small graph and ranks all `ef` candidates it kept (usearch keeps `ef` whatever `k` is)
    /// by their exact distance. A quarter of the memory traffic per comparison of f32, so
    /// about twice the queries per second at equal recall, for a fifth more memory.
    /// Cos only: the graph holds unit vectors on an i8 scale fixed by the first vectors added
    /// (see [`i8_scale`]), so vectors are normalised.
    I8F32,
}

impl FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "i8" => Ok(Self::I8),
            "i8+f32" => Ok(Self::I8F32),
            _ => Err(Error::BadDtype(s.to_owned())),
        }
    }
}

impl Dtype {
    fn kind(self) -> ScalarKind {
        match self {
            Self::F32 => ScalarKind::F32,
            Self::F16 => ScalarKind::F16,
            Self::I8 | Self::I8F32 => ScalarKind::I8,
        }
    }
}

/// A collection's shape and HNSW parameters (0 = usearch's default).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub dims: usize,
    pub metric: Metric,
    pub dtype: Dtype,
    pub connectivity: usize,
    pub expansion_add: usize,
    pub expansion_search: usize,
}

impl Options {
    /// The graph's metric: an `i8+f32` graph holds unit vectors, on which inner product ranks
    /// as cos does and skips cos's two norms per comparison.
    fn graph_metric(&self) -> Result<MetricKind> {
        match (self.dtype, self.metric) {
            (Dtype::I8F32, Metric::Cos) => Ok(MetricKind::IP),
            (Dtype::I8F32, other) => Err(Error::RescoreMetric(other.name())),
            (_, metric) => Ok(metric.kind()),
        }
    }

    fn usearch(&self) -> Result<IndexOptions> {
        if self.dims == 0 || self.dims > MAX_DIMS {
            return Err(Error::BadDims(self.dims));
        }
        Ok(IndexOptions {
            dimensions: self.dims,
            metric: self.graph_metric()?,
            quantization: self.dtype.kind(),
            connectivity: self.connectivity,
            expansion_add: self.expansion_add,
            expansion_search: self.expansion_search,
            multi: false,
        })
    }
}

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

/// A vector collection: index plus per-key labels.
pub struct Collection {
    options: Options,
    index: RwLock<Index>,
    /// Slots claimed by adds in flight under the shared lock, so growth is decided before usearch
    /// would refuse an add.
    claimed: AtomicUsize,
    labels: RwLock<Labels>,
    /// The exact vectors, for an `i8+f32` collection only.
    originals: Option<RwLock<Originals>>,
    /// The scale of an `i8+f32` collection's graph, once a vector has been added (see
    /// [`i8_scale`]).
    scale: OnceLock<f32>,
    /// `ef`, the candidates an unfiltered search keeps. usearch's own setting is held at 1 and
    /// each search asks for `max(k, ef)` results instead (usearch walks with the larger of the
    /// two), so that a filtered search can walk with its own smaller `ef` (see [`filtered_ef`])
    /// while unfiltered ones run beside it: usearch 2.26's Rust API has no per-search `ef`.
    ef: AtomicUsize,
    stripes: Vec<Mutex<()>>,
    contexts: Contexts,
}

fn index_err<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Index {
        op,
        msg: e.to_string(),
    }
}

/// The caller's key set in the store's fast hash, built once per call rather than probed
/// through `SipHash` for every node visited.
fn rehash(filter: &Filter) -> Option<KeySet> {
    filter
        .keys
        .as_ref()
        .map(|keys| keys.iter().copied().collect())
}

/// The length of `vector`, if it has a direction to normalise to; `what` names it in the error.
fn norm(vector: &[f32], what: impl FnOnce() -> String) -> Result<f32> {
    let norm = lanes(vector, vector, |x, y| x * y).sqrt();
    // Zero has no direction; a norm that underflows or overflows f32 would divide into garbage.
    if norm.is_normal() {
        Ok(norm)
    } else {
        Err(Error::ZeroVector(what()))
    }
}

/// `vector` scaled to unit length, for an `i8+f32` collection.
fn unit(vector: &[f32], what: impl FnOnce() -> String) -> Result<Vec<f32>> {
    let norm = norm(vector, what)?;
    Ok(vector.iter().map(|x| x / norm).collect())
}

/// The least span of the i8 graph's range, in multiples of a unit vector's RMS component
/// (exactly `1/sqrt(dims)`). usearch's own cast spans 1.0, all a component can reach, which in
/// 384-d leaves a typical component about 6 of the 127 steps; spanning 8 RMS gives it 16, and
/// recall@10 at ef 12 on the bench's data went 0.91-0.92 -> 0.95-0.97 (6 RMS: 0.95-0.955).
const I8_SPAN_RMS: f32 = 8.0;
/// The span is also at least this many times the typical largest component of the first
/// vectors added. Embeddings of some models share a few dimensions of large magnitude, and a
/// graph whose vectors all saturate there loses most of its recall at low ef (0.93 -> 0.53 at
/// ef 12 in a test with four shared dimensions at 10 RMS), where the headroom keeps the gain.
const I8_HEADROOM: f32 = 1.5;

/// The i8 graph's scale (`+-127` over the span), fixed by the first vectors added, `rows` of
/// `dims` values each: from the median of their largest components relative to their length
/// (robust to one outlier in a batch), never coarser than usearch's cast (a scale of 127).
fn i8_scale<'a>(rows: impl Iterator<Item = &'a [f32]>, dims: usize) -> f32 {
    let mut peaks: Vec<f32> = rows
        .take(1024)
        .filter_map(|row| {
            let length = norm(row, String::new).ok()?;
            Some(row.iter().fold(0.0f32, |m, x| m.max(x.abs())) / length)
        })
        .collect();
    let peak = if peaks.is_empty() {
        0.0
    } else {
        let middle = peaks.len() / 2;
        *peaks.select_nth_unstable_by(middle, f32::total_cmp).1
    };
    #[allow(clippy::cast_precision_loss)] // dims <= MAX_DIMS = 2^16, exact in f32
    let rms = 1.0 / (dims as f32).sqrt();
    127.0 / (I8_SPAN_RMS * rms).max(I8_HEADROOM * peak).min(1.0)
}

/// The unit vector `unit` as the `i8+f32` graph holds it: times `scale`, rounded, saturated.
fn quantise(unit: &[f32], scale: f32) -> Vec<i8> {
    #[allow(clippy::cast_possible_truncation)] // clamped to i8's range first
    unit.iter()
        .map(|x| (x * scale).round().clamp(-127.0, 127.0) as i8)
        .collect()
}

/// A vector as the graph reads it: as given, or quantised for an `i8+f32` graph.
enum Graphed<'a> {
    F32(&'a [f32]),
    I8(Vec<i8>),
}

impl<'a> Graphed<'a> {
    /// `unit` is the normalised vector of an `i8+f32` collection, `None` for the others.
    fn new(vector: &'a [f32], unit: Option<&[f32]>, scale: f32) -> Self {
        unit.map_or(Self::F32(vector), |u| Self::I8(quantise(u, scale)))
    }

    fn add(&self, index: &Index, key: u64) -> Result<()> {
        match self {
            Self::F32(v) => index.add(key, v),
            Self::I8(v) => index.add(key, v),
        }
        .map_err(index_err("add a vector"))
    }

    fn search(&self, index: &Index, count: usize) -> Result<usearch::ffi::Matches> {
        match self {
            Self::F32(q) => index.search(q, count),
            Self::I8(q) => index.search(q, count),
        }
        .map_err(index_err("search"))
    }

    fn filtered_search(
        &self,
        index: &Index,
        count: usize,
        keep: &dyn Fn(u64) -> bool,
    ) -> Result<usearch::ffi::Matches> {
        match self {
            Self::F32(q) => index.filtered_search(q, count, keep),
            Self::I8(q) => index.filtered_search(q, count, keep),
        }
        .map_err(index_err("run a filtered search"))
    }
}

/// Keeps the `k` closest of `found`, closest first.
fn nearest(found: &mut Vec<Hit>, k: usize) {
    let by_distance = |a: &Hit, b: &Hit| a.distance.total_cmp(&b.distance);
    if found.len() > k {
        found.select_nth_unstable_by(k, by_distance);
        found.truncate(k);
    }
    found.sort_unstable_by(by_distance);
}

/// The first `k` matches, in usearch's order (closest first).
fn hits(found: usearch::ffi::Matches, k: usize) -> Vec<Hit> {
    found
        .keys
        .into_iter()
        .zip(found.distances)
        .take(k)
        .map(|(key, distance)| Hit { key, distance })
        .collect()
}

/// How a filtered search runs.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Compare the query with every admitted vector.
    Exact,
    /// usearch's `filtered_search` keeping `ef` admitted candidates: the filter runs as the graph
    /// is walked.
    Graph { ef: usize },
}

/// Vector comparisons per node a graph walk expands (a base-layer node has up to
/// 2 × connectivity neighbours, many already visited); measured on the bench's data.
const COMPARISONS_PER_EXPANSION: usize = 16;

/// How many times the nodes a filtered walk is predicted to test (its `ef / selectivity`) it may
/// test before the search looks again: rare for a filter independent of the vectors (none of 300
/// bench queries of a tenant filter at 10%), common for one that picks a region of the space (a
/// quarter of them when it picks a tenth).
const LONG_WALK: usize = 5;

/// The `ef` of a filtered walk when an unfiltered one keeps `ef`. usearch's top list holds
/// admitted nodes only, so a walk keeping `ef` of them expands about `ef / selectivity` nodes:
/// scaled by the selectivity, the walk is about as long as the unfiltered one and reaches about
/// its recall (bench data at 10%: `ef` 64 → 10 holds recall@10 at 0.96-0.97 and runs at
/// 0.66-0.94x the unfiltered rate, where keeping 64 ran at 0.1-0.2x).
fn filtered_ef(ef: usize, k: usize, admitted: usize, size: usize) -> usize {
    ef.saturating_mul(admitted).div_ceil(size.max(1)).max(k)
}

/// Estimated vector comparisons of an exact scan of `admitted` vectors: a row fetched by key
/// and compared costs about 5/4 of a walk's comparison (measured on the quick bench data, where
/// 1000 rows scanned took 0.8 of a walk keeping 10 of them).
fn scan_cost(admitted: usize) -> usize {
    admitted.saturating_mul(5) / 4
}

/// The nodes a walk keeping `ef` of `admitted` vectors out of `size` expands: about
/// `ef / selectivity`.
fn expansions(ef: usize, admitted: usize, size: usize) -> usize {
    ef.saturating_mul(size).div_ceil(admitted.max(1))
}

/// Estimated vector comparisons of a walk keeping `ef` of `admitted` vectors out of `size`.
fn walk_cost(ef: usize, admitted: usize, size: usize) -> usize {
    expansions(ef, admitted, size).saturating_mul(COMPARISONS_PER_EXPANSION)
}

/// The plan for a filter admitting at most `admitted` of `size` vectors: the cheaper of an exact
/// scan and a walk keeping [`filtered_ef`] admitted candidates.
fn plan(admitted: usize, size: usize, k: usize, ef: usize) -> Plan {
    let admitted = admitted.clamp(1, size.max(1));
    cheaper(admitted, size, filtered_ef(ef.max(k), k, admitted, size))
}

/// The cheaper of an exact scan of `admitted` (at least 1) of `size` vectors and a walk keeping
/// `ef` of them.
fn cheaper(admitted: usize, size: usize, ef: usize) -> Plan {
    if scan_cost(admitted) <= walk_cost(ef, admitted, size) {
        Plan::Exact
    } else {
        Plan::Graph { ef }
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

impl Collection {
    /// An empty collection.
    pub fn new(options: Options) -> Result<Self> {
        let index = Index::new(&options.usearch()?).map_err(index_err("create an index"))?;
        index
            .reserve_capacity_and_threads(INITIAL_CAPACITY, CONTEXTS)
            .map_err(index_err("reserve capacity"))?;
        let originals = (options.dtype == Dtype::I8F32).then(|| Originals::new(options.dims));
        Ok(Self::wrap(
            options,
            index,
            Labels::default(),
            originals,
            None,
        ))
    }

    fn wrap(
        options: Options,
        index: Index,
        labels: Labels,
        originals: Option<Originals>,
        scale: Option<f32>,
    ) -> Self {
        let ef = AtomicUsize::new(index.expansion_search());
        index.change_expansion_search(1);
        Self {
            options,
            ef,
            index: RwLock::new(index),
            claimed: AtomicUsize::new(0),
            labels: RwLock::new(labels),
            originals: originals.map(RwLock::new),
            scale: scale.map(OnceLock::from).unwrap_or_default(),
            stripes: (0..KEY_STRIPES).map(|_| Mutex::new(())).collect(),
            contexts: Contexts::new(),
        }
    }

    #[must_use]
    pub fn options(&self) -> Options {
        self.options
    }

    /// Number of vectors present.
    #[must_use]
    pub fn len(&self) -> usize {
        read(&self.index).size()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots reserved; grows on demand.
    #[must_use]
    pub fn capacity(&self) -> usize {
        read(&self.index).capacity()
    }

    #[must_use]
    pub fn contains(&self, key: u64) -> bool {
        read(&self.index).contains(key)
    }

    /// The label stored for `key`, if present.
    #[must_use]
    pub fn label(&self, key: u64) -> Option<Label> {
        read(&self.labels).get(key)
    }

    fn check(&self, key: u64, vector: &[f32]) -> Result<()> {
        if key == RESERVED_KEY {
            return Err(Error::ReservedKey(key));
        }
        if vector.len() != self.options.dims {
            return Err(Error::Dimension {
                got: vector.len(),
                want: self.options.dims,
            });
        }
        if !vector.iter().all(|x| x.is_finite()) {
            return Err(Error::NotFinite(key));
        }
        // Checked here, not only on add, so the store never records a vector it cannot add.
        if self.originals.is_some() {
            norm(vector, || format!("the vector for key {key}"))?;
        }
        Ok(())
    }

    /// Runs `f` with the index shared and room for `n` more vectors reserved, growing first
    /// (doubling) under the exclusive lock when needed.
    fn with_room<T>(&self, n: usize, f: impl FnOnce(&Index) -> Result<T>) -> Result<T> {
        loop {
            {
                let index = read(&self.index);
                let claimed = self.claimed.fetch_add(n, Ordering::AcqRel) + n;
                if index.size() + claimed <= index.capacity() {
                    let out = f(&index);
                    self.claimed.fetch_sub(n, Ordering::AcqRel);
                    return out;
                }
                self.claimed.fetch_sub(n, Ordering::AcqRel);
            }
            self.grow(n, true)?;
        }
    }

    /// Makes room for `n` more vectors: doubling (amortised growth for one-by-one adds) or
    /// exactly (a batch knows its size; doubling would leave up to half the slots unused).
    fn grow(&self, n: usize, double: bool) -> Result<()> {
        let index = write(&self.index);
        // No adds run while we hold the lock exclusively, so `size` is exact here.
        let need = index.size() + n;
        if need > index.capacity() {
            let grown = if double {
                need.max(index.capacity() * 2)
            } else {
                need
            };
            index
                .reserve_capacity_and_threads(grown.max(INITIAL_CAPACITY), CONTEXTS)
                .map_err(index_err("grow capacity"))?;
        }
        Ok(())
    }

    /// Inserts or replaces the vector and label of `key`.
    pub fn upsert(&self, key: u64, vector: &[f32], label: Label) -> Result<()> {
        self.check(key, vector)?;
        self.apply(key, vector, label)
    }

    /// [`Self::upsert`] of a vector [`Self::check`] has passed (a batch checks every row first).
    fn apply(&self, key: u64, vector: &[f32], label: Label) -> Result<()> {
        let unit = self
            .originals
            .as_ref()
            .map(|_| unit(vector, || format!("the vector for key {key}")))
            .transpose()?;
        let _key_lock = self.stripes[(key % KEY_STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _context = self.contexts.acquire();
        // The exact copy goes in first, so a search that meets the key in the graph can rank it.
        if let (Some(originals), Some(unit)) = (&self.originals, &unit) {
            write(originals).insert(key, unit);
        }
        let graphed = Graphed::new(
            vector,
            unit.as_deref(),
            self.i8_scale_from(std::iter::once(vector)),
        );
        let added = self.with_room(1, |index| {
            if index.contains(key) {
                index
                    .remove(key)
                    .map_err(index_err("remove the old vector"))?;
            }
            graphed.add(index, key)
        });
        if let (Err(_), Some(originals)) = (&added, &self.originals) {
            write(originals).remove(key);
        }
        added?;
        write(&self.labels).insert(key, label);
        Ok(())
    }

    /// The graph's scale, fixed from `rows` (checked vectors) if none is yet. Meaningless,
    /// and not fixed, for dtypes other than `i8+f32`.
    fn i8_scale_from<'a>(&self, rows: impl Iterator<Item = &'a [f32]>) -> f32 {
        if self.originals.is_none() {
            return 1.0;
        }
        *self.scale.get_or_init(|| i8_scale(rows, self.options.dims))
    }

    /// Validates a batch (`keys.len() * dims` values, every key usable, every value finite)
    /// without writing, so callers can log it durably before applying it.
    pub fn check_batch(&self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        let dims = self.options.dims;
        if vectors.len() != keys.len() * dims {
            return Err(if keys.len() == 1 {
                Error::Dimension {
                    got: vectors.len(),
                    want: dims,
                }
            } else {
                Error::BatchShape {
                    keys: keys.len(),
                    vectors: vectors.len() / dims,
                    labels: keys.len(),
                }
            });
        }
        keys.iter()
            .zip(vectors.chunks_exact(dims))
            .try_for_each(|(key, row)| self.check(*key, row))
    }

    /// Upserts many vectors (`vectors` is `keys.len() * dims` values, row-major) on up to
    /// `threads` threads. Every row is validated before any is written.
    pub fn upsert_batch(
        &self,
        keys: &[u64],
        vectors: &[f32],
        labels: Vec<Label>,
        threads: usize,
    ) -> Result<()> {
        let dims = self.options.dims;
        if labels.len() != keys.len() {
            return Err(Error::BatchShape {
                keys: keys.len(),
                vectors: vectors.len() / dims,
                labels: labels.len(),
            });
        }
        self.check_batch(keys, vectors)?;
        self.i8_scale_from(vectors.chunks_exact(dims));
        self.grow(keys.len(), false)?;
        let rows: Vec<(u64, &[f32], Label)> = keys
            .iter()
            .zip(vectors.chunks_exact(dims))
            .zip(labels)
            .map(|((k, v), l)| (*k, v, l))
            .collect();
        let threads = threads.clamp(1, rows.len().clamp(1, CONTEXTS));
        let chunk = rows.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let workers: Vec<_> = rows
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .try_for_each(|(k, v, l)| self.apply(*k, v, l.clone()))
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<()>>>()
        })?;
        Ok(())
    }

    /// Removes `key`; returns whether it was present.
    pub fn delete(&self, key: u64) -> Result<bool> {
        let _key_lock = self.stripes[(key % KEY_STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let removed = read(&self.index)
            .remove(key)
            .map_err(index_err("remove a vector"))?;
        if let Some(originals) = &self.originals {
            write(originals).remove(key);
        }
        write(&self.labels).remove(key);
        Ok(removed > 0)
    }

    /// The `k` nearest keys to `query` that pass `filter`, closest first.
    ///
    /// A filtered search picks the cheaper of two plans by the filter's selectivity (the size
    /// of its smallest key set): an exact scan of the admitted vectors when they are few, else
    /// usearch's in-graph filter with `ef` scaled down by the selectivity. See [`plan`].
    pub fn search(&self, query: &[f32], k: usize, filter: &Filter) -> Result<Vec<Hit>> {
        let keys = rehash(filter);
        self.search_one(query, k, filter, keys.as_ref())
    }

    fn search_one(
        &self,
        query: &[f32],
        k: usize,
        filter: &Filter,
        keys: Option<&KeySet>,
    ) -> Result<Vec<Hit>> {
        let _context = self.contexts.acquire();
        self.search_in(&read(&self.index), query, k, filter, keys)
    }

    /// [`Self::search`] on `index`, the caller holding a usearch context and the shared lock
    /// (a batch's thread takes them once for a block of queries, not once a query).
    fn search_in(
        &self,
        index: &Index,
        query: &[f32],
        k: usize,
        filter: &Filter,
        keys: Option<&KeySet>,
    ) -> Result<Vec<Hit>> {
        if k == 0 {
            return Err(Error::ZeroK);
        }
        if query.len() != self.options.dims {
            return Err(Error::Dimension {
                got: query.len(),
                want: self.options.dims,
            });
        }
        let normalised = self
            .originals
            .as_ref()
            .map(|_| unit(query, || "the query".to_owned()))
            .transpose()?;
        // Before any add the graph is empty, and any scale ranks it alike.
        let scale = self.scale.get().copied().unwrap_or(127.0);
        let graphed = Graphed::new(query, normalised.as_deref(), scale);
        let query = normalised.as_deref().unwrap_or(query);
        // usearch walks with the larger of its `ef` (held at 1) and the results asked for.
        let ef = self.expansion_search().max(k);
        if filter.is_empty() {
            let found = graphed.search(index, ef)?;
            return Ok(self.rank(found, query, k));
        }
        let labels = read(&self.labels);
        let pass = labels.compile(filter, keys);
        let admitted = pass.admitted_at_most();
        if admitted == 0 {
            return Ok(Vec::new());
        }
        let size = index.size();
        match plan(admitted, size, k, ef) {
            Plan::Exact => self.exact(index, query, k, &pass),
            Plan::Graph { ef: scaled } => {
                let tested = Cell::new(0usize);
                let keep = |key| {
                    tested.set(tested.get() + 1);
                    pass.accepts(key)
                };
                let mut found = graphed.filtered_search(index, scaled, &keep)?;
                // A walk that tests far more nodes than the selectivity predicts is where the
                // filter rejects most nodes: the admitted vectors lie elsewhere (a filter that
                // picks a topic), and the few it keeps miss true neighbours. Such a search
                // takes the cheaper of a scan and a walk with the full ef.
                let admitted = admitted.min(size.max(1));
                let predicted = expansions(scaled, admitted, size);
                if scaled < ef && tested.get() > LONG_WALK.saturating_mul(predicted) {
                    match cheaper(admitted, size, ef) {
                        Plan::Exact => return self.exact(index, query, k, &pass),
                        Plan::Graph { ef } => found = graphed.filtered_search(index, ef, &keep)?,
                    }
                }
                Ok(self.rank(found, query, k))
            }
        }
    }

    /// The `k` best of the graph's `found`: usearch's first `k`, or for an `i8+f32` collection
    /// all of them re-ranked by exact distance.
    fn rank(&self, found: usearch::ffi::Matches, query: &[f32], k: usize) -> Vec<Hit> {
        let Some(originals) = &self.originals else {
            return hits(found, k);
        };
        // A key deleted since the graph returned it has no exact copy left: `hits` skips it.
        let mut ranked = read(originals).hits(found.keys.into_iter(), query);
        nearest(&mut ranked, k);
        ranked
    }

    /// Compares `query` with every admitted vector: exact, and cheaper than any graph walk when
    /// the filter admits few.
    fn exact(&self, index: &Index, query: &[f32], k: usize, pass: &Compiled) -> Result<Vec<Hit>> {
        let mut found = if let Some(originals) = &self.originals {
            read(originals).hits(pass.admitted(), query)
        } else {
            let mut found = Vec::with_capacity(pass.admitted_at_most());
            let metric = self.options.metric;
            let mut row = vec![0.0f32; self.options.dims];
            for key in pass.admitted() {
                // A key whose add is still in flight has a label but no vector yet.
                if index
                    .get(key, &mut row)
                    .map_err(index_err("read a vector"))?
                    > 0
                {
                    found.push(Hit {
                        key,
                        distance: metric.distance(query, &row),
                    });
                }
            }
            found
        };
        nearest(&mut found, k);
        Ok(found)
    }

    /// Searches many queries (`queries` is `n * dims` values) on up to `threads` threads.
    pub fn search_batch(
        &self,
        queries: &[f32],
        k: usize,
        filter: &Filter,
        threads: usize,
    ) -> Result<Vec<Vec<Hit>>> {
        let dims = self.options.dims;
        if queries.len() % dims != 0 {
            return Err(Error::Dimension {
                got: queries.len() % dims,
                want: dims,
            });
        }
        let keys = rehash(filter);
        let keys = keys.as_ref();
        let rows: Vec<&[f32]> = queries.chunks_exact(dims).collect();
        let threads = threads.clamp(1, rows.len().clamp(1, CONTEXTS));
        // A block's queries share one context and one hold of the shared lock; blocks are short
        // (at most SEARCH_BLOCK queries), so a writer waiting for the lock waits little.
        let run = |block: &[&[f32]]| -> Result<Vec<Vec<Hit>>> {
            let _context = self.contexts.acquire();
            let index = read(&self.index);
            block
                .iter()
                .map(|q| self.search_in(&index, q, k, filter, keys))
                .collect()
        };
        // Blocks handed out as threads come free, not one fixed share each: a thread slowed by
        // other work on the host (or by harder queries) no longer holds up the whole batch.
        let block = rows.len().div_ceil(threads * 4).clamp(1, SEARCH_BLOCK);
        let next = AtomicUsize::new(0);
        let worker = || -> Result<Vec<(usize, Vec<Vec<Hit>>)>> {
            let mut done = Vec::new();
            loop {
                let start = next.fetch_add(block, Ordering::Relaxed);
                if start >= rows.len() {
                    return Ok(done);
                }
                done.push((start, run(&rows[start..rows.len().min(start + block)])?));
            }
        };
        let mut blocks = std::thread::scope(|s| {
            // This thread is one of the workers (the only one for a batch on one thread): one
            // spawn fewer, and no idle wait beside them.
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(worker)).collect();
            let mut blocks = worker()?;
            for w in helpers {
                blocks.extend(w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?);
            }
            Ok::<_, Error>(blocks)
        })?;
        blocks.sort_unstable_by_key(|(start, _)| *start);
        Ok(blocks.into_iter().flat_map(|(_, hits)| hits).collect())
    }

    /// Writes index and labels to `path` atomically: a temporary file in the same directory,
    /// fsync, rename, fsync of the directory. A crash leaves the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<()> {
        // Exclusive: usearch must not serialise while adds move its buffers.
        let index = write(&self.index);
        let mut blob = vec![0u8; index.serialized_length()];
        index
            .save_to_buffer(&mut blob)
            .map_err(index_err("serialise the index"))?;
        let labels = read(&self.labels).encode();
        // An i8+f32 collection's section: the graph's scale (0 while unset), then the vectors.
        let exact = self.originals.as_ref().map_or_else(Vec::new, |o| {
            let scale = self.scale.get().copied().unwrap_or(0.0);
            [scale.to_le_bytes().to_vec(), read(o).encode()].concat()
        });
        file::write_atomic(path, [&blob, &labels, &exact])
    }

    /// Loads a collection saved by [`Collection::save`], checking the checksum and that the file
    /// was built with `options`' dims, metric and dtype.
    pub fn load(path: &Path, options: Options) -> Result<Self> {
        let corrupt = |why: String| Error::Corrupt {
            path: path.to_owned(),
            why,
        };
        let ([blob, labels, exact], version) = file::read_checked(path)?;
        if options.dtype == Dtype::I8F32 && version < file::QUANTISED_SINCE {
            return Err(corrupt(
                "its i8 graph was quantised by an earlier version".to_owned(),
            ));
        }
        let index = Index::new(&options.usearch()?).map_err(index_err("create an index"))?;
        index
            .load_from_buffer(&blob)
            .map_err(|e| corrupt(format!("usearch refused it: {e}")))?;
        if index.dimensions() != options.dims
            || index.metric_kind() != options.graph_metric()?
            || index.scalar_kind() != options.dtype.kind()
        {
            return Err(corrupt(
                "it was built for another dims, metric or dtype".to_owned(),
            ));
        }
        let labels =
            Labels::decode(&labels).ok_or_else(|| corrupt("bad label table".to_owned()))?;
        if labels.len() != index.size() {
            return Err(corrupt(format!(
                "{} labels for {} vectors",
                labels.len(),
                index.size()
            )));
        }
        let (originals, scale) = match options.dtype {
            Dtype::I8F32 => {
                let bad = || corrupt("bad exact-vector table".to_owned());
                let (scale, rows) = exact.split_at_checked(4).ok_or_else(bad)?;
                let scale = f32::from_le_bytes(scale.try_into().map_err(|_| bad())?);
                let originals = Originals::decode(rows, options.dims).ok_or_else(bad)?;
                // Unset (0) only while empty; never coarser than usearch's cast.
                match scale {
                    0.0 if originals.len() == 0 => (Some(originals), None),
                    s if s.is_finite() && s >= 127.0 => (Some(originals), Some(s)),
                    _ => return Err(corrupt(format!("bad i8 scale {scale}"))),
                }
            }
            _ if exact.is_empty() => (None, None),
            _ => {
                return Err(corrupt(
                    "it holds exact vectors but the dtype is not i8+f32".to_owned(),
                ))
            }
        };
        if let Some(o) = originals.as_ref().filter(|o| o.len() != index.size()) {
            return Err(corrupt(format!(
                "{} exact vectors for {} in the index",
                o.len(),
                index.size()
            )));
        }
        let capacity = index.size().max(INITIAL_CAPACITY);
        index
            .reserve_capacity_and_threads(capacity, CONTEXTS)
            .map_err(index_err("reserve capacity"))?;
        Ok(Self::wrap(options, index, labels, originals, scale))
    }

    /// Candidates kept while searching (usearch's `ef`): higher is slower and finds more.
    #[must_use]
    pub fn expansion_search(&self) -> usize {
        self.ef.load(Ordering::Relaxed)
    }

    /// Changes `ef` for later searches; searches in flight finish with the old value.
    pub fn set_expansion_search(&self, ef: usize) -> Result<()> {
        if ef == 0 {
            return Err(Error::ZeroK);
        }
        self.ef.store(ef, Ordering::Relaxed);
        Ok(())
    }

    /// Approximate bytes the index holds in memory.
    #[must_use]
    pub fn memory_usage(&self) -> usize {
        read(&self.index).memory_usage()
            + self
                .originals
                .as_ref()
                .map_or(0, |o| read(o).memory_usage())
    }
}

#[cfg(test)]
mod tests;
