//! How a filtered search runs: an exact scan of the admitted vectors or a graph walk with `ef`
//! scaled by the filter's selectivity, whichever is estimated cheaper.

/// How a filtered search runs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Compare the query with every admitted vector.
    Exact,
    /// usearch's `filtered_search` keeping `ef` admitted candidates: the filter runs as the graph
    /// is walked.
    Graph { ef: usize },
}

/// Vector comparisons per node a graph walk expands (a base-layer node has up to
/// 2 × connectivity neighbours, many already visited); measured on the bench's data.
pub(super) const COMPARISONS_PER_EXPANSION: usize = 16;

/// How many times the nodes a filtered walk is predicted to test (its `ef / selectivity`) it may
/// test before the search looks again: rare for a filter independent of the vectors (none of 300
/// bench queries of a tenant filter at 10%), common for one that picks a region of the space (a
/// quarter of them when it picks a tenth).
pub(super) const LONG_WALK: usize = 5;

/// The `ef` of a filtered walk when an unfiltered one keeps `ef`. usearch's top list holds
/// admitted nodes only, so a walk keeping `ef` of them expands about `ef / selectivity` nodes:
/// scaled by the selectivity, the walk is about as long as the unfiltered one and reaches about
/// its recall (bench data at 10%: `ef` 64 → 10 holds recall@10 at 0.96-0.97 and runs at
/// 0.66-0.94x the unfiltered rate, where keeping 64 ran at 0.1-0.2x).
pub(super) fn filtered_ef(ef: usize, k: usize, admitted: usize, size: usize) -> usize {
    ef.saturating_mul(admitted).div_ceil(size.max(1)).max(k)
}

/// Estimated vector comparisons of an exact scan of `admitted` vectors: a row fetched by key
/// and compared costs about 5/4 of a walk's comparison (measured on the quick bench data, where
/// 1000 rows scanned took 0.8 of a walk keeping 10 of them).
pub(super) fn scan_cost(admitted: usize) -> usize {
    admitted.saturating_mul(5) / 4
}

/// The nodes a walk keeping `ef` of `admitted` vectors out of `size` expands: about
/// `ef / selectivity`.
pub(super) fn expansions(ef: usize, admitted: usize, size: usize) -> usize {
    ef.saturating_mul(size).div_ceil(admitted.max(1))
}

/// Estimated vector comparisons of a walk keeping `ef` of `admitted` vectors out of `size`.
pub(super) fn walk_cost(ef: usize, admitted: usize, size: usize) -> usize {
    expansions(ef, admitted, size).saturating_mul(COMPARISONS_PER_EXPANSION)
}

/// The plan for a filter admitting at most `admitted` of `size` vectors: the cheaper of an exact
/// scan and a walk keeping [`filtered_ef`] admitted candidates.
pub(super) fn plan(admitted: usize, size: usize, k: usize, ef: usize) -> Plan {
    let admitted = admitted.clamp(1, size.max(1));
    cheaper(admitted, size, filtered_ef(ef.max(k), k, admitted, size))
}

/// The cheaper of an exact scan of `admitted` (at least 1) of `size` vectors and a walk keeping
/// `ef` of them.
pub(super) fn cheaper(admitted: usize, size: usize, ef: usize) -> Plan {
    if scan_cost(admitted) <= walk_cost(ef, admitted, size) {
        Plan::Exact
    } else {
        Plan::Graph { ef }
    }
}
