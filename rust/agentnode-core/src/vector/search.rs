//! Searches of a [`Collection`]: one query or a batch on many threads, unfiltered or filtered
//! by the plan [`super::planner`] picks, ranked exactly for an `i8+f32` collection.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use usearch::Index;

use super::collection::Collection;
use super::contexts::CONTEXTS;
use super::labels::{Compiled, KeySet};
use super::planner::{cheaper, expansions, plan, Plan, LONG_WALK};
use super::quantise::{unit, Graphed};
use super::{index_err, read, Error, Filter, Hit, Result};

/// Most queries a batch search hands a thread at a time (fewer in a small batch, so each thread
/// takes several blocks): small enough that threads finish together, large enough that taking
/// one is rare next to searching it.
pub(super) const SEARCH_BLOCK: usize = 16;

/// The caller's key set in the store's fast hash, built once per call rather than probed
/// through `SipHash` for every node visited.
pub(super) fn rehash(filter: &Filter) -> Option<KeySet> {
    filter
        .keys
        .as_ref()
        .map(|keys| keys.iter().copied().collect())
}

/// Keeps the `k` closest of `found`, closest first.
pub(super) fn nearest(found: &mut Vec<Hit>, k: usize) {
    let by_distance = |a: &Hit, b: &Hit| a.distance.total_cmp(&b.distance);
    if found.len() > k {
        found.select_nth_unstable_by(k, by_distance);
        found.truncate(k);
    }
    found.sort_unstable_by(by_distance);
}

/// The first `k` matches, in usearch's order (closest first).
pub(super) fn hits(found: usearch::ffi::Matches, k: usize) -> Vec<Hit> {
    found
        .keys
        .into_iter()
        .zip(found.distances)
        .take(k)
        .map(|(key, distance)| Hit { key, distance })
        .collect()
}

impl Collection {
    /// The `k` nearest keys to `query` that pass `filter`, closest first.
    ///
    /// A filtered search picks the cheaper of two plans by the filter's selectivity (the size
    /// of its smallest key set): an exact scan of the admitted vectors when they are few, else
    /// usearch's in-graph filter with `ef` scaled down by the selectivity. See [`super::planner::plan`].
    pub fn search(&self, query: &[f32], k: usize, filter: &Filter) -> Result<Vec<Hit>> {
        let keys = rehash(filter);
        self.search_one(query, k, filter, keys.as_ref())
    }

    pub(super) fn search_one(
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
    pub(super) fn search_in(
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
    pub(super) fn rank(&self, found: usearch::ffi::Matches, query: &[f32], k: usize) -> Vec<Hit> {
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
    pub(super) fn exact(
        &self,
        index: &Index,
        query: &[f32],
        k: usize,
        pass: &Compiled,
    ) -> Result<Vec<Hit>> {
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
}
