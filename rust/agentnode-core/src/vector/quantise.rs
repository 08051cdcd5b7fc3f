//! The `i8+f32` dtype's graph side: vectors normalised to unit length, quantised to i8 on a
//! scale fixed by the first vectors added, and the query or row as the graph reads it.

use usearch::Index;

use super::options::lanes;
use super::{index_err, Error, Result};

/// The length of `vector`, if it has a direction to normalise to; `what` names it in the error.
pub(super) fn norm(vector: &[f32], what: impl FnOnce() -> String) -> Result<f32> {
    let norm = lanes(vector, vector, |x, y| x * y).sqrt();
    // Zero has no direction; a norm that underflows or overflows f32 would divide into garbage.
    if norm.is_normal() {
        Ok(norm)
    } else {
        Err(Error::ZeroVector(what()))
    }
}

/// `vector` scaled to unit length, for an `i8+f32` collection.
pub(super) fn unit(vector: &[f32], what: impl FnOnce() -> String) -> Result<Vec<f32>> {
    let norm = norm(vector, what)?;
    Ok(vector.iter().map(|x| x / norm).collect())
}

/// The least span of the i8 graph's range, in multiples of a unit vector's RMS component
/// (exactly `1/sqrt(dims)`). usearch's own cast spans 1.0, all a component can reach, which in
/// 384-d leaves a typical component about 6 of the 127 steps; spanning 8 RMS gives it 16, and
/// recall@10 at ef 12 on the bench's data went 0.91-0.92 -> 0.95-0.97 (6 RMS: 0.95-0.955).
pub(super) const I8_SPAN_RMS: f32 = 8.0;
/// The span is also at least this many times the typical largest component of the first
/// vectors added. Embeddings of some models share a few dimensions of large magnitude, and a
/// graph whose vectors all saturate there loses most of its recall at low ef (0.93 -> 0.53 at
/// ef 12 in a test with four shared dimensions at 10 RMS), where the headroom keeps the gain.
pub(super) const I8_HEADROOM: f32 = 1.5;

/// The i8 graph's scale (`+-127` over the span), fixed by the first vectors added, `rows` of
/// `dims` values each: from the median of their largest components relative to their length
/// (robust to one outlier in a batch), never coarser than usearch's cast (a scale of 127).
pub(super) fn i8_scale<'a>(rows: impl Iterator<Item = &'a [f32]>, dims: usize) -> f32 {
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
pub(super) fn quantise(unit: &[f32], scale: f32) -> Vec<i8> {
    #[allow(clippy::cast_possible_truncation)] // clamped to i8's range first
    unit.iter()
        .map(|x| (x * scale).round().clamp(-127.0, 127.0) as i8)
        .collect()
}

/// A vector as the graph reads it: as given, or quantised for an `i8+f32` graph.
pub(super) enum Graphed<'a> {
    F32(&'a [f32]),
    I8(Vec<i8>),
}

impl<'a> Graphed<'a> {
    /// `unit` is the normalised vector of an `i8+f32` collection, `None` for the others.
    pub(super) fn new(vector: &'a [f32], unit: Option<&[f32]>, scale: f32) -> Self {
        unit.map_or(Self::F32(vector), |u| Self::I8(quantise(u, scale)))
    }

    pub(super) fn add(&self, index: &Index, key: u64) -> Result<()> {
        match self {
            Self::F32(v) => index.add(key, v),
            Self::I8(v) => index.add(key, v),
        }
        .map_err(index_err("add a vector"))
    }

    pub(super) fn search(&self, index: &Index, count: usize) -> Result<usearch::ffi::Matches> {
        match self {
            Self::F32(q) => index.search(q, count),
            Self::I8(q) => index.search(q, count),
        }
        .map_err(index_err("search"))
    }

    pub(super) fn filtered_search(
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
