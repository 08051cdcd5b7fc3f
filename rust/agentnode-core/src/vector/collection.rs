//! [`Collection`]: the index behind an `RwLock`, labels and exact vectors beside it; adds,
//! deletes, growth and the collection file.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use usearch::Index;

use super::contexts::{Contexts, CONTEXTS};
use super::file;
use super::labels::{Label, Labels};
use super::options::{Dtype, Options};
use super::originals::Originals;
use super::quantise::{i8_scale, norm, unit, Graphed};
use super::{index_err, read, write, Error, Result};

/// The key usearch reserves to mark free slots.
pub(super) const RESERVED_KEY: u64 = u64::MAX;
/// Capacity reserved for a new collection; it then doubles as needed.
pub(super) const INITIAL_CAPACITY: usize = 1024;
/// Stripes of the per-key upsert lock; enough that unrelated keys rarely wait on each other.
pub(super) const KEY_STRIPES: usize = 64;

/// A vector collection: index plus per-key labels.
pub struct Collection {
    pub(super) options: Options,
    pub(super) index: RwLock<Index>,
    /// Slots claimed by adds in flight under the shared lock, so growth is decided before usearch
    /// would refuse an add.
    pub(super) claimed: AtomicUsize,
    pub(super) labels: RwLock<Labels>,
    /// The exact vectors, for an `i8+f32` collection only.
    pub(super) originals: Option<RwLock<Originals>>,
    /// The scale of an `i8+f32` collection's graph, once a vector has been added (see
    /// [`i8_scale`]).
    pub(super) scale: OnceLock<f32>,
    /// `ef`, the candidates an unfiltered search keeps. usearch's own setting is held at 1 and
    /// each search asks for `max(k, ef)` results instead (usearch walks with the larger of the
    /// two), so that a filtered search can walk with its own smaller `ef` (see [`super::planner::filtered_ef`])
    /// while unfiltered ones run beside it: usearch 2.26's Rust API has no per-search `ef`.
    pub(super) ef: AtomicUsize,
    pub(super) stripes: Vec<Mutex<()>>,
    pub(super) contexts: Contexts,
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
