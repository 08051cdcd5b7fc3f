//! The exact f32 vectors of an `i8+f32` collection, kept beside its i8 graph so a search can
//! re-rank the graph's candidates by their true distance.
//!
//! Rows live in fixed-size chunks: growing never copies the rows already held (a single `Vec`
//! would double, and for a moment hold both copies, of what can be hundreds of MiB), and a
//! deleted key's row is reused by the next insert.

use super::labels::KeyMap;
use super::{Hit, Metric};

/// Rows per chunk: 4096 x 384-d f32 is 6 MiB, small next to a large collection and few
/// allocations for a small one.
const CHUNK_ROWS: usize = 4096;

pub(super) struct Originals {
    dims: usize,
    rows: KeyMap<u32>,
    chunks: Vec<Box<[f32]>>,
    free: Vec<u32>,
}

impl Originals {
    pub(super) fn new(dims: usize) -> Self {
        Self {
            dims,
            rows: KeyMap::default(),
            chunks: Vec::new(),
            free: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The chunk holding `row`, and where in it the row lies.
    fn place(&self, row: u32) -> (usize, std::ops::Range<usize>) {
        let at = row as usize % CHUNK_ROWS;
        (
            row as usize / CHUNK_ROWS,
            at * self.dims..(at + 1) * self.dims,
        )
    }

    fn slot(&mut self, row: u32) -> &mut [f32] {
        let (chunk, span) = self.place(row);
        &mut self.chunks[chunk][span]
    }

    /// A free row: a deleted key's, or the next one (a new chunk when the last is full).
    fn claim(&mut self) -> u32 {
        if let Some(row) = self.free.pop() {
            return row;
        }
        // With no row free, every row handed out is in use: the next is the count of them.
        let row = self.rows.len();
        if row == self.chunks.len() * CHUNK_ROWS {
            self.chunks
                .push(vec![0.0; CHUNK_ROWS * self.dims].into_boxed_slice());
        }
        row as u32
    }

    /// Stores `vector` (of the collection's dims) for `key`, replacing any earlier one.
    pub(super) fn insert(&mut self, key: u64, vector: &[f32]) {
        let row = if let Some(row) = self.rows.get(&key) {
            *row
        } else {
            let row = self.claim();
            self.rows.insert(key, row);
            row
        };
        self.slot(row).copy_from_slice(vector);
    }

    pub(super) fn remove(&mut self, key: u64) {
        if let Some(row) = self.rows.remove(&key) {
            self.free.push(row);
        }
    }

    fn row(&self, row: u32) -> &[f32] {
        let (chunk, span) = self.place(row);
        &self.chunks[chunk][span]
    }

    /// Each of `keys` that is held, with its exact distance from the unit vector `query`. Both
    /// are unit vectors, so the cos distance is the inner product one (no norms to compute).
    /// Every row is looked up and prefetched before any is read: a search's candidates lie
    /// scattered over the rows, and reading them in turn stalls on each one's cache misses.
    pub(super) fn hits(&self, keys: impl Iterator<Item = u64>, query: &[f32]) -> Vec<Hit> {
        let rows: Vec<(u64, &[f32])> = keys
            .filter_map(|key| {
                let row = self.row(*self.rows.get(&key)?);
                prefetch(row);
                Some((key, row))
            })
            .collect();
        rows.into_iter()
            .map(|(key, row)| Hit {
                key,
                distance: Metric::Ip.distance(query, row),
            })
            .collect()
    }

    /// Bytes held, for [`super::Collection::memory_usage`].
    pub(super) fn memory_usage(&self) -> usize {
        self.chunks.len() * CHUNK_ROWS * self.dims * 4
            + self.rows.capacity() * 16
            + self.free.capacity() * 4
    }

    /// Little-endian: row count, then per row the key (u64) and `dims` f32 values.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.rows.len() * (8 + self.dims * 4));
        out.extend_from_slice(&(self.rows.len() as u64).to_le_bytes());
        for (key, row) in &self.rows {
            out.extend_from_slice(&key.to_le_bytes());
            for x in self.row(*row) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    pub(super) fn decode(buf: &[u8], dims: usize) -> Option<Self> {
        let (count, mut rest) = buf.split_at_checked(8)?;
        let count = usize::try_from(u64::from_le_bytes(count.try_into().ok()?)).ok()?;
        let width = 8 + dims * 4;
        if rest.len() != count.checked_mul(width)? {
            return None;
        }
        let mut originals = Self::new(dims);
        let mut row = vec![0.0f32; dims];
        while let Some((entry, tail)) = rest.split_at_checked(width) {
            let (key, values) = entry.split_at(8);
            for (x, bytes) in row.iter_mut().zip(values.chunks_exact(4)) {
                *x = f32::from_le_bytes(bytes.try_into().ok()?);
            }
            originals.insert(u64::from_le_bytes(key.try_into().ok()?), &row);
            rest = tail;
        }
        Some(originals)
    }
}

/// Asks the CPU to bring `row` into cache (a hint: no effect on what is read).
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch never faults, and the pointer is in bounds anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
}
